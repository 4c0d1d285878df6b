#!/usr/bin/env bash
# Score InternVL3 on VLMEvalKit benchmark TSVs with evaluate_vlm.py (docs/evaluation.md).
#
#   bash examples/internvl3/evaluate_internvl.sh tiny      # a tiny random model on six small TSVs, 2 instances, CPU
#   MM_MODEL=inference_8B.json BENCHMARKS="LMUData/MMBench_DEV_EN.tsv LMUData/MME.tsv" NPROC=8 \
#     bash examples/internvl3/evaluate_internvl.sh          # 8 processes: 8 instances of a TP1 checkpoint
#
# WORK_DIR (default out/eval) holds the predictions, scores and part files; rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${1:-}" = tiny ]; then
  OUT=out/tiny_eval
  "$PY" - "$OUT" <<'PYTHON'
import sys
from pathlib import Path
from mindspeed_mm.testing.tiny_run import prepare_tiny_run
from mindspeed_mm.testing.tiny_benchmarks import write_eval_json, write_tiny_benchmarks
out = Path(sys.argv[1])
run = prepare_tiny_run(out / "run", preset="vit300m")
names = write_tiny_benchmarks(out / "bench")
write_eval_json(out / "eval.json", run.mm_dir, run.hf_dir, batch_size=4)
(out / "benchmarks.txt").write_text(" ".join(str(p) for p in names.values()))
PYTHON
  MM_MODEL=$OUT/eval.json
  BENCHMARKS=$(cat "$OUT/benchmarks.txt")
  NPROC=${NPROC:-2}
  WORK_DIR=${WORK_DIR:-$OUT/work}
  rm -rf "$WORK_DIR"
fi

MM_MODEL=${MM_MODEL:-examples/internvl3/inference_8B.json}
NPROC=${NPROC:-1}
WORK_DIR=${WORK_DIR:-out/eval}
args=()
for b in ${BENCHMARKS:?set BENCHMARKS to one or more VLMEvalKit TSV files}; do args+=(--benchmark "$b"); done
torchrun --standalone --nproc_per_node "$NPROC" evaluate_vlm.py --mm-model "$MM_MODEL" --work-dir "$WORK_DIR" \
  "${args[@]}" ${EXTRA_ARGS:-}
