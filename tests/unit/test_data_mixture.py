"""Dataset mixtures: InternVL's meta JSON and basic_parameters lists, per-dataset repeat_time (fractions:
floor, seeded subset) and max_dynamic_patch, samples per dataset, group_by_length's order, and resuming
mid-epoch: the same next batches, without building the consumed samples."""
import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
from mindspeed_mm.data.dataset import InternVLChatDataset
from mindspeed_mm.data.mixture import kept_count, length_grouped_order
from mindspeed_mm.data.sampler import build_dataloader
from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
from mindspeed_mm.testing.tiny_dataset import write_tiny_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"
TPT = 4
SIZES = {"short": 10, "long": 7, "mixed": 9}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three text-only jsonl files whose records differ in length: {name: path}."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for k, (name, n) in enumerate(SIZES.items()):
        words = {"short": lambda i: 1 + i % 3, "long": lambda i: 30 + 5 * i, "mixed": lambda i: 2 + 9 * (i % 4)}[name]
        lines = [json.dumps({"conversations": [{"from": "human", "value": f"{name} {i}: " + "tell me " * words(i)},
                                               {"from": "gpt", "value": f"answer {k} {i} " + "yes " * words(i)}]})
                 for i in range(n)]
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("\n".join(lines) + "\n")
    return out


def _raw(**param):
    raw = json.loads((EXAMPLES / "data_tiny.json").read_text())
    del raw["dataset_param"]["basic_parameters"]
    raw["dataset_param"].update(param)
    return raw


def _mixture_raw(files, repeats, **param):
    return _raw(basic_parameters=[{"data_path": str(files[n]), "repeat_time": r, "name": n}
                                  for n, r in repeats.items()], **param)


def _dataset(tokenizer, raw, seed=3):
    return InternVLChatDataset(load_data_spec(raw), tokenizer, 1024, tokens_per_tile=TPT, seed=seed)


def _loader(ds, consumed=0, mbs=2, dp=2, rank=0, seed=3, drop_last=True, group=None):
    order = None if group is None else length_grouped_order(ds.records.lengths(ds.param, TPT), group, mbs, seed)
    return build_dataloader(ds, mbs, rank, dp, seed, consumed, num_workers=0, pad_id=0, drop_last=drop_last,
                            order=order)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


# ---------------------------------------------------------------------------------------------- counts

def test_kept_count_is_floor_of_the_decimal():
    assert kept_count(100, 0.29) == 29 and int(100 * 0.29) == 28  # float's product would keep 28
    assert (kept_count(7, 0.5), kept_count(9, 1.5), kept_count(10, 2), kept_count(3, 0.2)) == (3, 13, 20, 0)


def test_epoch_counts_are_repeat_time_times_length(tokenizer, files):
    repeats = {"short": 2, "long": 0.5, "mixed": 1.5}
    ds = _dataset(tokenizer, _mixture_raw(files, repeats))
    want = {n: kept_count(SIZES[n], r) for n, r in repeats.items()}  # 20, 3, 13
    assert ds.records.counts == list(want.values()) and len(ds) == sum(want.values())
    assert [line.split(":")[0] for line in ds.records.describe()] == [f"dataset {n}" for n in want]
    got = Counter()
    for batch in islice(_loader(ds, mbs=6, dp=1, drop_last=False), len(ds) // 6):  # 36 of an epoch of 36
        got.update(batch["samples_by_dataset"])
    assert got == want
    # the file's own records: full copies, then a seeded subset of floor(0.5 x 9) = 4 in file order
    tags = [ds.records[i][2] for i in range(20 + 3 + 9, 36)]
    lines = [int(t.rsplit(":", 1)[1]) for t in tags]
    assert all(t.startswith(str(files["mixed"])) for t in tags) and lines == sorted(set(lines)) and len(lines) == 4


def test_fraction_subset_follows_the_seed(tokenizer, files):
    def subset(seed):
        ds = _dataset(tokenizer, _mixture_raw(files, {"short": 0.5}), seed=seed)
        return [ds.records[i][2] for i in range(len(ds))]
    assert subset(3) == subset(3) and len(subset(3)) == 5
    assert any(subset(3) != subset(s) for s in (4, 5, 6))


def test_same_seed_same_order_other_seed_other(tokenizer, files):
    ds = _dataset(tokenizer, _mixture_raw(files, {"short": 1, "long": 1, "mixed": 1}))
    for group in (None, 4):
        runs = [[b["input_ids"] for b in islice(_loader(ds, seed=s, group=group), 4)] for s in (3, 3, 4)]
        assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))
        assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(runs[0], runs[2]))


