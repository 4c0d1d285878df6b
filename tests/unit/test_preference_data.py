"""Preference pairs (InternVL's MMPR records) through the data pipeline: each side tokenised as SFT tokenises its
two-turn conversation, one set of tiles for both, the 2P-row micro-batch layout the model's splice reads, the
record index, every bad input counted under its reason, the data JSON's dataset_kind, and DP-sharded loading
that never splits a pair."""
import json
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mindspeed_mm.data.collate import collate_internvl, collate_pairs
from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
from mindspeed_mm.data.dataset import SKIP_REASONS, InternVLChatDataset, _Skip
from mindspeed_mm.data.mixture import _estimate
from mindspeed_mm.data.preference import is_preference
from mindspeed_mm.data.sampler import build_dataloader
from mindspeed_mm.data.template import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, IMG_CONTEXT_TOKEN, image_token_string
from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
from mindspeed_mm.testing.tiny_dataset import PREFERENCE_BROKEN_REASONS, write_tiny_preference_dataset
from tests.helpers.template_oracle import expected_conversation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"
SIZE, TPT = 56, 4  # the tiny model's tile and its tokens per tile


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return write_tiny_preference_dataset(tmp_path_factory.mktemp("pref") / "data", SIZE, seed=0)


@pytest.fixture(scope="module")
def broken_path(tmp_path_factory):
    return write_tiny_preference_dataset(tmp_path_factory.mktemp("pref_broken") / "data", SIZE, seed=0, broken=True)


def _raw(data_path, **param):
    raw = json.loads((EXAMPLES / "data_tiny.json").read_text())
    raw["dataset_param"]["basic_parameters"] = {"data_path": str(data_path), "data_folder": str(Path(data_path).parent)}
    # video frames fixed in number and place, so a pair and an SFT record of another index get the same ones
    raw["dataset_param"].update(group_by_length=False, sampling_method="middle", min_num_frame=3, max_num_frame=3)
    raw["dataset_param"].update(param)
    return raw


def _dataset(tokenizer, data_path, seq_length=1024, **param):
    return InternVLChatDataset(load_data_spec(_raw(data_path, **param)), tokenizer, seq_length, TPT, seed=5)


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sft_twin(pairs_path, out):
    """The pairs as SFT records: record 2j is pair j's chosen conversation, 2j+1 its rejected one."""
    recs = []
    for r in _records(pairs_path):
        media = {k: r[k] for k in ("image", "video", "clip") if k in r}
        for side in ("chosen", "rejected"):
            recs.append({**media, "conversations": [{"from": "human", "value": r["question"]},
                                                    {"from": "gpt", "value": r[side]}]})
    return _write(out, recs)


def test_each_side_is_the_sft_tokenisation_of_its_conversation(tokenizer, pairs_path, tmp_path):
    pytest.importorskip("av")
    ds = _dataset(tokenizer, pairs_path)
    assert ds.preference
    sft = _dataset(tokenizer, _sft_twin(pairs_path, Path(pairs_path).parent / "sft_twin.jsonl"))
    assert not sft.preference
    recs = _records(pairs_path)
    kinds = set()
    for j, r in enumerate(recs):
        pair, chosen, rejected = ds[j], sft[2 * j], sft[2 * j + 1]
        assert pair["skipped"] == chosen["skipped"] == rejected["skipped"] == {}
        assert pair["record"] == j and pair["dataset"] == "preference"
        for side, want in (("chosen", chosen), ("rejected", rejected)):
            assert torch.equal(pair[f"{side}_input_ids"], want["input_ids"]), (j, side)
            assert torch.equal(pair[f"{side}_labels"], want["labels"]), (j, side)
            answer = tokenizer.decode(pair[f"{side}_labels"][pair[f"{side}_labels"] != IGNORE_INDEX])
            assert answer == r[side] + "<|im_end|>"
        # one set of tiles (or frames) for both sides, exactly the SFT sample's
        assert torch.equal(pair["pixel_values"], chosen["pixel_values"])
        assert torch.equal(pair["pixel_values"], rejected["pixel_values"])
        assert torch.equal(pair["image_flags"], chosen["image_flags"])
        ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        for side in ("chosen", "rejected"):
            assert int((pair[f"{side}_input_ids"] == ctx).sum()) == pair["num_image_tokens"] \
                == pair["pixel_values"].shape[0] * TPT
        kinds.add("video" if "video" in r else "images" if isinstance(r.get("image"), list)
                  else "image" if "image" in r else "text")
    assert kinds == {"video", "images", "image", "text"} and len(recs) == 12


