"""Packed data: packs never cut a sample and keep their limits, each sample of an epoch is in exactly one pack
or counted as dropped, deterministic by seed, resumed bit-exactly from the saved state (only buffered samples
rebuilt), the step's packs balanced over DP by tiles, the collate's `sample_ids`, the data JSON's fields."""
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.data.collate import collate_packed
from mindspeed_mm.data.data_spec import DataSpecError, PackingParam, load_data_spec
from mindspeed_mm.data.dataset import InternVLChatDataset, _Skip
from mindspeed_mm.data.packing import (
    Item,
    PackedLoader,
    assign_packs,
    pack_stream,
    padding_fraction,
    tile_imbalance,
)
from mindspeed_mm.data.template import IGNORE_INDEX

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"


def synthetic_mix(n: int, seed: int = 0, tokens_per_tile: int = 256) -> tuple[list[int], list[int]]:
    """Token lengths 64-4096 and 0-13 tiles: text log-uniform in [64, 4096] plus the tiles' tokens, clipped."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 14, n)
    text = np.exp(rng.uniform(np.log(64), np.log(4096), n)).astype(int)
    tokens = np.clip(text + tokens_per_tile * tiles, 64, 4096)
    return tokens.tolist(), tiles.tolist()


class FakeDataset(torch.utils.data.Dataset):
    """Samples of given lengths and tiles; token ids encode (index, offset) so any mix-up shows; `bad` indices
    are skipped as the real dataset skips; counts every build."""

    def __init__(self, tokens, tiles, bad=()):
        self.tokens, self.tiles, self.bad = list(tokens), list(tiles), set(bad)
        self.builds: list[int] = []

    def __len__(self):
        return len(self.tokens)

    def build(self, j):
        self.builds.append(j)
        if j in self.bad:
            raise _Skip("bad_image", f"sample {j} is broken")
        n, t = self.tokens[j], self.tiles[j]
        ids = torch.arange(n, dtype=torch.long) + 10_000 * j
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "num_image_tokens": 0,
                "pixel_values": torch.full((t, 3, 2, 2), float(j)), "image_flags": torch.ones(t, dtype=torch.long)}


def _param(**kw):
    base = dict(use_packed_ds=True, max_packed_tokens=8192, num_images_expected=40, max_buffer_size=20,
                strict_mode=False, replacement=False, allow_overflow=False, packing_algorithm="best_fit")
    base.update(kw)
    return PackingParam(**base)


def _loaders(ds, param, dp, mbs=1, num_micro=2, seed=3, state=None):
    return [PackedLoader(ds, param, mbs, num_micro, r, dp, seed, pad_id=0, state=copy.deepcopy(state))
            for r in range(dp)]


def _check_batch(mb, ds, param):
    ids, labels, sid = mb["input_ids"], mb["labels"], mb["sample_ids"]
    assert sid.shape == ids.shape and mb["num_packs"] == ids.shape[0]
    assert mb["num_samples"] == sum(len(r) for r in mb["sample_positions"])
    tile_rows = []
    for r, positions in enumerate(mb["sample_positions"]):
        real = sid[r] >= 0
        n = int(real.sum())
        assert bool(real[:n].all()) and not bool(real[n:].any()), "padding only on the right"
        assert (ids[r, n:] == 0).all() and (labels[r, n:] == IGNORE_INDEX).all()
        assert n <= param.max_packed_tokens or (param.allow_overflow and len(positions) == 1)
        assert mb["attention_mask"][r].tolist() == real.tolist()
        start = 0
        for k in range(len(positions)):
            seg = (sid[r] == k).nonzero().flatten()
            j = int(ids[r, seg[0]]) // 10_000
            assert seg.tolist() == list(range(start, start + ds.tokens[j])), "a whole sample, contiguous"
            assert ids[r, seg].tolist() == (torch.arange(ds.tokens[j]) + 10_000 * j).tolist()
            start += ds.tokens[j]
            tile_rows += [j] * ds.tiles[j]
        tiles = sum(ds.tiles[int(ids[r, (sid[r] == k).nonzero()[0, 0]]) // 10_000] for k in range(len(positions)))
        assert tiles <= param.num_images_expected or (param.allow_overflow and len(positions) == 1)
    assert mb["num_tokens"] == int((sid >= 0).sum())
    if tile_rows:
        assert mb["pixel_values"][:, 0, 0, 0].tolist() == [float(j) for j in tile_rows], "row-major tile order"
    assert mb["num_tiles"] == len(tile_rows)


@pytest.mark.parametrize("algorithm", ["greedy", "best_fit"])
@pytest.mark.parametrize("dp", [1, 2])
def test_each_sample_once_per_epoch_whole_and_within_limits(algorithm, dp):
    tokens, tiles = synthetic_mix(300, seed=1)
    tokens[5], tokens[6], tiles[7] = 9000, 9999, 41  # over the limits: dropped and counted
    ds = FakeDataset(tokens, tiles, bad={11, 12})
    param = _param(packing_algorithm=algorithm)
    loaders = _loaders(ds, param, dp)
    seen, dropped, steps = [], {}, 0
    while len([p for p in seen if p < len(ds)]) < len(ds) - 5:
        for loader in loaders:
            for mb in loader.next_step():
                _check_batch(mb, ds, param)
                seen += [p for row in mb["sample_positions"] for p in row]
                for k, v in mb["skipped"].items():
                    dropped[k] = dropped.get(k, 0) + v
        steps += 1
    # the last step reads on into the next epoch: its drops are reported too
    reasons = {5: "over_max_packed_tokens", 6: "over_max_packed_tokens", 7: "over_num_images_expected",
               11: "bad_image", 12: "bad_image"}
    read = loaders[0].position
    expected = {}
    for epoch in range(read // len(ds) + 1):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        for p in range(epoch * len(ds), min(read, (epoch + 1) * len(ds))):
            if order[p % len(ds)] in reasons:
                expected[reasons[order[p % len(ds)]]] = expected.get(reasons[order[p % len(ds)]], 0) + 1
    assert dropped == expected and read >= len(ds)
    first = [p for p in seen if p < len(ds)]
    assert sorted(first) == sorted(set(first)) and len(first) == len(ds) - 5
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()
    assert {order[p] for p in first} == set(range(len(ds))) - set(reasons)


def test_allow_overflow_puts_an_over_limit_sample_alone():
    tokens, tiles = [100, 9000, 200, 50, 60], [1, 2, 0, 45, 1]
    ds = FakeDataset(tokens, tiles)
    param = _param(allow_overflow=True, max_packed_tokens=8192)
    (loader,) = _loaders(ds, param, 1, num_micro=1)
    packs = [loader.next_step()[0] for _ in range(3)]
    rows = [row for mb in packs for row in mb["sample_positions"]]
    order = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    alone = [row for row in rows if len(row) == 1 and order[row[0]] in (1, 3)]
    assert len(alone) == 2 and sorted(p for r in rows for p in r) == list(range(5))
    for mb in packs:
        _check_batch(mb, ds, param)


def test_replacement_carries_the_buffer_across_epochs():
    tokens, tiles = synthetic_mix(50, seed=2)
    ds = FakeDataset(tokens, tiles)
    (loader,) = _loaders(ds, _param(replacement=True), 1, num_micro=1)
    seen = []
    while len(seen) < 300:
        seen += [p for row in loader.next_step()[0]["sample_positions"] for p in row]
    for epoch in range(2):  # every sample of a finished epoch was packed exactly once
        assert sorted(p for p in seen if epoch * 50 <= p < (epoch + 1) * 50) == list(range(epoch * 50, (epoch + 1) * 50))


def _steps(loader, n):
    return [[{k: v for k, v in mb.items()} for mb in loader.next_step()] for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        for ma, mb in zip(sa, sb):
            assert ma.keys() == mb.keys()
            for k in ma:
                if isinstance(ma[k], torch.Tensor):
                    assert torch.equal(ma[k], mb[k]), k
                else:
                    assert ma[k] == mb[k], k


def test_deterministic_by_seed():
    tokens, tiles = synthetic_mix(200, seed=3)
    a = _steps(_loaders(FakeDataset(tokens, tiles), _param(), 2, seed=5)[1], 4)
    b = _steps(_loaders(FakeDataset(tokens, tiles), _param(), 2, seed=5)[1], 4)
    c = _steps(_loaders(FakeDataset(tokens, tiles), _param(), 2, seed=6)[1], 4)
    _same(a, b)
    assert a[0][0]["sample_positions"] != c[0][0]["sample_positions"] or not torch.equal(
        a[0][0]["input_ids"], c[0][0]["input_ids"])


@pytest.mark.parametrize("algorithm", ["greedy", "best_fit"])
def test_resume_is_bit_exact_and_rebuilds_only_the_buffer(algorithm):
    tokens, tiles = synthetic_mix(120, seed=4)
    param = _param(packing_algorithm=algorithm, max_packed_tokens=6000, num_images_expected=16,
                   max_buffer_size=6, strict_mode=True)
    ds = FakeDataset(tokens, tiles, bad={3})
    run = _loaders(ds, param, 2, num_micro=2)
    for loader in run:
        _steps(loader, 3)
    state = run[0].state_dict()
    assert state == run[1].state_dict(), "every rank holds the same packer state"
    buf = io.BytesIO()
    torch.save({"data_state": state}, buf)  # as checkpoints are read: weights_only
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["data_state"]
    expected = [_steps(loader, 4) for loader in run]  # past an epoch boundary (120 samples)

    fresh = FakeDataset(tokens, tiles, bad={3})
    resumed = _loaders(fresh, param, 2, num_micro=2, state=state)
    buffered = {it[0] for p in state["packer"]["buffer"] + state["ready"] for it in p[:-1]}
    per_loader = len(fresh.builds) // 2
    assert per_loader == len(buffered), "at resume only the buffered samples are built"
    got = [_steps(loader, 4) for loader in resumed]
    for e, g in zip(expected, got):
        _same(e, g)
    assert len(fresh.builds) > 2 * len(buffered)


def test_resume_at_another_dp_size_keeps_the_packs():
    tokens, tiles = synthetic_mix(100, seed=5)
    ds = FakeDataset(tokens, tiles)
    (one,) = _loaders(ds, _param(), 1, num_micro=4)
    _steps(one, 2)
    state = one.state_dict()
    later = _steps(one, 2)
    two = _loaders(FakeDataset(tokens, tiles), _param(), 2, num_micro=2, state=state)
    got = [_steps(loader, 2) for loader in two]
    positions = lambda steps: sorted(tuple(r) for s in steps for mb in s for r in mb["sample_positions"])  # noqa: E731
    assert positions(later) == sorted(positions(got[0]) + positions(got[1]))


def test_state_only_between_steps():
    ds = FakeDataset(*synthetic_mix(40))
    (loader,) = _loaders(ds, _param(), 1, num_micro=2)
    next(loader)
    with pytest.raises(RuntimeError, match="between steps"):
        loader.state_dict()
    next(loader)
    assert loader.state_dict()["position"] > 0


def test_best_fit_packs_tighter_than_greedy():
    tokens, tiles = synthetic_mix(4000, seed=6)
    items = [Item(i, i, t, k) for i, (t, k) in enumerate(zip(tokens, tiles))]
    pad = {}
    for algorithm in ("greedy", "best_fit"):
        packs, dropped = pack_stream(items, _param(packing_algorithm=algorithm))
        assert not dropped and sorted(it.index for p in packs for it in p.items) == list(range(4000))
        assert all(p.tokens <= 8192 and p.tiles <= 40 for p in packs)
        pad[algorithm] = padding_fraction(packs, 8192)
    assert pad["best_fit"] < 0.05 < 0.1 < pad["greedy"], pad


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_tile_balance_within_tolerance(dp):
    """4 packs per rank per step: every step's tile imbalance (max / mean - 1) stays within 10%."""
    tokens, tiles = synthetic_mix(6000, seed=7)
    items = [Item(i, i, t, k) for i, (t, k) in enumerate(zip(tokens, tiles))]
    packs, _ = pack_stream(items, _param())
    g = 4 * dp
    worst = 0.0
    for s in range(len(packs) // g):
        step = packs[s * g:(s + 1) * g]
        t = [p.tiles for p in step]
        ranks = assign_packs(t, [p.tokens for p in step], dp)
        assert sorted(i for r in ranks for i in r) == list(range(g)) and all(len(r) == 4 for r in ranks)
        assert ranks == assign_packs(t, [p.tokens for p in step], dp), "deterministic"
        worst = max(worst, tile_imbalance([sum(t[i] for i in r) for r in ranks]))
    assert worst <= 0.10, worst


def test_collate_sample_ids_and_strict_tiles():
    def s(n, tiles, v):
        return {"input_ids": torch.full((n,), v), "labels": torch.full((n,), v), "num_image_tokens": 0,
                "pixel_values": torch.full((tiles, 3, 2, 2), float(v)), "image_flags": torch.ones(tiles, dtype=torch.long)}
    batch = collate_packed([[s(3, 1, 1), s(2, 0, 2)], [s(4, 2, 3)]], pad_id=9, tiles_per_pack=3)
    assert batch["sample_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["input_ids"].tolist() == [[1, 1, 1, 2, 2], [3, 3, 3, 3, 9]]
    assert batch["labels"][1, 4] == IGNORE_INDEX
    assert batch["image_flags"].tolist() == [1, 0, 0, 1, 1, 0]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1, 0, 0, 3, 3, 0]
    assert (batch["num_packs"], batch["num_samples"], batch["num_tiles"], batch["num_tokens"]) == (2, 3, 3, 9)
    plain = collate_packed([[s(3, 1, 1), s(2, 0, 2)], [s(4, 2, 3)]], pad_id=9)
    assert plain["image_flags"].tolist() == [1, 1, 1]


# ---- the data JSON and the real dataset ---------------------------------------------------------------------

def _raw(data_path, **packing):
    raw = json.loads((EXAMPLES / "data_tiny.json").read_text())
    raw["dataset_param"]["basic_parameters"] = {"data_path": str(data_path), "data_folder": str(Path(data_path).parent)}
    raw["dataset_param"].update(packing)
    return raw


def test_data_spec_packing_fields(tmp_path):
    spec = load_data_spec(_raw(tmp_path / "d.jsonl", use_packed_ds=True, max_packed_tokens=512,
                               num_images_expected=8, max_buffer_size=4, strict_mode=False, replacement=True,
                               allow_overflow=True, packing_algorithm="greedy"))
    assert spec.dataset_param.packing == PackingParam(True, 512, 8, 4, False, True, True, "greedy")
    assert load_data_spec(_raw(tmp_path / "d.jsonl")).dataset_param.packing.use_packed_ds is False
    with pytest.raises(DataSpecError, match="packing_algorithm"):
        load_data_spec(_raw(tmp_path / "d.jsonl", packing_algorithm="first_fit"))
    with pytest.raises(DataSpecError, match="max_packed_tokens"):
        load_data_spec(_raw(tmp_path / "d.jsonl", max_packed_tokens=0))


def test_tiny_dataset_packed_with_workers_equals_serial(tmp_path):
    from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
    from mindspeed_mm.testing.tiny_dataset import write_tiny_dataset

    path = write_tiny_dataset(tmp_path / "data", image_size=56, seed=0, broken=True)
    spec = load_data_spec(_raw(path, use_packed_ds=True, max_packed_tokens=400, num_images_expected=12,
                               max_buffer_size=4))
    ds = InternVLChatDataset(spec, build_tiny_tokenizer(), 1024, tokens_per_tile=4, seed=1)
    p = spec.dataset_param.packing
    serial = PackedLoader(ds, p, 2, 1, 0, 1, seed=1, pad_id=0)
    workers = PackedLoader(ds, p, 2, 1, 0, 1, seed=1, pad_id=0, num_workers=2)
    a, b = _steps(serial, 6), _steps(workers, 6)
    _same(a, b)
    positions = sorted(q for s in a for mb in s for r in mb["sample_positions"] for q in r)
    skipped = sum(v for s in a for mb in s for v in mb["skipped"].values())
    assert len(positions) == len(set(positions)) and skipped >= 1
    assert all(mb["input_ids"].shape[1] <= 400 for s in a for mb in s)


def test_step_log_shows_packs():
    from mindspeed_mm.training.metrics import iteration_line

    r = {"iteration": 1, "consumed_samples": 4, "step_time_s": 0.5, "lr": 1e-3, "global_batch_size": 4,
         "loss": 1.0, "loss_scale": 1.0, "grad_norm": 1.0, "skipped_iterations_in_interval": 0,
         "skipped_samples": 1, "skipped_by_reason": {"over_max_packed_tokens": 1}, "samples_per_step": 9.0,
         "tiles_per_step": 30.0, "packs_per_step": 4.0, "padding_fraction": 0.0125, "tile_imbalance": 0.05}
    line = iteration_line(r, train_iters=10)
    for part in ("samples per step: 9.0 |", "tiles per step: 30.0 |", "packs per step: 4.0 |",
                 "padding fraction: 0.013 |", "DP tile imbalance: 0.050 |", "(over_max_packed_tokens: 1)"):
        assert part in line, part
