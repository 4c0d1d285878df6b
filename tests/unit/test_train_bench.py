"""benchmarks/train_bench.py end to end on a tiny shape: it runs, and it reports ours against transformers with
SDPA (the headline) and with eager attention, with the per-round spread and each side's step peak memory."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_bench_smoke_reports_sdpa_and_eager():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--preset", "vit300m", "--shapes", "1x20",
         "--steps", "2", "--rounds", "2", "--workers", "0", "--loader-seconds", "0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    step = next(line for line in out.stdout.splitlines() if line.startswith("train step"))
    assert re.search(r"ours \d+ ms, transformers sdpa \d+ ms, eager \d+ ms", step), step
    assert re.search(r"step peak ours \d+ MiB, sdpa \d+ MiB, eager \d+ MiB", step), step
    header = next(line for line in out.stdout.splitlines() if line.startswith("tokens/sample"))
    assert "ours/sdpa" in header and "ours/eager" in header
    row = re.compile(r"^\s*\d+ \| ([\d.]+) ([\d.]+) ([\d.]+)x\s+\| ([\d.]+) ([\d.]+) ([\d.]+)x\s+\| \d+ / \d+ / \d+$")
    rows = [m for m in map(row.match, out.stdout.splitlines()) if m]
    assert len(rows) == 1, out.stdout
    ratios = [float(x) for x in rows[0].groups()]
    assert all(r > 0 for r in ratios)
    assert ratios[0] <= ratios[1] <= ratios[2] and ratios[3] <= ratios[4] <= ratios[5]  # min <= median <= max
    assert "data loader" in out.stdout
