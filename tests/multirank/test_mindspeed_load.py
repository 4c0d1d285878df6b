"""`pretrain_vlm.py --load` of MindSpeed-MM's own checkpoints (tests/helpers/mindspeed_checkpoint.py, written
by its rules; the four cases of tests/unit/test_mindspeed_checkpoints.py): its TP2 conversion, its TP4 one (bf16,
odd vocabulary: 84/83/83/83 rows, unaligned ViT heads 2/1/1/1), its training save (TP2 x PP2, replicated
projector, uneven vocabulary rows, a pickled Namespace) and its VPP conversion, each loaded at its own layout and
at two others, give transformers' first loss."""
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
SEED = 3
SAVE_CONSUMED = 40  # tests/helpers/mindspeed_checkpoint.py's args.consumed_train_samples
PP2 = ["--pipeline-model-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]
TP4 = ["--tensor-model-parallel-size", "4"]
VPP2 = [*PP2, "--virtual-pipeline-model-parallel-size", "2"]
CASES = {
    # name: (preset, checkpoint dtype, tp, vit per stage, llm per stage, as a training save); vocab 333 (odd),
    # ViT 5 heads (unaligned at TP2 and TP4)
    "tp2": ("vit6b", "float32", 2, None, None, False),
    "tp4": ("tp4", "bfloat16", 4, None, None, False),
    "save": ("deep", "float32", 2, [[4, 0]], [[1, 3]], True),  # tp2_pp2, as MindSpeed-MM's trainer saves it
    "vpp": ("deep", "float32", 2, [[2, 2], [0, 0]], [[0, 0], [2, 2]], False),  # tp2_pp2_vpp2
}
LOADS = {
    # name: (checkpoint, ranks, vit per stage, llm per stage, flags)
    "tp2_same_layout": ("tp2", 2, None, None, TP2),
    "tp2_at_tp1": ("tp2", 1, None, None, []),
    "tp2_at_pp2": ("tp2", 2, [[2, 0]], [[1, 1]], PP2),
    "tp4_same_layout": ("tp4", 4, None, None, TP4),
    "tp4_at_tp2": ("tp4", 2, None, None, TP2),
    "tp4_at_tp1": ("tp4", 1, None, None, []),
    "save_same_layout": ("save", 4, [[4, 0]], [[1, 3]], [*TP2, *PP2]),
    "save_at_tp1": ("save", 1, None, None, []),
    "save_at_pp2_vpp2": ("save", 2, [[2, 2], [0, 0]], [[0, 0], [2, 2]], VPP2),
    "vpp_same_layout": ("vpp", 4, [[2, 2], [0, 0]], [[0, 0], [2, 2]], [*TP2, *VPP2]),
    "vpp_at_tp2": ("vpp", 2, None, None, TP2),
    "vpp_at_tp1": ("vpp", 1, None, None, []),
}


def _model_json(run, path: Path, vit=None, llm=None) -> Path:
    """The run's model spec, always fp32: a bf16 checkpoint is upcast exactly on load (as transformers' oracle
    upcasts the same bf16 weights), so the 1e-5 comparison stays about the layout, not about bf16 arithmetic."""
    write_model_json(run.hf_dir, path, vit, llm)
    raw = json.loads(path.read_text())
    raw["text_decoder"]["params_dtype"] = raw["image_encoder"]["vision_encoder"]["params_dtype"] = "fp32"
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


class _Lazy(dict):
    """A module-wide cache: each value built once, on first use, so that a -k selection builds only its own."""

    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, key):
        self[key] = value = self._build(key)
        return value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per preset, its tiny run (native HF checkpoint, data); per case, its MindSpeed-MM checkpoint, written
    from an original-format copy of the same weights (same preset, seed and dtype)."""
    def run_of(preset):
        root = tmp_path_factory.mktemp(f"ms_load_{preset}")
        dtype = {c[0]: c[1] for c in CASES.values()}[preset]
        # the run's HF checkpoint in the checkpoint's dtype (prepare_tiny_run keeps an existing one)
        write_tiny_checkpoint(root / "hf", fmt="native", preset=preset, seed=SEED, dtype=dtype)
        original = write_tiny_checkpoint(root / "hf_original", fmt="original", preset=preset, seed=SEED,
                                         dtype=dtype)  # same weights
        return prepare_tiny_run(root, preset=preset, seed=SEED, convert=False), original

    runs = _Lazy(run_of)

    def ckpt_of(name):
        preset, _, tp, vit, llm, as_save = CASES[name]
        run, original = runs[preset]
        return write_mindspeed_checkpoint(original, run.root / f"ms_{name}", tp, vit, llm, as_training_save=as_save)

    return runs, _Lazy(ckpt_of)


@pytest.fixture(scope="module")
def transformers_loss(tiny, tmp_path_factory):
    """Per (preset, where the data resumes: 0 for a release, the save's consumed samples from its pickled args),
    transformers' loss on the global batch the loop starts with: the mean of its 4 one-sample micro-batches'
    losses (the loop's default loss mode; 4 so that the interleaved schedule has more than its warm-up; every
    layout below is DP1, so the same batch)."""
    from transformers import AutoTokenizer

    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.data import build_train_iterator
    from tests.helpers.oracle import load_native_model

    runs, _ = tiny
    models = {}

    def loss_of(key):
        preset, consumed = key
        run, _ = runs[preset]
        if preset not in models:
            model = _model_json(run, tmp_path_factory.mktemp("oracle") / "model.json")
            models[preset] = model, load_native_model(run.hf_dir).float().eval()
        model, hf = models[preset]
        args = parse_args(pretrain_args(run, model, iters=1, mbs=MBS, gbs=GBS))
        tokenizer = AutoTokenizer.from_pretrained(run.hf_dir)
        batches = build_train_iterator(load_data_spec(args.mm_data), tokenizer, load_model_spec(model), args, 0, 1,
                                       consumed)
        losses = []
        with torch.no_grad():
            for _ in range(GBS // MBS):
                b = next(batches)
                losses.append(hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"].long(), labels=b["labels"]).loss.item())
        return sum(losses) / len(losses)

    return _Lazy(loss_of)


@pytest.mark.parametrize("name", LOADS)
def test_load_gives_transformers_first_loss(tiny, transformers_loss, tmp_path, name):
    runs, ckpts = tiny
    which, ranks, vit, llm, flags = LOADS[name]
    preset = CASES[which][0]
    run, _ = runs[preset]
    model = _model_json(run, tmp_path / "model.json", vit, llm)
    metrics = tmp_path / "m.jsonl"
    # the save is at iteration 10 (a plain int in the file) with 40 samples consumed (in its args), so the run
    # resumes there for one iteration
    iters = 11 if which == "save" else 1
    consumed = SAVE_CONSUMED if which == "save" else 0
    if which == "save":  # so that resuming at the wrong data position shows
        assert transformers_loss[preset, 0] != transformers_loss[preset, SAVE_CONSUMED]
    proc = run_torchrun(PRETRAIN, ranks, pretrain_args(run, model, iters=iters, mbs=MBS, gbs=GBS, load=ckpts[which],
                                                       metrics=metrics, extra=tuple(flags)), timeout=600)
    rec = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rec] == [iters] and rec[0]["consumed_samples"] == consumed + GBS
    got, want = rec[0]["loss"], transformers_loss[preset, consumed]
    assert abs(got - want) <= LOSS_RTOL * max(1.0, abs(want)), (name, got, want)
    notes = [line for line in (proc.stdout + proc.stderr).splitlines() if "loaded the weights only" in line]
    assert notes, proc.stdout[-2000:]
    if which == "save":
        assert "skipped" in notes[0] and "_extra_state" in notes[0], notes[0]
