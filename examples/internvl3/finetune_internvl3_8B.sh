#!/usr/bin/env bash
# Finetune InternVL3-8B: 1 node x 8 GPUs, TP1 x PP4, micro-batch 1 x 64 accumulation steps (the reference's).
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-8B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
#     --cfg.parallel_config.tp_size 1
export MODEL=8B NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