def test_template_oracle_on_pairs(tokenizer, pairs_path):
    """Independently of our template code: a question without a placeholder gets "<image>\\n", the system
    prompt is the SFT default (InternVL's MPO uses the template's system message too)."""
    ds, recs = _dataset(tokenizer, pairs_path), _records(pairs_path)
    checked = 0
    for j, r in enumerate(recs):
        if isinstance(r.get("image"), list) or "video" in r:
            continue
        pair = ds[j]
        question = r["question"]
        images = []
        if "image" in r:
            if "<image>" not in question:
                question = "<image>\n" + question
            images = [("<image>", image_token_string(pair["pixel_values"].shape[0], TPT))]
        for side in ("chosen", "rejected"):
            ids, labels = expected_conversation(tokenizer, DEFAULT_SYSTEM_MESSAGE, [(question, r[side])], images)
            assert pair[f"{side}_input_ids"].tolist() == ids and pair[f"{side}_labels"].tolist() == labels
        checked += 1
    assert checked >= 5


def _pair(n_chosen, n_rejected, tiles, record, skipped=None, dataset="d"):
    pix = torch.randn(tiles, 3, 4, 4)
    return {"chosen_input_ids": torch.arange(1, n_chosen + 1), "chosen_labels": torch.arange(n_chosen) + 100,
            "rejected_input_ids": torch.arange(1, n_rejected + 1) * 10,
            "rejected_labels": torch.arange(n_rejected) + 200,
            "pixel_values": pix, "image_flags": torch.ones(tiles, dtype=torch.long), "num_image_tokens": tiles * 2,
            "record": record, "skipped": skipped or {}, "loaded": {}, "dataset": dataset}


def test_collate_pairs_row_layout():
    a, b, c = _pair(3, 4, 2, 7, {"identical_pair": 1}), _pair(5, 2, 0, 3), _pair(2, 2, 1, 11, {"too_long": 2}, "e")
    out = collate_pairs([a, b, c], pad_id=9)
    assert out["input_ids"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5], [1, 2, 9, 9, 9],
                                         [10, 20, 30, 40, 9], [10, 20, 9, 9, 9], [10, 20, 9, 9, 9]]
    assert out["labels"][0].tolist() == [100, 101, 102, -100, -100]
    assert out["labels"][3].tolist() == [200, 201, 202, 203, -100]
    assert out["attention_mask"].sum(1).tolist() == [3, 5, 2, 4, 2, 2]
    tiles = torch.cat([a["pixel_values"], c["pixel_values"]])
    assert torch.equal(out["pixel_values"], torch.cat([tiles, tiles]))  # chosen rows' tiles, then rejected rows'
    assert out["image_flags"].tolist() == [1] * 6
    assert out["records"].dtype == torch.long and out["records"].tolist() == [7, 3, 11]
    assert (out["num_pairs"], out["num_samples"], out["num_tokens"], out["num_image_tokens"]) == (3, 3, 18, 12)
    assert out["skipped"] == {"identical_pair": 1, "too_long": 2}  # once per pair, not per row
    assert out["samples_by_dataset"] == {"d": 2, "e": 1}
    same = collate_internvl([a, b, c], pad_id=9)  # the loader's collate dispatches on the samples
    assert same.keys() == out.keys() and all(
        torch.equal(same[k], out[k]) if isinstance(out[k], torch.Tensor) else same[k] == out[k] for k in out)
    sft = {"input_ids": torch.arange(3), "labels": torch.arange(3), "pixel_values": None, "image_flags": None,
           "num_image_tokens": 0}
    with pytest.raises(ValueError, match="mixes"):
        collate_internvl([a, sft], pad_id=0)
    text = collate_pairs([_pair(2, 3, 0, 0)], pad_id=0)
    assert text["pixel_values"] is None and text["image_flags"] is None and text["input_ids"].shape == (2, 3)


