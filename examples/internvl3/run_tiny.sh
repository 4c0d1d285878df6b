#!/usr/bin/env bash
# The tiny built-in default on CPU, nothing downloaded: install, then (tiny_demo.py) write a tiny random
# InternVL3 checkpoint and train it for a few steps on 2 ranks at TP2 + SP with distributed Adam.
# The convert -> finetune -> infer pipeline joins this script as those commands land (see README).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install.sh
# megatron-core warns at import about every optional accelerator it does not find: keep the demo readable.
PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning" OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" \
  examples/internvl3/tiny_demo.py "${OUT:-out/tiny}"
