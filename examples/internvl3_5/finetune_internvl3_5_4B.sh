#!/usr/bin/env bash
# Finetune InternVL3.5-4B: 1 node x 8 GPUs, TP1 x PP4, micro-batch 1 x 64 accumulation steps.
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP1 PP4 vit[[24, 0, 0, 0]] llm[[8, 10, 10, 8]] DP2, seq 4096, micro-batch 1, 64 micro-batches/step:
#   stage 0: 1.52B params (1.21B trainable): weights 3.0 + grads 4.9 + optimizer 7.3 + activations 16.1 + logits 0.0 + allowance 4 = 35.3 GB
#   stage 1: 1.01B params (1.01B trainable): weights 2.0 + grads 4.0 + optimizer 6.1 + activations 15.1 + logits 0.0 + allowance 4 = 31.2 GB
#   stage 2: 1.01B params (1.01B trainable): weights 2.0 + grads 4.0 + optimizer 6.1 + activations 10.1 + logits 0.0 + allowance 4 = 26.2 GB
#   stage 3: 1.20B params (1.20B trainable): weights 2.4 + grads 4.8 + optimizer 7.2 + activations 4.0 + logits 3.7 + allowance 4 = 26.1 GB
#   peak 35.3 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3_5/model_4B.json --tp 1 --pp 4 --world 8 --grad-acc 64
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3_5-4B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[8,10,10,8]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
#     --cfg.parallel_config.tp_size 1
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=4B FAMILY=internvl3_5 NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
exec bash "$(dirname "$0")/../internvl3/finetune_internvl3.sh" "$@"
