#!/usr/bin/env bash
# Finetune InternVL3.5-14B: 1 node x 8 GPUs, TP2 + SP x PP4 (DP1), micro-batch 1 x 128 accumulation steps.
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP2 PP4 vit[[24, 0, 0, 0]] llm[[8, 11, 11, 10]] DP1, seq 4096, micro-batch 1, 128 micro-batches/step, SP:
#   stage 0: 1.89B params (1.73B trainable): weights 3.8 + grads 6.9 + optimizer 20.8 + activations 14.8 + logits 0.0 + allowance 4 = 50.3 GB
#   stage 1: 1.82B params (1.82B trainable): weights 3.6 + grads 7.3 + optimizer 21.8 + activations 15.2 + logits 0.0 + allowance 4 = 51.9 GB
#   stage 2: 1.82B params (1.82B trainable): weights 3.6 + grads 7.3 + optimizer 21.8 + activations 10.2 + logits 0.0 + allowance 4 = 46.9 GB
#   stage 3: 2.04B params (2.04B trainable): weights 4.1 + grads 8.2 + optimizer 24.5 + activations 4.6 + logits 1.9 + allowance 4 = 47.2 GB
#   peak 51.9 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3_5/model_14B.json --tp 2 --pp 4 --world 8 --grad-acc 128 --sp
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3_5-14B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[8,11,11,10]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
#     --cfg.parallel_config.tp_size 2
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=14B FAMILY=internvl3_5 NNODES=${NNODES:-1} TP=${TP:-2} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-128}
export EXTRA_ARGS=${EXTRA_ARGS:-"--sequence-parallel"}
exec bash "$(dirname "$0")/../internvl3/finetune_internvl3.sh" "$@"
