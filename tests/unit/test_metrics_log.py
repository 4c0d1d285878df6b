"""The per-iteration log line is Megatron's `training_log` line: the reference finetune scripts' throughput
summary (MindSpeed-MM's finetune_internvl3_8B.sh, run verbatim through bash) reads our log and prints the
step time, samples/s and tokens/s that the metrics records hold."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from mindspeed_mm.training.metrics import MetricsLogger, iteration_line
from tests.helpers.throughput_summary import check_against_records, expected, summary

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")


def record(i: int, step_s: float, tokens_per_sample: float, gbs: int = 8, **kw) -> dict:
    r = {"iteration": i, "loss": 2.5 / i, "lr": 1e-5 * i, "grad_norm": 0.75, "tokens_per_s": 900.0,
         "samples_per_s": gbs / step_s, "step_time_s": step_s, "consumed_samples": gbs * i,
         "global_batch_size": gbs, "tokens_per_sample": tokens_per_sample, "loss_scale": 1.0,
         "skipped_samples": 0, "skipped_iterations": 0, "skipped_iterations_in_interval": 0,
         "skipped_by_reason": {}, "mem_peak_gib": 1.5}
    r.update(kw)
    return r


def test_line_has_megatrons_layout():
    r = record(3, 1.23456, 1234.5, skipped_by_reason={"too_long": 2}, skipped_samples=2)
    line = iteration_line(r, train_iters=5000, log_tps=True, now=datetime(2025, 1, 2, 3, 4, 5))
    assert line.startswith(
        " [2025-01-02 03:04:05] iteration        3/    5000 | consumed samples:           24 |"
        " elapsed time per iteration (ms): 1234.6 | learning rate: 3.000000E-05 | global batch size:     8 |"
        " tokens per sample: 1.234500E+03 | lm loss: 8.333333E-01 | loss scale: 1.0 | grad norm: 0.750 |"
        " number of skipped iterations:   0 | number of nan iterations:   0 |"), line
    assert line.endswith(" skipped samples: 2 (too_long: 2) |")
    for field in ("tokens/s: 900.0", "samples/s: 6.48", "mem peak (GiB): 1.50"):
        assert f" {field} |" in line
    assert "tokens per sample" not in iteration_line(r, train_iters=5000)
    r["loaded_by_note"] = {"truncated_image": 3}  # trained on despite the defect: after the skipped samples
    assert iteration_line(r, train_iters=5000).endswith(
        " skipped samples: 2 (too_long: 2) | loaded despite: truncated_image: 3 |")


def test_reference_summary_reads_the_logger_output(tmp_path):
    gbs = 8
    records = [record(i, step, tps, gbs) for i, (step, tps) in
               enumerate([(2.0, 900.0), (1.01234, 1024.0), (0.98766, 1000.5), (1.05, 1100.25), (0.95, 1033.0)], 1)]
    metrics = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(True, str(metrics), train_iters=10, log_tps=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for r in records:
            logger.log(r)
    logger.close()
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == records  # the JSONL is unchanged

    got = summary(out.getvalue(), gbs, tmp_path)
    assert got == expected(records, gbs)
    check_against_records(got, records, gbs)

    # our finetune script's copy: the same pipeline, its window skipping the first (start-up) line
    script = (REPO / "examples/internvl3/finetune_internvl3.sh").read_text()
    ours = summary(out.getvalue(), gbs, tmp_path, script[script.index("# ---- throughput summary"):])
    assert ours == expected(records[1:], gbs)
    check_against_records(ours, records[1:], gbs)
