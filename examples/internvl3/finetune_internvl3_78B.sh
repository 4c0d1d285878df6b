#!/usr/bin/env bash
# Finetune InternVL3-78B: 4 nodes x 8 GPUs, TP8 (the ViT's 25 heads split unevenly) + SP x PP2, micro-batch 1 x 32 accumulation steps (the reference's).
# Memory per GPU (80 GB), from tools/memory_estimate.py (its docstring has the formulas). These are ESTIMATES
# from the parameter shapes, not measurements:
# estimate (not a measurement), per GPU, TP8 PP2 vit[[45, 0]] llm[[40, 40]] DP2, seq 4096, micro-batch 1, 32 micro-batches/step, SP, full recompute:
#   stage 0: 5.33B params (4.57B trainable): weights 10.7 + grads 18.3 + optimizer 27.4 + activations 0.9 + logits 0.0 + allowance 4 = 61.2 GB
#   stage 1: 4.54B params (4.54B trainable): weights 9.1 + grads 18.2 + optimizer 27.3 + activations 0.5 + logits 0.5 + allowance 4 = 59.5 GB
#   peak 61.2 GB of 80 GB: fits (limit 90%)
# Reproduce: python tools/memory_estimate.py examples/internvl3/model_78B.json --tp 8 --pp 2 --world 32 --grad-acc 32 --sp
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-78B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[40,40]] --cfg.parallel_config.vit_pp_layers [[45,0]] \
#     --cfg.parallel_config.tp_size 8
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=78B FAMILY=internvl3 NNODES=${NNODES:-4} TP=${TP:-8} PP=${PP:-2} GRAD_ACC_STEP=${GRAD_ACC_STEP:-32}
export EXTRA_ARGS=${EXTRA_ARGS:-"--unaligned-linear --sequence-parallel"}
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
