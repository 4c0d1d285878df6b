"""`evaluate_vlm.py` under torchrun: the same predictions.jsonl and score.json, byte for byte, from one instance,
two and four instances, one TP2 instance and one PP2 instance (both resharded from the TP1 checkpoint at
load), at batch sizes 1 and 4; and a run killed after its second batch resumes, answering only the missing
items, into the files a clean run writes. (One instance against transformers:
tests/oracle/test_evaluation_vs_transformers.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.testing.tiny_benchmarks import corrupt_copies, write_eval_json, write_tiny_benchmarks
from tests.helpers.launch import run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "evaluate_vlm.py"
NAMES = ("MMBench_DEV_EN", "MME", "TextVQA_VAL", "MVBench_tiny")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mindspeed_mm.testing.tiny_run import prepare_tiny_run

    root = tmp_path_factory.mktemp("eval_instances")
    run = prepare_tiny_run(root / "run", preset="vit300m")
    benches = write_tiny_benchmarks(root / "bench")
    return {"root": root, "json": write_eval_json(root / "eval.json", run.mm_dir, run.hf_dir, batch_size=4),
            "benches": benches}


def evaluate(setup, work: str, nproc: int, *extra: str, env=None, check: bool = True):
    args = ["--mm-model", str(setup["json"]), "--work-dir", str(setup["root"] / work), "--no-progress"]
    for name in NAMES:
        args += ["--benchmark", str(setup["benches"][name])]
    try:
        return run_torchrun(SCRIPT, nproc, args + list(extra), env=env, timeout=300)
    except AssertionError:
        if check:
            raise
        return None


def outputs(setup, work: str) -> dict[str, str]:
    return {f"{n}/{f}": (setup["root"] / work / n / f).read_text(encoding="utf-8")
            for n in NAMES for f in ("predictions.jsonl", "score.json")}


def metrics(setup, work: str) -> list[dict]:
    return [json.loads(line) for line in (setup["root"] / work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup):
    r = evaluate(setup, "one", 1)
    assert "MMBench_DEV_EN | MCQ" in r.stdout and "items/s" in r.stdout  # the summary table
    return outputs(setup, "one")


@pytest.mark.parametrize("work,nproc,extra", [
    ("two_instances", 2, ()),
    ("four_instances_batch1", 4, ("--batch-size", "1")),
    ("tp2", 2, ("--tensor-model-parallel-size", "2")),
    ("pp2", 2, ("--pipeline-model-parallel-size", "2")),
])
def test_same_files_at_every_layout(setup, reference, work, nproc, extra):
    evaluate(setup, work, nproc, *extra)
    assert outputs(setup, work) == reference
    m = metrics(setup, work)
    instances = {"two_instances": 2, "four_instances_batch1": 4}.get(work, 1)
    assert [r["instances"] for r in m] == [instances] * len(NAMES)
    assert [r["answered_now"] for r in m] == [json.loads(reference[f"{n}/score.json"])["items"] for n in NAMES]


def test_killed_run_resumes_with_only_the_missing_items(setup, reference):
    work = "resumed"
    # every instance's writer kills its process (SIGKILL) after its second batch of the first benchmark
    assert evaluate(setup, work, 2, "--batch-size", "1", env={"MM_EVAL_KILL_AFTER_BATCHES": "2"},
                    check=False) is None
    parts = setup["root"] / work / NAMES[0] / "parts"
    before = sum(len(p.read_text().splitlines()) for p in parts.glob("*.jsonl"))
    total = json.loads(reference[f"{NAMES[0]}/score.json"])["items"]
    assert 0 < before < total
    assert not (setup["root"] / work / NAMES[0] / "predictions.jsonl").exists()
    evaluate(setup, work, 2, "--batch-size", "1")
    first = metrics(setup, work)[0]
    assert first["benchmark"] == NAMES[0] and first["answered_now"] == total - before
    assert outputs(setup, work) == reference


def _cli(setup, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--mm-model", str(setup["json"]), "--work-dir",
                           str(setup["root"] / "bad"), *args], capture_output=True, text=True, timeout=120)


def test_bad_files_are_one_line_and_status_2(setup):
    bad = corrupt_copies(setup["benches"]["MMBench_DEV_EN"], setup["root"] / "bad_files")
    for case, needle in (("missing_column", "missing column 'question'"), ("empty", "empty file")):
        r = _cli(setup, "--benchmark", str(bad[case]))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(bad[case]) in lines[0], r.stderr
    r = _cli(setup, "--benchmark", str(setup["root"] / "nowhere.tsv"))
    assert r.returncode == 2 and "benchmark file not found" in r.stderr
    r = _cli(setup, "--benchmark", str(setup["benches"]["MME"]), "--pipeline-model-parallel-size", "2")
    assert r.returncode == 2 and "TP1 x PP2 (2 processes), but this run has 1" in r.stderr, r.stderr
