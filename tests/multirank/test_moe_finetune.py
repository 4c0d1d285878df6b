"""pretrain_vlm.py on the tiny Qwen3-MoE (8 experts, top-2, layer 0 dense): expert parallelism through the
real command line (flags, groups, the mm-convert checkpoint resharded on load, the step log and metrics file, the
final save and its conversion back to HF) against one rank, and the expert-load figures against what the step's
tokens allow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_mm.checkpoint.convert import mm_to_hf
from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json
from tests.helpers.launch import run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain_vlm.py"
RTOL = 1e-5
TOPK = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("moe_finetune"), preset="qwen3_moe_vit300m", seed=3)


def _train(tiny, tmp_path: Path, name: str, nproc: int, extra=(), llm=None, vit=None):
    """(train records, stdout, the final save converted to HF tensors)."""
    metrics, save = tmp_path / f"{name}.jsonl", tmp_path / f"save_{name}"
    model = write_model_json(tiny.hf_dir, tmp_path / f"model_{name}.json", vit, llm)
    out = run_torchrun(PRETRAIN, nproc, pretrain_args(tiny, model, iters=3, metrics=metrics, load=tiny.mm_dir,
                                                      save=save, extra=tuple(extra)), timeout=600)
    rec = [json.loads(line) for line in metrics.read_text().splitlines()]
    mm_to_hf(str(save), str(tmp_path / f"hf_{name}"), progress=False)
    return [r for r in rec if r.get("record") == "train"], out.stdout, load_hf_checkpoint(tmp_path / f"hf_{name}")[2]


@pytest.fixture(scope="module")
def one_rank(tiny, tmp_path_factory):
    return _train(tiny, tmp_path_factory.mktemp("one"), "one", 1)


def test_expert_load_counts_every_routed_token_once(one_rank):
    rec, stdout, _ = one_rank
    assert len(rec) == 3
    for r in rec:
        tokens = round(r["tokens_per_s"] * r["step_time_s"])  # the step's real tokens (no padding)
        assert sorted(r["expert_load"]) == ["1", "2"]  # the sparse layers
        for layer, counts in r["expert_load"].items():
            assert len(counts) == 8 and sum(counts) == TOPK * tokens, (layer, counts, tokens)
        assert r["expert_load_min"] == [min(c) for c in r["expert_load"].values()]
        assert r["expert_load_max"] == [max(c) for c in r["expert_load"].values()]
        assert r["load_balancing_loss"] > 0
    assert stdout.count(" load balancing loss: ") == 3 and " expert load min/max: " in stdout


LAYOUTS = {
    "ep2": (2, ["--expert-model-parallel-size", "2"], None, None),
    "ep2_pp2": (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], [2, 1], [2, 0]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_first_three_steps_agree_with_one_rank(tiny, tmp_path, one_rank, layout):
    nproc, extra, llm, vit = LAYOUTS[layout]
    got, _, saved = _train(tiny, tmp_path, layout, nproc, extra, llm, vit)
    for g, w in zip(got, one_rank[0], strict=True):
        assert abs(g["loss"] - w["loss"]) <= RTOL * abs(w["loss"]), (layout, g["loss"], w["loss"])
        assert g["expert_load"] == w["expert_load"]
        assert abs(g["load_balancing_loss"] - w["load_balancing_loss"]) <= RTOL * w["load_balancing_loss"]
    # the layout's save (its rank files: megatron's _ZZZ expert directories) back in HF: the one rank's weights
    want = one_rank[2]
    assert saved.keys() == want.keys()
    worst = max((saved[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= 1e-6, worst
