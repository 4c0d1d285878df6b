#!/usr/bin/env bash
# Finetune InternVL3-9B: 1 node x 8 GPUs, TP1 x PP4 (InternLM3 LLM, 48 layers), micro-batch 1 x 64 accumulation steps.
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP1 PP4 vit[[24, 0, 0, 0]] llm[[10, 13, 13, 12]] DP2, seq 4096, micro-batch 1, 64 micro-batches/step:
#   stage 0: 2.48B params (2.17B trainable): weights 5.0 + grads 8.7 + optimizer 13.0 + activations 24.3 + logits 0.0 + allowance 4 = 55.0 GB
#   stage 1: 2.10B params (2.10B trainable): weights 4.2 + grads 8.4 + optimizer 12.6 + activations 23.7 + logits 0.0 + allowance 4 = 52.9 GB
#   stage 2: 2.10B params (2.10B trainable): weights 4.2 + grads 8.4 + optimizer 12.6 + activations 15.8 + logits 0.0 + allowance 4 = 45.0 GB
#   stage 3: 2.46B params (2.46B trainable): weights 4.9 + grads 9.9 + optimizer 14.8 + activations 7.3 + logits 3.2 + allowance 4 = 44.0 GB
#   peak 55.0 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3/model_9B.json --tp 1 --pp 4 --world 8 --grad-acc 64
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-9B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[10,13,13,12]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
#     --cfg.parallel_config.tp_size 1
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=9B FAMILY=internvl3 NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
