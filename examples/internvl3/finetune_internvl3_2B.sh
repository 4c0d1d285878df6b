#!/usr/bin/env bash
# Finetune InternVL3-2B: 1 node x 8 GPUs, pure DP8 (the model fits one GPU).
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP1 PP1 vit[[24]] llm[[28]] DP8, seq 4096, micro-batch 1, 16 micro-batches/step:
#   stage 0: 2.09B params (1.78B trainable): weights 4.2 + grads 7.1 + optimizer 2.7 + activations 11.2 + logits 3.7 + allowance 4 = 32.9 GB
#   peak 32.9 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3/model_2B.json --tp 1 --pp 1 --world 8 --grad-acc 16
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-2B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[28]] --cfg.parallel_config.vit_pp_layers [[24]] \
#     --cfg.parallel_config.tp_size 1
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=2B FAMILY=internvl3 NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-1} GRAD_ACC_STEP=${GRAD_ACC_STEP:-16}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
