#!/usr/bin/env bash
# Installs (scripts/install.sh) and runs the whole test suite, slow multi-rank tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q --durations=25 "$@"
