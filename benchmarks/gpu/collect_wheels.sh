#!/usr/bin/env bash
# Collects the wheels run.sh installs on a machine without internet (megatron-core is the one package the lent
# machine lacks). Run it here, then ship the directory with the tree:
#   bash benchmarks/gpu/collect_wheels.sh [DIR]      (default: benchmarks/gpu/wheels)
# megatron-core publishes wheels per Python version: PYTHON_VERSION (default 3.12, the lent machine's) picks it.
# --no-deps: its dependencies (torch, numpy, packaging) are on the lent machine already.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/wheels}"
mkdir -p "$dir"
pip="${PIP:-python -m pip}"
$pip download "megatron-core==0.16.1" --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" -d "$dir" \
  || $pip wheel "megatron-core==0.16.1" --no-deps -w "$dir"  # no wheel for that Python: build one from the sdist
ls -l "$dir"
