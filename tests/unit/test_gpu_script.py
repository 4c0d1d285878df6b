"""benchmarks/gpu/run.sh --dry-run: every section of the GPU check, on CPU with a tiny model, so that the script
a lent GPU runs once is known to work end to end before it gets there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MM_TEST_DEVICE": "cpu"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for line in ("fp32 tests (passed / failed)", "mean |logit err| vs fp32", "tokens/s", "TFLOP/s", "MFU",
                 "decode tokens/s", "all sections passed"):
        assert line in p.stdout, line
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["oracle"]["passed"] > 0 and r["oracle"]["failed"] == 0
    assert r["bf16"]["ok"]
    assert r["train"]["ours"]["tokens_per_s"] > 0 and r["train"]["transformers_sdpa"]["tflops"] > 0
    assert r["decode"]["decode_tokens_per_s"]["ours, KV cache"] > 0
