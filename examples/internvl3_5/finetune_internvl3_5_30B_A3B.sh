#!/usr/bin/env bash
# Finetune InternVL3.5-30B-A3B (Qwen3-30B-A3B LLM, 128 experts, top-8): 2 nodes x 8 GPUs, TP1 x PP2 x EP8 (ETP1,
# expert-DP 1), full recompute, micro-batch 1 x 64 accumulation steps. One node does not hold it by estimate; the
# per-GPU memory estimate of this layout and of the one-node ones is in docs/model_family.md.
# Reproduce: python tools/memory_estimate.py examples/internvl3_5/model_30B_A3B.json --tp 1 --pp 2 --ep 8 --world 16 --grad-acc 64
# Convert first (any other layout loads too: --load reshards on the fly):
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3_5-30B_A3B --cfg.hf_config.hf_dir $HF_DIR \
#     --cfg.parallel_config.llm_pp_layers [[24,24]] --cfg.parallel_config.vit_pp_layers [[24,0]] \
#     --cfg.parallel_config.tp_size 1 --cfg.parallel_config.ep_size 8
# (add --cfg.dry_run true to print each rank file's size first, without reading weights)
export MODEL=30B_A3B FAMILY=internvl3_5 NNODES=${NNODES:-2} TP=${TP:-1} PP=${PP:-2} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
EP=${EP:-8}
ETP=${ETP:-1}
# EP is carved out of data parallelism (TP*DP must be a multiple of ETP*EP), so the launcher's DP and global batch stay
export EXTRA_ARGS="--expert-model-parallel-size $EP --expert-tensor-parallel-size $ETP ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/../internvl3/finetune_internvl3.sh" "$@"