def _splice_tiles(batch, ctx):
    """Which tile fills each <IMG_CONTEXT> slot under the model's rule (InternVLModel.splice: features written
    row-major over [b, s] into the slots), as tile indices into batch["pixel_values"]."""
    is_image = batch["input_ids"] == ctx
    tile_of_feature = torch.arange(int(is_image.sum())) // TPT
    slots = torch.full(batch["input_ids"].shape, -1)
    slots[is_image] = tile_of_feature
    return slots


def test_collated_rows_find_their_own_tiles(tokenizer, pairs_path):
    ds = _dataset(tokenizer, pairs_path)
    pairs = [ds[j] for j in range(len(ds))]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    slots = _splice_tiles(batch, ctx)
    p = len(pairs)
    for row in range(2 * p):
        pair = pairs[row % p]
        used = slots[row][slots[row] >= 0].unique()
        assert used.numel() == pair["pixel_values"].shape[0]
        assert torch.equal(batch["pixel_values"][used], pair["pixel_values"]), row


def test_bad_pairs_are_skipped_under_their_reasons(tokenizer, broken_path, caplog):
    assert {"malformed_pair", "identical_pair"} <= set(SKIP_REASONS)  # the step log counts every reason
    ds = _dataset(tokenizer, broken_path)
    exact = {}
    for j in range(len(ds)):
        try:
            ds.build(j)
        except _Skip as e:
            exact[e.reason] = exact.get(e.reason, 0) + 1
    assert exact == PREFERENCE_BROKEN_REASONS
    totals = {}
    for i in range(len(ds)):
        s = ds[i]
        assert "chosen_input_ids" in s and s["record"] >= i
        for k, v in s["skipped"].items():
            totals[k] = totals.get(k, 0) + v
    assert set(totals) == set(PREFERENCE_BROKEN_REASONS)
    assert all(totals[k] >= v for k, v in PREFERENCE_BROKEN_REASONS.items())
    batches = list(islice(build_dataloader(ds, 3, 0, 1, 0, 0, 0, pad_id=tokenizer.pad_token_id), len(ds) // 3))
    summed = {}
    for b in batches:
        for k, v in b["skipped"].items():
            summed[k] = summed.get(k, 0) + v
    assert set(summed) <= set(PREFERENCE_BROKEN_REASONS) and sum(summed.values()) >= 1


def test_malformed_pair_records(tokenizer, tmp_path):
    good = {"question": "Hi?", "chosen": "Yes.", "rejected": "No."}
    path = _write(tmp_path / "p.jsonl", [
        good, {"question": "Hi?", "chosen": "Yes.", "rejected": 3}, {"question": "Hi?", "rejected": "No."},
        {"chosen": "Yes.", "rejected": "No."}, {"conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Hi."}]},
        {"image": "missing.png", "question": "Hi?", "chosen": "Yes.", "rejected": "No."},
        {"video": 5, "question": "Hi?", "chosen": "Yes.", "rejected": "No."}])
    ds = _dataset(tokenizer, path)  # the first record is a pair: the file is pairs, every record must be one
    reasons = []
    for j in range(1, len(ds)):
        with pytest.raises(_Skip) as e:
            ds.build(j)
        reasons.append(e.value.reason)
    assert reasons == ["malformed_pair"] * 4 + ["missing_file", "malformed"]
    assert ds[1]["skipped"] == {"malformed_pair": 4, "missing_file": 1, "malformed": 1} and ds[1]["record"] == 0


