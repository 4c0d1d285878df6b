"""Packed training through `pretrain_vlm.py`: the first iteration's per-token loss over packs equals transformers'
loss on the same samples run one by one, at one rank and at TP2 + SP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import run_torchrun
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain_vlm.py"
PACKS_PER_MB, MICRO = 1, 2  # 2 packs per step: one per micro-batch


def _packed_data_json(run, path: Path) -> Path:
    raw = json.loads(run.data_json.read_text())
    raw["dataset_param"].update(use_packed_ds=True, max_packed_tokens=1024, num_images_expected=16,
                                max_buffer_size=4)
    path.write_text(json.dumps(raw, indent=2))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("packed"), preset="vit300m", seed=5)


def _first_step_packs(run, model: Path, data: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.data import build_train_iterator

    argv = pretrain_args(run, model, iters=1, mbs=PACKS_PER_MB, gbs=PACKS_PER_MB * MICRO)
    argv[argv.index("--mm-data") + 1] = str(data)
    args = parse_args(argv)
    batches = build_train_iterator(load_data_spec(args.mm_data), AutoTokenizer.from_pretrained(run.hf_dir),
                                   load_model_spec(model), args, 0, 1, 0, num_micro=MICRO)
    return [next(batches) for _ in range(MICRO)]


def _samples(pack: dict, tokens_per_tile: int, img_context_id: int):
    """(input_ids [1, s], labels [1, s], tiles) of each sample of each row, in order."""
    flags = pack["image_flags"]
    tiles = pack["pixel_values"][flags.view(-1) != 0] if pack["pixel_values"] is not None else None
    used = 0
    for row in range(pack["input_ids"].shape[0]):
        ids, labels, sid = pack["input_ids"][row], pack["labels"][row], pack["sample_ids"][row]
        for k in range(int(sid.max()) + 1):
            keep = sid == k
            n = int((ids[keep] == img_context_id).sum()) // tokens_per_tile
            yield ids[keep][None], labels[keep][None], (tiles[used:used + n] if n else None)
            used += n


def test_first_packed_loss_equals_transformers_one_sample_at_a_time(tiny, tmp_path):
    from mindspeed_mm.config.model_spec import load_model_spec
    from tests.helpers.oracle import load_native_model

    model = write_model_json(tiny.hf_dir, tmp_path / "model.json")
    data = _packed_data_json(tiny, tmp_path / "data_packed.json")
    spec = load_model_spec(model)
    packs = _first_step_packs(tiny, model, data)
    assert all(p["sample_ids"] is not None for p in packs)
    assert sum(int(p["num_samples"]) for p in packs) > len(packs)  # several samples share a pack

    hf = load_native_model(tiny.hf_dir).float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for pack in packs:
            for ids, labels, tiles in _samples(pack, spec.tokens_per_tile, spec.img_context_token_id):
                n = int((labels[:, 1:] != -100).sum())
                out = hf(input_ids=ids, pixel_values=tiles, labels=labels)
                total += out.loss.item() * n
                count += n
    want = total / count

    got = {}
    for name, ranks, extra in (("one", 1, []), ("tp2sp", 2, ["--tensor-model-parallel-size", "2",
                                                               "--sequence-parallel"])):
        metrics = tmp_path / f"{name}.jsonl"
        argv = pretrain_args(tiny, model, iters=1, mbs=PACKS_PER_MB, gbs=PACKS_PER_MB * MICRO, load=tiny.mm_dir,
                             metrics=metrics, extra=("--calculate-per-token-loss", *extra))
        argv[argv.index("--mm-data") + 1] = str(data)
        run_torchrun(PRETRAIN, ranks, argv, timeout=600)
        rec = json.loads(metrics.read_text().splitlines()[0])
        got[name] = rec["loss"]
        assert rec["samples_per_step"] == sum(int(p["num_samples"]) for p in packs)
        assert rec["packs_per_step"] == len(packs) and 0.0 <= rec["padding_fraction"] < 1.0
    for name, loss in got.items():
        assert abs(loss - want) <= 1e-5 * max(1.0, abs(want)), (name, loss, want)
