#!/usr/bin/env bash
# Finetune InternVL3-8B: 1 node x 8 GPUs, TP1 x PP4, micro-batch 1 x 64 accumulation steps (the reference's).
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP1 PP4 vit[[24, 0, 0, 0]] llm[[6, 8, 8, 6]] DP2, seq 4096, micro-batch 1, 64 micro-batches/step:
#   stage 0: 2.27B params (1.97B trainable): weights 4.5 + grads 7.9 + optimizer 11.8 + activations 20.7 + logits 0.0 + allowance 4 = 49.0 GB
#   stage 1: 1.86B params (1.86B trainable): weights 3.7 + grads 7.5 + optimizer 11.2 + activations 20.7 + logits 0.0 + allowance 4 = 47.1 GB
#   stage 2: 1.86B params (1.86B trainable): weights 3.7 + grads 7.5 + optimizer 11.2 + activations 13.8 + logits 0.0 + allowance 4 = 40.2 GB
#   stage 3: 1.94B params (1.94B trainable): weights 3.9 + grads 7.8 + optimizer 11.7 + activations 5.2 + logits 3.7 + allowance 4 = 36.2 GB
#   peak 49.0 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3/model_8B.json --tp 1 --pp 4 --world 8 --grad-acc 64
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-8B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
#     --cfg.parallel_config.tp_size 1
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=8B FAMILY=internvl3 NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
