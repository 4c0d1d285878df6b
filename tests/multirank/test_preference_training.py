"""`pretrain_vlm.py --training-mode mpo` end to end on the tiny MMPR pairs: 3 iterations at TP2 + SP, PP2 x
VPP2, CP2 (ring) and DP2 with the distributed optimizer equal one rank within 1e-5 relative, for each
reference: a frozen copy, log-probabilities precomputed in a first pass (the same losses as the copy), and,
with LoRA, the base with its adapters off. Resuming is bit-exact (the reward baseline is in the save), the
reference's weights are checked unchanged at the end of every run, and bad pairs are counted skips. (The loss
itself against TRL and transformers: tests/oracle/test_preference_vs_transformers.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_preference_run, write_model_json
from tests.helpers.launch import run_torchrun
from tests.helpers.torch_files import saved_tensors

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain_vlm.py"
RTOL = 1e-5
LORA = ("--use-llm-lora", "4", "--use-backbone-lora", "2", "--lora-dropout", "0", "--lr", "1e-2")
MODES = {"copy": ("--reference-model", "copy"), "precomputed": ("--reference-model", "precomputed"),
         "adapters_off": LORA + ("--reference-model", "adapters_off")}
LAYOUTS = {
    "tp2_sp": (2, ("--tensor-model-parallel-size", "2", "--sequence-parallel"), None),
    "pp2_vpp2": (2, ("--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"),
                 ([[2, 2], [0, 0]], [[0, 0], [2, 2]])),
    "cp2": (2, ("--context-parallel-size", "2"), None),
    "dp2_distopt": (2, ("--use-distributed-optimizer",), None),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_preference_run(tmp_path_factory.mktemp("mpo"), preset="deep", seed=3)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(tiny, out: Path, name: str, nproc: int, extra=(), layers=None, iters: int = 3, **kw) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    model = write_model_json(tiny.hf_dir, out / f"model_{name}.json", *(layers or (None, None)))
    metrics = out / f"{name}.jsonl"
    run_torchrun(PRETRAIN, nproc, pretrain_args(tiny, model, iters=iters, metrics=metrics, load=kw.pop("load",
                 tiny.mm_dir), extra=("--training-mode", "mpo") + tuple(extra), **kw), timeout=600)
    return records(metrics)


@pytest.fixture(scope="module")
def one_rank(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    runs = {m: train(tiny, out, m, 1, MODES[m], save=out / m) for m in MODES}
    return out, runs


def test_one_rank_metrics_and_the_precomputed_reference(one_rank):
    _, runs = one_rank
    copy, pre = runs["copy"], runs["precomputed"]
    assert [r["iteration"] for r in copy] == [1, 2, 3]
    for key in ("loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in copy + pre), key
    # step 1: the policy is its reference: every reward 0, sigmoid log 2, bco_pair 2 log 2
    assert copy[0]["rewards/chosen"] == 0.0 and copy[0]["rewards/margins"] == 0.0
    assert copy[0]["loss/sigmoid"] == pytest.approx(0.6931472, rel=1e-6)
    assert copy[0]["loss/bco_pair"] == pytest.approx(2 * 0.6931472, rel=1e-6)
    assert copy[-1]["rewards/margins"] != 0.0 and copy[-1]["loss"] < copy[0]["loss"]
    for a, b in zip(pre, copy):  # the same reference numbers, from a first pass instead of a copy
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL), (a["loss"], b["loss"])
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)
    lora = runs["adapters_off"]
    assert lora[0]["loss/sigmoid"] == pytest.approx(0.6931472, rel=1e-6)  # B = 0: the adapters start as no-ops
    assert lora[-1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_rank(tiny, tmp_path, one_rank, mode, layout):
    _, runs = one_rank
    nproc, flags, layers = LAYOUTS[layout]
    if mode == "precomputed":  # its first pass runs at the layout too
        flags = flags + ("--reference-logps", str(tmp_path / "ref_logps.json"))
    got = train(tiny, tmp_path, f"{mode}_{layout}", nproc, MODES[mode] + flags, layers)
    want = runs[mode]
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for r, w in zip(got, want):
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins"):
            assert r[key] == pytest.approx(w[key], rel=RTOL, abs=1e-6), (key, r["iteration"], r[key], w[key])
    if mode == "precomputed":
        assert (tmp_path / "ref_logps.json").is_file()


def test_resume_is_bit_exact(tiny, tmp_path, one_rank):
    out, runs = one_rank
    a = train(tiny, tmp_path, "a", 1, MODES["copy"] + ("--exit-interval", "2"), save=tmp_path / "half")
    b = train(tiny, tmp_path, "b", 1, MODES["copy"], save=tmp_path / "half", load=tmp_path / "half")
    assert [r["iteration"] for r in a + b] == [1, 2, 3]
    assert [r["loss"] for r in a + b] == [r["loss"] for r in runs["copy"]]
    assert [r["bco_reward_mean"] for r in a + b] == [r["bco_reward_mean"] for r in runs["copy"]]
    x, y = saved_tensors(out / "copy", 3), saved_tensors(tmp_path / "half", 3)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_pairs_are_counted(tmp_path_factory):
    tiny = prepare_tiny_preference_run(tmp_path_factory.mktemp("mpo_broken"), preset="vit6b", seed=4, broken=True,
                                       shuffle=False)
    out = tmp_path_factory.mktemp("broken_out")
    got = train(tiny, out, "broken", 1, ("--global-batch-size", "16"), iters=1)
    skipped = got[-1]["skipped_by_reason"]
    assert skipped.get("malformed_pair", 0) >= 1 and skipped.get("identical_pair", 0) >= 1, skipped
    assert skipped.get("malformed", 0) >= 1, skipped