# ---------------------------------------------------------------------------------------------- meta JSON

def _write_meta(tmp_path, files, entries):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return meta


def test_meta_json_read(tokenizer, files, tmp_path):
    # InternVL's format, as its finetuning docs show it
    meta = _write_meta(tmp_path, files, {
        "short_set": {"root": str(files["short"].parent), "annotation": str(files["short"]), "data_augment": False,
                      "max_dynamic_patch": 2, "repeat_time": 1, "length": 10},
        "long_set": {"root": str(files["long"].parent), "annotation": str(files["long"]), "data_augment": True,
                     "repeat_time": 0.5, "length": 8}})
    spec = load_data_spec(_raw(meta_path=str(meta)))
    a, b = spec.dataset_param.basic_parameters
    assert (a.name, a.data_path, a.data_folder, a.max_dynamic_patch, a.repeat_time, a.data_augment) == \
        ("short_set", str(files["short"]), str(files["short"].parent), 2, 1.0, False)
    assert (b.name, b.max_dynamic_patch, b.repeat_time, b.data_augment, b.length) == ("long_set", None, 0.5, True, 8)
    ds = InternVLChatDataset(spec, tokenizer, 1024, tokens_per_tile=TPT)
    assert len(ds) == 10 + 3 and ds[12]["dataset"] == "long_set"
    lines = ds.records.describe()
    assert "data_augment: tiles re-encoded as JPEG" in lines[1] and "length 8 != 7 records" in lines[2]


@pytest.mark.parametrize("entry, key, words", [
    (lambda f: {"root": ".", "annotation": str(f.parent / "nope.jsonl"), "repeat_time": 1}, "s.annotation",
     "file not found"),
    (lambda f: {"root": ".", "annotation": str(f), "repeat_times": 1}, "s.repeat_times", "unknown key"),
    (lambda f: {"root": ".", "annotation": str(f), "repeat_time": 0}, "s.repeat_time", "> 0"),
    (lambda f: {"root": ".", "annotation": str(f), "repeat_time": -1}, "s.repeat_time", "> 0"),
    (lambda f: {"annotation": str(f)}, "s.root", "missing"),
    (lambda f: {"root": ".", "annotation": str(f), "max_dynamic_patch": "6"}, "s.max_dynamic_patch", "int"),
    (lambda f: [1], "s", "expected an object"),
])
def test_meta_errors_name_key_and_file(files, tmp_path, entry, key, words):
    meta = _write_meta(tmp_path, files, {"s": entry(files["short"])})
    with pytest.raises(DataSpecError) as e:
        load_data_spec(_raw(meta_path=str(meta)))
    msg = str(e.value)
    assert f"{key}:" in msg and words in msg and str(meta) in msg and "\n" not in msg, msg


def test_meta_malformed_missing_or_ambiguous(files, tmp_path):
    meta = _write_meta(tmp_path, files, '{"s": {"root": ".",}}')
    with pytest.raises(DataSpecError, match=r"meta.json: invalid JSON at line 1"):
        load_data_spec(_raw(meta_path=str(meta)))
    with pytest.raises(DataSpecError, match=r"meta.json: a meta JSON must be a non-empty object"):
        load_data_spec(_raw(meta_path=str(_write_meta(tmp_path, files, []))))
    with pytest.raises(DataSpecError, match=r"dataset_param.meta_path: meta file not found"):
        load_data_spec(_raw(meta_path=str(tmp_path / "absent.json")))
    with pytest.raises(DataSpecError, match=r"basic_parameters: give either basic_parameters or meta_path"):
        load_data_spec(_raw(meta_path=str(meta), basic_parameters={"data_path": "a.jsonl"}))
    with pytest.raises(DataSpecError, match=r"basic_parameters\[1\].name: dataset name 'x' is used twice"):
        load_data_spec(_raw(basic_parameters=[{"data_path": "a.jsonl", "name": "x"},
                                              {"data_path": "b.jsonl", "name": "x"}]))
    with pytest.raises(DataSpecError, match=r"basic_parameters\[0\].repeat_time: 0.02 x 10 records .* keeps no"):
        _dataset(build_tiny_tokenizer(), _raw(basic_parameters=[{"data_path": str(files["short"]),
                                                                 "repeat_time": 0.02}]))


