"""`pretrain_vlm.py --load` of MindSpeed-MM's own checkpoints (tests/helpers/mindspeed_checkpoint.py, written
by its rules): its training save (TP2 x PP2, replicated projector, uneven vocabulary rows, a pickled
Namespace) and its VPP conversion, loaded at their own layout and at others, give transformers' first loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json
from tests.helpers.launch import run_torchrun
from tests.helpers.mindspeed_checkpoint import write_mindspeed_checkpoint

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain_vlm.py"
LOSS_RTOL = 1e-5
MBS, GBS = 1, 4
SAVE_CONSUMED = 40  # tests/helpers/mindspeed_checkpoint.py's args.consumed_train_samples
PP2 = ["--pipeline-model-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]
VPP2 = [*PP2, "--virtual-pipeline-model-parallel-size", "2"]
LOADS = {
    # name: (checkpoint, ranks, vit per stage, llm per stage, flags)
    "save_same_layout": ("save", 4, [[4, 0]], [[1, 3]], [*TP2, *PP2]),
    "save_at_tp1": ("save", 1, None, None, []),
    "save_at_pp2_vpp2": ("save", 2, [[2, 2], [0, 0]], [[0, 0], [2, 2]], VPP2),
    "vpp_at_tp2": ("vpp", 2, None, None, TP2),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_load")
    run = prepare_tiny_run(root, preset="deep", seed=3, convert=False)
    original = write_tiny_checkpoint(root / "hf_original", fmt="original", preset="deep", seed=3)  # same weights
    ckpts = {"save": write_mindspeed_checkpoint(original, root / "ms_save", 2, [[4, 0]], [[1, 3]],
                                                as_training_save=True),
             "vpp": write_mindspeed_checkpoint(original, root / "ms_vpp", 2, [[2, 2], [0, 0]], [[0, 0], [2, 2]])}
    return run, ckpts


@pytest.fixture(scope="module")
def transformers_loss(tiny, tmp_path_factory):
    """Transformers' loss on the global batch the loop starts with, by where the data resumes (0 for a release,
    the save's consumed samples from its pickled args): the mean of its 4 one-sample micro-batches' losses (the
    loop's default loss mode; 4 so that the interleaved schedule has more than its warm-up; every layout below
    is DP1, so the same batch)."""
    from transformers import AutoTokenizer

    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.data import build_train_iterator
    from tests.helpers.oracle import load_native_model

    run, _ = tiny
    model = write_model_json(run.hf_dir, tmp_path_factory.mktemp("oracle") / "model.json")
    args = parse_args(pretrain_args(run, model, iters=1, mbs=MBS, gbs=GBS))
    tokenizer = AutoTokenizer.from_pretrained(run.hf_dir)
    hf = load_native_model(run.hf_dir).float().eval()
    out = {}
    for consumed in (0, SAVE_CONSUMED):
        batches = build_train_iterator(load_data_spec(args.mm_data), tokenizer, load_model_spec(model), args, 0, 1,
                                       consumed)
        losses = []
        with torch.no_grad():
            for _ in range(GBS // MBS):
                b = next(batches)
                losses.append(hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"].long(), labels=b["labels"]).loss.item())
        out[consumed] = sum(losses) / len(losses)
    assert out[0] != out[SAVE_CONSUMED]  # so that resuming at the wrong data position shows
    return out


@pytest.mark.parametrize("name", sorted(LOADS))
def test_load_gives_transformers_first_loss(tiny, transformers_loss, tmp_path, name):
    run, ckpts = tiny
    which, ranks, vit, llm, flags = LOADS[name]
    model = write_model_json(run.hf_dir, tmp_path / "model.json", vit, llm)
    metrics = tmp_path / "m.jsonl"
    # the save is at iteration 10 (a plain int in the file) with 40 samples consumed (in its args), so the run
    # resumes there for one iteration
    iters = 11 if which == "save" else 1
    consumed = SAVE_CONSUMED if which == "save" else 0
    proc = run_torchrun(PRETRAIN, ranks, pretrain_args(run, model, iters=iters, mbs=MBS, gbs=GBS, load=ckpts[which],
                                                       metrics=metrics, extra=tuple(flags)), timeout=600)
    rec = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rec] == [iters] and rec[0]["consumed_samples"] == consumed + GBS
    got, want = rec[0]["loss"], transformers_loss[consumed]
    assert abs(got - want) <= LOSS_RTOL * max(1.0, abs(want)), (name, got, want)
    notes = [line for line in (proc.stdout + proc.stderr).splitlines() if "loaded the weights only" in line]
    assert notes, proc.stdout[-2000:]
    if which == "save":
        assert "skipped" in notes[0] and "_extra_state" in notes[0], notes[0]
