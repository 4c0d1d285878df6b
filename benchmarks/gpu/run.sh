#!/usr/bin/env bash
# The GPU check: one script for one lent GPU (no internet there), under 8 minutes.
#   bash benchmarks/gpu/run.sh [--dry-run] [--wheels DIR] [--out DIR]
# (a) the oracle tests on CUDA in fp32 (tests/oracle/test_model_vs_transformers.py, MM_TEST_DEVICE=cuda) and a
#     bf16 tolerance check against transformers (bf16_check.py);
# (b) an InternVL3-2B-shaped random model's bf16 training step, 4096 tokens with 12 tiles: tokens/s, TFLOP/s,
#     MFU against transformers' SDPA step (train_step.py);
# (c) decode tokens/s against transformers' generate (decode.py).
# Results: OUT/results.json and a table. --dry-run: the same steps on CPU with the "vit300m" tiny preset, short
# sequences and a couple of steps (what tests/unit/test_gpu_script.py runs).
# megatron-core is installed, when missing, from a local wheel directory: --wheels DIR, MM_WHEEL_DIR, or
# benchmarks/gpu/wheels (fill it here with benchmarks/gpu/collect_wheels.sh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dry=0
wheels="${MM_WHEEL_DIR:-$here/wheels}"
out="${MM_GPU_OUT:-$root/out/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --wheels) wheels="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
py="${PYTHON:-python}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing may be fetched on the lent machine
mkdir -p "$out"
cd "$root"

if [ $dry = 1 ]; then
  device=cpu; ckpt_preset=vit300m; bf16_presets=vit300m
  oracle_k="vit300m and not qwen3 and not internlm3 and not moe"
  train_args=(--tiles 2 --tokens 64 --steps 1 --warmup 1); decode_args=(--new-tokens 8 --repeats 1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
else
  device=cuda; ckpt_preset=internvl3_2b_shape; bf16_presets=small,vit6b
  oracle_k=""
  train_args=(--tiles 12 --tokens 4096 --steps 5 --warmup 2); decode_args=(--new-tokens 128 --repeats 3)
fi

failed=()
step() {  # step NAME CMD...: runs and times one section; a failure is recorded and the rest still run
  local name="$1"; shift
  echo "=== $name"
  local t0=$SECONDS
  "$@"
  local rc=$?
  echo "=== $name: exit $rc, $((SECONDS - t0)) s"
  [ $rc = 0 ] || failed+=("$name")
}

install_megatron() {
  if "$py" -c "import megatron.core" 2>/dev/null; then
    "$py" -c "import megatron.core, torch, transformers; print('megatron-core', megatron.core.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    return
  fi
  "$py" -m pip install --no-index --find-links "$wheels" --no-deps "megatron-core==0.16.1"
}

oracle() {
  local k=()
  [ -n "$oracle_k" ] && k=(-k "$oracle_k")
  MM_TEST_DEVICE=$device "$py" -m pytest -q -p no:cacheprovider tests/oracle/test_model_vs_transformers.py \
    "${k[@]}" --junitxml "$out/oracle.xml"
  local rc=$?
  "$py" - "$out/oracle.xml" "$out/oracle.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s[0]
n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
r = {"section": "oracle", "passed": n - f - e - sk, "failed": f + e, "skipped": sk, "seconds": float(s.get("time", 0))}
open(sys.argv[2], "w").write(json.dumps(r) + "\n")
print("[oracle]", json.dumps(r))
PY
  return $rc
}

step install install_megatron
step "oracle fp32 ($device)" oracle
step "bf16 tolerance" "$py" "$here/bf16_check.py" --presets "$bf16_presets" --device $device --out "$out/bf16.json"
step "checkpoint $ckpt_preset" "$py" "$here/common.py" "$ckpt_preset" "$out/ckpt"
step "train step" "$py" "$here/train_step.py" --hf-dir "$out/ckpt" --device $device "${train_args[@]}" \
  --out "$out/train.json"
step decode "$py" "$here/decode.py" --hf-dir "$out/ckpt" --device $device "${decode_args[@]}" --out "$out/decode.json"
rm -rf "$out/ckpt"  # gigabytes at the 2B shape

parts=()
for s in oracle bf16 train decode; do [ -f "$out/$s.json" ] && parts+=("$out/$s.json"); done
"$py" "$here/report.py" "$out/results.json" "${parts[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all sections passed in $SECONDS s"