def test_max_dynamic_patch_per_dataset(tokenizer, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", image_size=56, seed=0)
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    raw = _raw(basic_parameters=[{"data_path": str(data), "data_folder": str(data.parent), "name": "one",
                                  "max_dynamic_patch": 1},
                                 {"data_path": str(data), "data_folder": str(data.parent), "name": "six"}])
    ds = _dataset(tokenizer, raw)
    n = len(recs)
    tiles = [(ds[i]["pixel_values"].shape[0], ds[n + i]["pixel_values"].shape[0]) for i in range(n)
             if isinstance(recs[i].get("image"), str)]
    assert tiles and all(a == 1 for a, _ in tiles) and any(b > 1 for _, b in tiles)


def test_data_augment_reencodes_each_tile_as_jpeg_at_a_quality_from_75_to_100(tokenizer, tmp_path):
    """InternVL's data_augment: every tile re-encoded as JPEG (quality 75..100); seeded by the sample, so a second
    dataset (another worker) gives the same pixels."""
    from mindspeed_mm.data.dataset import jpeg_degrade
    from mindspeed_mm.data.tiling import to_pixel_values

    data = write_tiny_dataset(tmp_path / "data", image_size=56, seed=0)
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    i = next(k for k, r in enumerate(recs) if isinstance(r.get("image"), str))
    entry = {"data_path": str(data), "data_folder": str(data.parent), "name": "aug", "data_augment": True}
    plain = _dataset(tokenizer, _raw(basic_parameters=[{**entry, "data_augment": False}]))[i]["pixel_values"]
    ds = _dataset(tokenizer, _raw(basic_parameters=[entry]))
    aug = ds[i]["pixel_values"]
    assert torch.equal(aug, _dataset(tokenizer, _raw(basic_parameters=[entry]))[i]["pixel_values"])
    assert aug.shape == plain.shape and not torch.equal(aug, plain)
    # each tile is one of the 26 re-encodings of the plain tile
    mean, std = ds.param.norm_mean, ds.param.norm_std
    tile = torch.tensor(std).view(3, 1, 1) * plain[0] + torch.tensor(mean).view(3, 1, 1)
    from PIL import Image
    img = Image.fromarray((tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    options = [to_pixel_values([jpeg_degrade(img, q)], mean, std)[0] for q in range(75, 101)]
    best = min((aug[0] - o).abs().max().item() for o in options)
    assert best < 0.05, best  # the tile went through one of them (up to the 8-bit round trip of this check)


# ---------------------------------------------------------------------------------------------- group_by_length

def test_group_by_length_order_is_internvl_rule():
    lengths = [5, 90, 12, 40, 40, 7, 66, 3, 18, 29, 55, 1, 80]
    gbs, mbs, seed = 6, 2, 9
    order = length_grouped_order(lengths, gbs, mbs, seed)(2)
    # InternVL's rule written out: permutation, megabatches of a global batch sorted longest first, dealt into
    # gbs/mbs chunks of equal count to the lightest chunk (a size the chunk count does not divide: round-robin)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    want = []
    for s in range(0, len(lengths), gbs):
        mb = sorted(perm[s:s + gbs], key=lambda i: lengths[i], reverse=True)
        k = gbs // mbs
        if len(mb) % k:
            want += [i for c in range(k) for i in mb[c::k]]
            continue
        chunks, totals = [[] for _ in range(k)], [0] * k
        for i in mb:
            c = totals.index(min(totals))
            chunks[c].append(i)
            totals[c] = totals[c] + lengths[i] if len(chunks[c]) < len(mb) // k else float("inf")
        want += [i for c in chunks for i in c]
    assert order == want and sorted(order) == list(range(len(lengths)))


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("group", [None, 4, 8])
def test_resume_mid_epoch_gives_the_same_next_batches(tokenizer, files, group):
    ds = _dataset(tokenizer, _mixture_raw(files, {"short": 2, "long": 0.5, "mixed": 1.5}))  # 36 samples
    mbs, dp = 2, 2
    for rank in range(dp):
        full = list(islice(_loader(ds, mbs=mbs, dp=dp, rank=rank, group=group), 14))  # into the second epoch
        for k in (3, 7, 9):  # 9: the epoch of 36 (drop_last: 36) ends at micro-batch 9
            resumed = list(islice(_loader(ds, consumed=k * mbs * dp, mbs=mbs, dp=dp, rank=rank, group=group), 4))
            assert all(_same(a, b) for a, b in zip(full[k:k + 4], resumed))


def test_resume_builds_only_the_samples_it_yields(tokenizer, files, monkeypatch):
    ds = _dataset(tokenizer, _mixture_raw(files, {"short": 2, "long": 1, "mixed": 1}))
    built = []
    original = ds.build
    monkeypatch.setattr(ds, "build", lambda j: built.append(j) or original(j))
    batches = list(islice(_loader(ds, consumed=20, mbs=2, dp=2, rank=1, group=4), 2))
    assert len(built) == 4 and sum(b["num_samples"] for b in batches) == 4