def test_too_long_pairs_follow_the_sft_rule(tokenizer, pairs_path, tmp_path):
    recs = _records(pairs_path)
    wide = next(r for r in recs if isinstance(r.get("image"), str) and "_3." in r["image"])  # 3x1: 4 tiles
    folder = Path(pairs_path).parent
    image_pair = dict(wide, image=str(folder / wide["image"]), chosen="It is short.",
                      rejected="It is a much longer answer than the other one, by many tokens.")
    ds = _dataset(tokenizer, _write(tmp_path / "i.jsonl", [image_pair]))
    full = ds[0]
    assert full["pixel_values"].shape[0] == 4
    longest = full["rejected_input_ids"].numel()
    text_len = longest - 4 * TPT
    # room for one tile in the longer sequence only: both get one tile, the shorter would have fitted more
    s = _dataset(tokenizer, tmp_path / "i.jsonl", seq_length=text_len + 2 * TPT)[0]
    assert s["pixel_values"].shape[0] == 1 and s["rejected_input_ids"].numel() == text_len + TPT
    assert s["chosen_input_ids"].numel() < full["chosen_input_ids"].numel() and s["skipped"] == {}
    with pytest.raises(_Skip, match="one tile per image") as e:  # the shorter side fits; the pair does not
        _dataset(tokenizer, tmp_path / "i.jsonl", seq_length=text_len + TPT - 1).build(0)
    assert e.value.reason == "too_long"

    long_q = "red green blue " * 100
    text = [{"question": "Hi?", "chosen": "red " * 300, "rejected": "blue " * 300},
            {"question": long_q, "chosen": "Yes.", "rejected": "No."},
            {"question": "Hi?", "chosen": "red " * 300 + "yes", "rejected": "red " * 300 + "no"}]
    ds = _dataset(tokenizer, _write(tmp_path / "t.jsonl", text), seq_length=200)
    s = ds.build(0)  # truncated as SFT truncates, each side keeping some answer
    assert s["chosen_input_ids"].numel() == s["rejected_input_ids"].numel() == 200
    assert all(bool((s[f"{k}_labels"] != IGNORE_INDEX).any()) for k in ("chosen", "rejected"))
    for j, reason in ((1, "too_long"), (2, "identical_pair")):  # no answer left; no difference left
        with pytest.raises(_Skip) as e:
            ds.build(j)
        assert e.value.reason == reason


def test_dataset_kind_key(tokenizer, pairs_path, tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "Hi."}]}])
    assert is_preference(load_data_spec(_raw(pairs_path)))  # detected from the records
    assert not is_preference(load_data_spec(_raw(sft)))
    assert is_preference(load_data_spec(_raw(sft, dataset_kind="preference")))
    assert load_data_spec(_raw(pairs_path, dataset_kind="sft")).dataset_param.dataset_kind == "sft"
    forced = _dataset(tokenizer, pairs_path, dataset_kind="sft")
    assert not forced.preference
    with pytest.raises(_Skip) as e:
        forced.build(0)
    assert e.value.reason == "malformed"
    with pytest.raises(_Skip) as e:
        _dataset(tokenizer, sft, dataset_kind="preference").build(0)
    assert e.value.reason == "malformed_pair"
    with pytest.raises(DataSpecError, match='dataset_param.dataset_kind: "dpo" is not supported; expected "sft" or'):
        load_data_spec(_raw(pairs_path, dataset_kind="dpo"))
    with pytest.raises(DataSpecError, match=r"dataset_param.use_packed_ds: preference pairs are not packed"):
        load_data_spec(_raw(pairs_path, dataset_kind="preference", use_packed_ds=True))
    detected = load_data_spec(_raw(pairs_path, use_packed_ds=True))  # detected: refused when the data is read
    with pytest.raises(DataSpecError, match="dataset_param.use_packed_ds"):
        is_preference(detected)
    with pytest.raises(DataSpecError, match="dataset_param.use_packed_ds"):
        InternVLChatDataset(detected, tokenizer, 1024, TPT)
    raw = _raw(pairs_path)
    raw["dataset_param"]["basic_parameters"] = [raw["dataset_param"]["basic_parameters"],
                                                {"data_path": str(sft), "data_folder": str(tmp_path)}]
    with pytest.raises(DataSpecError, match=r"dataset_param.dataset_kind: the data mixes preference pairs"):
        is_preference(load_data_spec(raw))
    raw = _raw(pairs_path)
    raw["dataset_param"]["basic_parameters"]["valid_data_path"] = str(sft)
    with pytest.raises(DataSpecError, match="mixes"):
        is_preference(load_data_spec(raw))


