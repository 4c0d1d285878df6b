"""The reference finetune scripts' throughput summary (MindSpeed-MM's finetune_internvl3_8B.sh), run verbatim
through bash over a training log, and the figures it must print for the metrics records of that log."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

# verbatim from MindSpeed-MM's examples/internvl3/finetune_internvl3_8B.sh
REFERENCE_SUMMARY = r"""
STEP_TIME=`grep "elapsed time per iteration" logs/train_${logfile}.log | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' | head -n 150 | tail -n 100 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
SAMPLES_PER_SECOND=`awk 'BEGIN{printf "%.3f\n", '${GBS}'*1000/'${STEP_TIME}'}'`
echo "Elapsed Time Per iteration: $STEP_TIME"
echo "Average Samples per Second: $SAMPLES_PER_SECOND"
LOG_TOKENS_PER_SECOND=`grep "tokens per sample" logs/train_${logfile}.log`
if [ "$LOG_TOKENS_PER_SECOND" ]; then
    AVERAGE_TOKENS=`grep "tokens per sample" logs/train_${logfile}.log | awk -F 'tokens per sample:' '{print$2}' | awk -F '|' '{print$1}' | head -n 150 | tail -n 100 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
    TOKENS_PER_SECOND=`awk 'BEGIN{printf "%.3f\n", '${SAMPLES_PER_SECOND}'*'${AVERAGE_TOKENS}'}'`
    echo "Consumed Tokens per Second: $TOKENS_PER_SECOND"
fi
"""


def summary(log_text: str, gbs: int, tmp: Path, script: str = REFERENCE_SUMMARY) -> dict[str, float]:
    """Run `script` (the reference's summary by default) over `log_text` as logs/train_run.log; its figures."""
    (tmp / "logs").mkdir(exist_ok=True)
    (tmp / "logs" / "train_run.log").write_text(log_text)
    out = subprocess.run(["bash", "-c", f"logfile=run\nGBS={gbs}\n{script}"], cwd=tmp, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr
    got = dict(re.findall(r"^(.*): (\S*)$", out.stdout, re.M))
    assert got["Elapsed Time Per iteration"], out.stdout  # empty when the line's layout is not Megatron's
    return {k: float(v) for k, v in got.items()}


def expected(records: list[dict], gbs: int) -> dict[str, float]:
    """What the summary must print, from the records: the figures the line rounds them to, averaged."""
    def mean_of_printed(values, fmt):
        return sum(float(format(v, fmt)) for v in values) / len(values)

    step = float(format(mean_of_printed([r["step_time_s"] * 1000 for r in records], ".1f"), ".1f"))
    sps = float(format(gbs * 1000 / step, ".3f"))
    tps = float(format(mean_of_printed([r["tokens_per_sample"] for r in records], ".6E"), ".1f"))
    return {"Elapsed Time Per iteration": step, "Average Samples per Second": sps,
            "Consumed Tokens per Second": float(format(sps * tps, ".3f"))}


def check_against_records(got: dict[str, float], records: list[dict], gbs: int) -> None:
    step_ms = 1000 * sum(r["step_time_s"] for r in records) / len(records)
    tokens = sum(r["tokens_per_sample"] for r in records) / len(records)
    assert got["Elapsed Time Per iteration"] == pytest.approx(step_ms, abs=0.1)
    assert got["Average Samples per Second"] == pytest.approx(gbs / step_ms * 1000, rel=1e-3)
    assert got["Consumed Tokens per Second"] == pytest.approx(gbs / step_ms * 1000 * tokens, rel=1e-3)


