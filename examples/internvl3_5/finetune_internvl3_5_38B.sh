#!/usr/bin/env bash
# Finetune InternVL3.5-38B: 2 nodes x 8 GPUs, TP8 (the ViT's 25 heads split unevenly) + SP x PP2, full recompute, micro-batch 1 x 64 accumulation steps.
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP8 PP2 vit[[45, 0]] llm[[30, 34]] DP1, seq 4096, micro-batch 1, 64 micro-batches/step, SP, full recompute:
#   stage 0: 2.70B params (1.94B trainable): weights 5.4 + grads 7.8 + optimizer 23.3 + activations 0.5 + logits 0.0 + allowance 4 = 40.9 GB
#   stage 1: 2.17B params (2.17B trainable): weights 4.3 + grads 8.7 + optimizer 26.0 + activations 0.3 + logits 0.5 + allowance 4 = 43.9 GB
#   peak 43.9 GB of 80 GB: fits (limit 90%)
# One node does not hold it: at TP8 x PP1 the estimate is 80.4 GB per GPU (optimizer state alone
# 49.3 GB, DP1), so the default is 2 nodes.
# Reproduce: python tools/memory_estimate.py examples/internvl3_5/model_38B.json --tp 8 --pp 2 --world 16 --grad-acc 64 --sp
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3_5-38B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[30,34]] --cfg.parallel_config.vit_pp_layers [[45,0]] \
#     --cfg.parallel_config.tp_size 8
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=38B FAMILY=internvl3_5 NNODES=${NNODES:-2} TP=${TP:-8} PP=${PP:-2} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
export EXTRA_ARGS=${EXTRA_ARGS:-"--unaligned-linear --sequence-parallel"}
exec bash "$(dirname "$0")/../internvl3/finetune_internvl3.sh" "$@"
