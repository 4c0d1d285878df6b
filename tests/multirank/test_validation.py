"""Validation during training (`--eval-interval`, `--eval-iters`, the data JSON's `valid_data_path`): the loss
logged at a save is transformers' token-mean loss on the same validation samples from that save, every layout
logs the one-rank run's validation losses, and validating does not change training."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import run_torchrun
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "pretrain_vlm.py"
ITERS, EVAL_INTERVAL, EVAL_ITERS, GBS = 4, 2, 2, 4
N_VALID = 6  # fewer than EVAL_ITERS x GBS: each evaluation wraps around to the set's start
LOSS_RTOL = 1e-5
EVAL = ("--eval-interval", str(EVAL_INTERVAL), "--eval-iters", str(EVAL_ITERS))

LAYOUTS = {
    # name: (ranks, vit per stage, llm per stage, extra flags)
    "tp2_sp": (2, None, None, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2_vpp2": (2, [[2, 2], [0, 0]], [[0, 0], [2, 2]],
                 ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]),
    "cp2_ring": (2, None, None, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"]),
    "dp2_distopt": (2, None, None, ["--use-distributed-optimizer"]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run with its records split: the last N_VALID are the validation set, in their own file."""
    run = prepare_tiny_run(tmp_path_factory.mktemp("validation"), preset="deep", seed=3)
    lines = run.data_jsonl.read_text().splitlines()
    run.data_jsonl.write_text("\n".join(lines[:-N_VALID]) + "\n")
    valid = run.data_jsonl.parent / "valid.jsonl"
    valid.write_text("\n".join(lines[-N_VALID:]) + "\n")
    raw = json.loads(run.data_json.read_text())
    raw["dataset_param"]["basic_parameters"]["valid_data_path"] = str(valid)
    run.data_json.write_text(json.dumps(raw, indent=2))
    return run


def records(metrics: Path, kind: str) -> list[dict]:
    return [r for line in metrics.read_text().splitlines() if (r := json.loads(line))["record"] == kind]


def train(tiny, tmp: Path, name: str, nproc: int, vit=None, llm=None, extra=(), save=None):
    metrics = tmp / f"{name}.jsonl"
    model = write_model_json(tiny.hf_dir, tmp / f"model_{name}.json", vit, llm)
    out = run_torchrun(PRETRAIN, nproc, pretrain_args(tiny, model, iters=ITERS, gbs=GBS, load=tiny.mm_dir,
                                                      metrics=metrics, save=save, extra=tuple(extra)), timeout=600)
    return metrics, out.stdout


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """One rank, evaluating and saving every EVAL_INTERVAL iterations: (metrics file, stdout, save dir)."""
    tmp = tmp_path_factory.mktemp("single")
    metrics, stdout = train(tiny, tmp, "single", 1, save=tmp / "save",
                            extra=(*EVAL, "--save-interval", str(EVAL_INTERVAL)))
    return metrics, stdout, tmp / "save"


def test_records_and_megatron_box(single):
    metrics, stdout, _ = single
    valid = records(metrics, "validation")
    assert [r["iteration"] for r in valid] == [2, 4]  # the last iteration is a multiple: evaluated once
    for r in valid:
        assert r.keys() >= {"iteration", "validation_loss", "validation_ppl", "validation_tokens",
                            "validation_samples", "validation_s"}
        assert r["validation_samples"] == EVAL_ITERS * GBS and r["validation_tokens"] > 0
        box = (f" validation loss at iteration {r['iteration']} | lm loss value: {r['validation_loss']:.6E} | "
               f"lm loss PPL: {r['validation_ppl']:.6E} | ")
        rule = "-" * (len(box) + 1)
        assert f"{rule}\n{box}\n{rule}\n" in stdout
    assert valid[0]["validation_tokens"] == valid[1]["validation_tokens"]  # the same batches each time
    assert valid[1]["validation_loss"] < valid[0]["validation_loss"]
    assert [r["iteration"] for r in records(metrics, "train")] == [1, 2, 3, 4]


def _hf_token_mean(tiny, save: Path, iteration: int, tmp: Path) -> float:
    """transformers' loss, summed per token over the validation samples an evaluation reads (the first
    EVAL_ITERS x GBS in file order, wrapping around), over their target-token count, from the save converted
    back to HF."""
    from transformers import AutoTokenizer

    from mindspeed_mm.cli.mm_convert import MMToHFConfig, mm_to_hf
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from tests.helpers.oracle import load_native_model

    one = tmp / f"iter{iteration}"  # a save directory whose latest iteration is this one
    shutil.copytree(save / f"iter_{iteration:07d}", one / f"iter_{iteration:07d}")
    (one / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    hf_out = tmp / f"hf{iteration}"
    mm_to_hf(MMToHFConfig(mm_dir=str(one), save_hf_dir=str(hf_out), progress=False))
    hf = load_native_model(hf_out).float().eval()
    param = load_data_spec(tiny.data_json).dataset_param
    dataset = InternVLChatDataset(dataclasses.replace(param, basic_parameters=param.valid_parameters),
                                  AutoTokenizer.from_pretrained(tiny.hf_dir), seq_length=512)
    assert len(dataset) == N_VALID
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(EVAL_ITERS * GBS):
            s = dataset[i % N_VALID]
            ids, labels, pv = s["input_ids"][None], s["labels"][None], s["pixel_values"]
            loss = hf(input_ids=ids, pixel_values=pv if pv.shape[0] else None, attention_mask=torch.ones_like(ids),
                      labels=labels).loss.item()
            n = int((labels[:, 1:] != -100).sum())
            total, count = total + loss * n, count + n
    return total / count


def test_validation_loss_equals_transformers(tiny, single, tmp_path):
    metrics, _, save = single
    for r in records(metrics, "validation"):
        want = _hf_token_mean(tiny, save, r["iteration"], tmp_path)
        assert abs(r["validation_loss"] - want) <= 1e-5 * max(1.0, abs(want)), (r["iteration"], r, want)


def test_validating_leaves_training_unchanged(tiny, single, tmp_path):
    metrics, _ = train(tiny, tmp_path, "no_eval", 1)
    assert [r["loss"] for r in records(metrics, "train")] == [r["loss"] for r in records(single[0], "train")]
    assert not records(metrics, "validation")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_validation_losses_agree_across_layouts(tiny, single, tmp_path, layout):
    ranks, vit, llm, extra = LAYOUTS[layout]
    metrics, _ = train(tiny, tmp_path, layout, ranks, vit, llm, extra=(*EVAL, *extra))
    got, want = records(metrics, "validation"), records(single[0], "validation")
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        assert g["validation_tokens"] == w["validation_tokens"] and g["validation_samples"] == w["validation_samples"]
        assert abs(g["validation_loss"] - w["validation_loss"]) <= LOSS_RTOL * abs(w["validation_loss"]), (
            layout, g, w)
