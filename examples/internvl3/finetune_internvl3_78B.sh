#!/usr/bin/env bash
# Finetune InternVL3-78B: 4 nodes x 8 GPUs, TP8 (the ViT's 25 heads split unevenly) + SP x PP2, micro-batch 1 x 32
# accumulation steps. Convert first:
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-78B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[40,40]] --cfg.parallel_config.vit_pp_layers [[45,0]] \
#     --cfg.parallel_config.tp_size 8
export MODEL=78B NNODES=${NNODES:-4} TP=${TP:-8} PP=${PP:-2} GRAD_ACC_STEP=${GRAD_ACC_STEP:-32}
export EXTRA_ARGS=${EXTRA_ARGS:-"--unaligned-linear --sequence-parallel"}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
