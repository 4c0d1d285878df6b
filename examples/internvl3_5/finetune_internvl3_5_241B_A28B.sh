#!/usr/bin/env bash
# Finetune InternVL3.5-241B-A28B (InternViT-6B + Qwen3-235B-A22B LLM, 128 experts, top-8): 16 nodes x 8 GPUs,
# TP4 + SP x PP8 x EP8 (ETP1, expert-DP 2), full recompute, micro-batch 1 x 64 accumulation steps. 8 nodes do not
# hold it by estimate; the per-GPU memory estimate of this layout and of the smaller ones is in docs/model_family.md.
# Reproduce: python tools/memory_estimate.py examples/internvl3_5/model_241B_A28B.json --tp 4 --pp 8 --ep 8 --world 128 --grad-acc 64 --sp
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3_5-241B_A28B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[11,12,12,12,12,12,12,11]] \
#     --cfg.parallel_config.vit_pp_layers [[45,0,0,0,0,0,0,0]] \
#     --cfg.parallel_config.tp_size 4 --cfg.parallel_config.ep_size 8
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=241B_A28B FAMILY=internvl3_5 NNODES=${NNODES:-16} TP=${TP:-4} PP=${PP:-8} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
EP=${EP:-8}
ETP=${ETP:-1}
# EP is carved out of data parallelism (TP*DP must be a multiple of ETP*EP), so the launcher's DP and global batch
# stay; ETP1 keeps each expert whole while attention is cut 4 ways (the ViT's 25 heads split unevenly)
export EXTRA_ARGS="--expert-model-parallel-size $EP --expert-tensor-parallel-size $ETP ${EXTRA_ARGS:---unaligned-linear --sequence-parallel}"
exec bash "$(dirname "$0")/../internvl3/finetune_internvl3.sh" "$@"
