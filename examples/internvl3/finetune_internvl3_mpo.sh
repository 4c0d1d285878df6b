#!/usr/bin/env bash
# MPO for InternVL3-8B after SFT (InternVL3's recipe: sigmoid + bco_pair weighted 0.8/0.2 plus the generation
# loss, rpo_alpha 1, beta 0.1), on MMPR pairs (examples/internvl3/data_mpo_8B.json: records with image,
# question, chosen, rejected), with a frozen reference copy at the run's layout (docs/training.md#preference-optimization-dpo-mpo).
# The layout and sizes are the SFT script's; a pair counts as one sample of the global batch. LOAD_PATH: the SFT
# save (or a conversion) to start from; REFERENCE=precomputed stores the reference log-probabilities instead of
# holding a copy, REFERENCE=adapters_off with LoRA (EXTRA_ARGS="--use-llm-lora 16").
export MODEL=8B FAMILY=internvl3 NNODES=${NNODES:-1} TP=${TP:-1} PP=${PP:-4} GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
export MM_DATA=${MM_DATA:-examples/internvl3/data_mpo_8B.json}
export EXTRA_ARGS="--training-mode mpo --finetune --reference-model ${REFERENCE:-copy} ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/finetune_internvl3.sh" "$@"