def test_internvl_meta_json_unchanged(tokenizer, pairs_path, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"mmpr_tiny": {"root": str(Path(pairs_path).parent), "annotation": str(pairs_path),
                                              "data_augment": False, "repeat_time": 1, "length": 12}}))
    raw = _raw(pairs_path)
    del raw["dataset_param"]["basic_parameters"]
    raw["dataset_param"]["meta_path"] = str(meta)
    spec = load_data_spec(raw)
    assert is_preference(spec)
    ds = InternVLChatDataset(spec, tokenizer, 1024, TPT, seed=5)
    assert torch.equal(ds[0]["chosen_input_ids"], _dataset(tokenizer, pairs_path)[0]["chosen_input_ids"])
    assert ds[0]["dataset"] == "mmpr_tiny"


def test_length_estimate_is_the_longer_side():
    param = load_data_spec(_raw("x.jsonl")).dataset_param
    pair = {"question": "q" * 40, "chosen": "c" * 400, "rejected": "r" * 80}
    assert _estimate(pair, param, 6, TPT) == (40 + 400) // 4
    assert _estimate(dict(pair, image="a.png"), param, 6, TPT) == (40 + 400) // 4 + TPT * 7


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_sharded_loader_never_splits_a_pair(tokenizer, pairs_path, workers):
    ds = _dataset(tokenizer, pairs_path)
    mbs, dp = 2, 2
    steps = len(ds) // (mbs * dp)  # one epoch (12 pairs: 3 steps of 2 pairs on each of 2 ranks)
    seen = []
    for rank in range(dp):
        loader = build_dataloader(ds, mbs, rank, dp, seed=1, consumed_samples=0, num_workers=workers,
                                  pad_id=tokenizer.pad_token_id)
        for batch in islice(loader, steps):
            assert batch["num_pairs"] == batch["num_samples"] == mbs and batch["input_ids"].shape[0] == 2 * mbs
            for k, record in enumerate(batch["records"].tolist()):
                want = ds[record]
                for row, side in ((k, "chosen"), (mbs + k, "rejected")):
                    ids = want[f"{side}_input_ids"]
                    assert torch.equal(batch["input_ids"][row, :ids.numel()], ids)
                    assert int(batch["attention_mask"][row].sum()) == ids.numel()
                seen.append(record)
    assert len(seen) == len(set(seen)) == steps * mbs * dp  # each pair once, whole, on one rank


def test_training_iterator_serves_pairs_unchanged(tokenizer, pairs_path):
    """The training side's loader (training/data.py) needs no change: the dataset yields pairs and its collate
    dispatches on them; the micro-batch size counts pairs."""
    from mindspeed_mm.training.data import build_train_iterator

    args = SimpleNamespace(seq_length=1024, seed=3, micro_batch_size=2, global_batch_size=4, num_workers=0)
    spec = load_data_spec(_raw(pairs_path, group_by_length=True))
    batches = build_train_iterator(spec, tokenizer, SimpleNamespace(tokens_per_tile=TPT), args, 0, 2, 0)
    batch = next(batches)
    assert batch["num_pairs"] == 2 and batch["input_ids"].shape[0] == 4 and batch["records"].shape == (2,)
    packed = load_data_spec(_raw(pairs_path, use_packed_ds=True))
    with pytest.raises(DataSpecError, match="use_packed_ds"):
        build_train_iterator(packed, tokenizer, SimpleNamespace(tokens_per_tile=TPT), args, 0, 1, 0)


def test_tiny_preference_dataset_is_deterministic(tmp_path):
    a = write_tiny_preference_dataset(tmp_path / "a", SIZE, seed=2, broken=True)
    b = write_tiny_preference_dataset(tmp_path / "b", SIZE, seed=2, broken=True)
    assert a.read_text() == b.read_text()
    for p in sorted((tmp_path / "a" / "images").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    complete = [r for r in _records(a) if "chosen" in r and "rejected" in r]
    assert sum(r["chosen"] == r["rejected"] for r in complete) == 1  # the broken one; the others differ
