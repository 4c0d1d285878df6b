"""Data pipeline: data spec parsing and errors, video frame choice and decoding, dataset samples (image,
several images, video, text only) against the tiling/template building blocks, sequence-length handling, bad
samples, collation, the resumable DP sampler and multi-worker loading."""
import copy
import json
import logging
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_mm.data.collate import collate_internvl
from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
from mindspeed_mm.data.dataset import InternVLChatDataset
from mindspeed_mm.data.sampler import ResumableBatchSampler, build_dataloader
from mindspeed_mm.data.template import (
    DEFAULT_SYSTEM_MESSAGE,
    IGNORE_INDEX,
    IMG_CONTEXT_TOKEN,
    build_conversation,
)
from mindspeed_mm.data.tiling import dynamic_tiles, load_image, to_pixel_values
from mindspeed_mm.data.video import frame_indices, read_video_frames
from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
from mindspeed_mm.testing.tiny_dataset import (
    BROKEN_LOADED,
    BROKEN_REASONS,
    write_tiny_dataset,
    write_video,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"
SIZE = 56  # the tiny model's tile: 4x4 patches of 14 -> 4 tokens per tile after pixel shuffle
TPT = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_data")
    return write_tiny_dataset(root / "data", image_size=SIZE, seed=0, broken=False)


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken_data")
    return write_tiny_dataset(root / "data", image_size=SIZE, seed=0, broken=True)


def _raw_spec(data_path, **overrides):
    raw = json.loads((EXAMPLES / "data_tiny.json").read_text())
    raw["dataset_param"]["basic_parameters"] = {"data_path": str(data_path), "data_folder": str(Path(data_path).parent),
                                                "repeat_time": 1}
    raw["dataset_param"].update(overrides)
    return raw


def _dataset(tokenizer, data_path, seq_length=1024, seed=7, **overrides):
    return InternVLChatDataset(load_data_spec(_raw_spec(data_path, **overrides)), tokenizer, seq_length,
                               tokens_per_tile=TPT, seed=seed)


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _first(records, pred):
    return next(i for i, r in enumerate(records) if pred(r))


# ------------------------------------------------------------------------------------------------------------
# Data spec
# ------------------------------------------------------------------------------------------------------------

def test_example_specs_load():
    for name in ("8B", "78B"):
        spec = load_data_spec(EXAMPLES / f"data_{name}.json")
        p = spec.dataset_param
        assert (p.image_size, p.tokens_per_tile, p.max_dynamic_patch, p.template_name) == (448, 256, 12, "internvl2_5")
        assert p.norm_std == (0.229, 0.224, 0.225) and not p.pad_to_square  # InternVL3's pad2square false
        assert not p.skip_truncated_images
        assert spec.dataloader_param.collate_param.pad_id == 151643
        assert spec.tokenizer_config.from_pretrained.endswith(f"InternVL3-{name}")
        # the reference's copy (MindSpeed-MM's, byte for byte) keeps its Pad2Square step, and it is honoured
        ref = json.loads((EXAMPLES / "reference" / f"data_{name}.json").read_text())
        ref["dataset_param"]["basic_parameters"]["data_path"] = "data.jsonl"
        assert load_data_spec(ref).dataset_param.pad_to_square
    assert load_data_spec(EXAMPLES / "data_tiny.json").dataset_param.tokens_per_tile == TPT


def _spec_error(tmp_path, mutate) -> str:
    raw = json.loads((EXAMPLES / "data_8B.json").read_text())
    mutate(raw)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataSpecError) as e:
        load_data_spec(path)
    assert str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("mutate, key, words", [
    (lambda r: r["dataset_param"].update(template_name="chatml"), "dataset_param.template_name", "internvl2_5"),
    (lambda r: r["dataset_param"].update(max_dynamic_patch="12"), "dataset_param.max_dynamic_patch", "expected int"),
    (lambda r: r["dataset_param"].update(use_thumbnail=1), "dataset_param.use_thumbnail", "expected bool"),
    (lambda r: r["dataset_param"].update(max_dynamic_pach=6), "dataset_param.max_dynamic_pach", "unknown key"),
    (lambda r: r["dataset_param"].update(sampling_method="random"), "dataset_param.sampling_method", "fps"),
    (lambda r: r["dataset_param"].update(basic_parameters=[
        {"data_path": "a.jsonl", "data_folder": "."}, {"data_path": "b.jsonl", "repeat_time": 0}]),
     "dataset_param.basic_parameters[1].repeat_time", "> 0"),
    (lambda r: r["dataset_param"]["basic_parameters"].pop("data_path"),
     "dataset_param.basic_parameters.data_path", "missing"),
    (lambda r: r["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"][0]["param"].update(
        size=[224, 224]), "dataset_param.preprocess_parameters.train_pipeline.image[0].param.size", "image_size"),
    (lambda r: r["dataset_param"]["tokenizer_config"].update(hub_backend="modelscope"),
     "dataset_param.tokenizer_config.hub_backend", "hf"),
    (lambda r: r["dataloader_param"]["collate_param"].update(pad_id=None),
     "dataloader_param.collate_param.pad_id", "expected int"),
    (lambda r: r.update(extra={}), "extra", "unknown key"),
])
def test_spec_errors_name_file_and_key(tmp_path, mutate, key, words):
    msg = _spec_error(tmp_path, mutate)
    assert f"{key}:" in msg and words in msg, msg


def test_spec_invalid_json_and_norm(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"dataset_param": {,}}')
    with pytest.raises(DataSpecError, match=r"bad.json: invalid JSON at line 1 column 20"):
        load_data_spec(path)
    raw = json.loads((EXAMPLES / "data_8B.json").read_text())
    raw["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"][2]["param"] = {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    del raw["dataset_param"]["use_text_processer"]
    p = load_data_spec(raw).dataset_param
    assert p.norm_mean == (0.5, 0.5, 0.5) and p.norm_std == (0.5, 0.5, 0.5)


def test_tokens_per_tile_must_match_model(tokenizer, data):
    with pytest.raises(DataSpecError, match="tokens per tile"):
        InternVLChatDataset(load_data_spec(_raw_spec(data)), tokenizer, 512, tokens_per_tile=256)


# ------------------------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------------------------

def _upstream_segments(vlen, n):
    """InternVL's segments: n+1 integer bounds from linspace(0, vlen), each segment [lo, hi - 1]."""
    bounds = [int(x) for x in np.linspace(0, vlen, n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


@pytest.mark.parametrize("vlen, n", [(20, 4), (20, 7), (100, 12), (5, 5), (13, 1)])
def test_frame_indices_middle_and_rand(vlen, n):
    segs = _upstream_segments(vlen, n)
    assert frame_indices(n, vlen, "middle") == [(lo + hi) // 2 for lo, hi in segs]
    for seed in range(5):
        got = frame_indices(n, vlen, "rand", rng=np.random.default_rng(seed))
        assert len(got) == n and all(lo <= g <= hi for g, (lo, hi) in zip(got, segs))
        assert got == frame_indices(n, vlen, "rand", rng=np.random.default_rng(seed))
    draws = {tuple(frame_indices(n, vlen, "rand", rng=np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1 or vlen == n


def test_frame_indices_short_video_padded_and_fps():
    assert frame_indices(8, 3, "middle") == [0, 1, 2, 2, 2, 2, 2, 2]
    assert frame_indices(6, 1, "rand", rng=np.random.default_rng(0)) == [0] * 6
    # 20 frames at 10 fps, one frame per second at each second's middle: frames 5 and 15
    assert frame_indices(12, 20, "fps1", fps=10) == [5, 15]
    assert frame_indices(12, 20, "fps4", fps=10) == [1, 4, 6, 9, 11, 14, 16, 19]  # numpy rounds half to even
    assert frame_indices(3, 20, "fps4", fps=10) == [1, 4, 6]
    assert frame_indices(12, 2, "fps0.1", fps=10) == [0]  # too short for the grid: the middle frame
    with pytest.raises(ValueError, match="unknown sampling"):
        frame_indices(4, 20, "uniform")


@pytest.fixture(scope="module")
def lossless_video(tmp_path_factory):
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(20)]
    path = tmp_path_factory.mktemp("video") / "noise.mkv"
    write_video(path, frames, fps=10, codec="libx264rgb", pix_fmt="rgb24")
    return path, frames


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_read_video_frames_exact(lossless_video, backend, monkeypatch):
    pytest.importorskip(backend)
    monkeypatch.setattr("mindspeed_mm.data.video.video_backend", lambda: backend)
    path, frames = lossless_video
    got = read_video_frames(path, 4, "middle")
    assert [np.array_equal(np.asarray(g), frames[i]) for g, i in zip(got, [2, 7, 12, 17])] == [True] * 4
    got = read_video_frames(path, 3, "rand", clip=[1.0, 1.6], rng=np.random.default_rng(0))
    want = [10 + i for i in frame_indices(3, 6, "rand", rng=np.random.default_rng(0))]
    assert all(np.array_equal(np.asarray(g), frames[i]) for g, i in zip(got, want))


def test_decord_matches_pyav_on_mp4(data):
    pytest.importorskip("decord")
    av = pytest.importorskip("av")
    path = Path(data).parent / "videos" / "red.mp4"
    with av.open(str(path)) as c:
        independent = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    got = read_video_frames(path, 20, "middle")
    assert len(independent) == 20
    assert all(np.array_equal(np.asarray(g), f) for g, f in zip(got, independent))


def test_video_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video_frames(tmp_path / "nope.mp4", 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video_frames(bad, 4)


# ------------------------------------------------------------------------------------------------------------
# Dataset samples
# ------------------------------------------------------------------------------------------------------------

def _check_sample(sample, tokenizer):
    ids, labels = sample["input_ids"], sample["labels"]
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert sample["pixel_values"].dtype == torch.float32 and sample["pixel_values"].shape[1:] == (3, SIZE, SIZE)
    assert int((ids == ctx).sum()) == sample["num_image_tokens"] == sample["pixel_values"].shape[0] * TPT
    assert torch.equal(sample["image_flags"], torch.ones(sample["pixel_values"].shape[0], dtype=torch.long))
    assert not bool((labels[ids == ctx] != IGNORE_INDEX).any())


def test_image_sample_matches_building_blocks(tokenizer, data):
    ds, recs = _dataset(tokenizer, data), _records(data)
    for shape_k in (0, 3):  # a square image (1 tile) and a 3:1 one (3 tiles + thumbnail)
        j = _first(recs, lambda r, k=shape_k: isinstance(r.get("image"), str) and f"_{k}." in r["image"])
        s = ds[j]
        _check_sample(s, tokenizer)
        path = Path(data).parent / recs[j]["image"]
        tiles = dynamic_tiles(load_image(path), SIZE, 1, 6, True)
        assert len(tiles) == (1 if shape_k == 0 else 4)
        assert torch.equal(s["pixel_values"], to_pixel_values(tiles))
        ids, labels = build_conversation(recs[j]["conversations"], [len(tiles)], TPT, tokenizer)
        assert torch.equal(s["input_ids"], ids) and torch.equal(s["labels"], labels)
        answer = tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX])
        assert answer == recs[j]["conversations"][1]["value"] + "<|im_end|>"
        assert s["skipped"] == {}


def test_multi_image_sample(tokenizer, data):
    ds, recs = _dataset(tokenizer, data), _records(data)
    j = _first(recs, lambda r: isinstance(r.get("image"), list))
    s = ds[j]
    _check_sample(s, tokenizer)
    tiles = [dynamic_tiles(load_image(Path(data).parent / p), SIZE, 1, 3, True) for p in recs[j]["image"]]
    assert torch.equal(s["pixel_values"], to_pixel_values(tiles[0] + tiles[1]))  # 6 // 2 = 3 tiles at most each
    ids, _ = build_conversation(recs[j]["conversations"], [len(t) for t in tiles], TPT, tokenizer)
    assert torch.equal(s["input_ids"], ids)


def test_video_sample(tokenizer, data):
    pytest.importorskip("av")
    ds, recs = _dataset(tokenizer, data, seed=11), _records(data)
    j = _first(recs, lambda r: "video" in r and "clip" not in r)
    s = ds[j]
    _check_sample(s, tokenizer)
    n = s["pixel_values"].shape[0]
    assert 2 <= n <= 4  # min_num_frame..max_num_frame of data_tiny.json
    rng = np.random.default_rng([11, j])
    assert n == int(rng.integers(2, 5))
    frames = read_video_frames(Path(data).parent / recs[j]["video"], n, "rand", rng=rng)
    def resized(frame):  # InternVL's build_transform with pad2square false: a plain bicubic resize
        return frame.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert frames[0].size == (64, 48)
    assert torch.equal(s["pixel_values"], to_pixel_values([resized(f) for f in frames]))
    def padded(frame):  # with a Pad2Square step (the reference's pipeline): padded with the mean colour
        square = Image.new("RGB", (64, 64), (123, 116, 103))
        square.paste(frame, (0, 8))
        return square.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    raw = _raw_spec(data)
    raw["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"].insert(
        0, {"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}})
    pad = InternVLChatDataset(load_data_spec(raw), tokenizer, 1024, tokens_per_tile=TPT, seed=11)[j]
    assert torch.equal(pad["pixel_values"], to_pixel_values([padded(f) for f in frames]))
    text = tokenizer.decode(s["input_ids"])
    assert "".join(f"Frame-{i + 1}: <img>" + "<IMG_CONTEXT>" * TPT + "</img>\n" for i in range(n)) in text
    assert torch.equal(ds[j]["pixel_values"], s["pixel_values"])  # seeded per index: the same every time
    clip = ds[_first(recs, lambda r: "clip" in r)]
    _check_sample(clip, tokenizer)


def test_video_fps_sampling_and_shrink(tokenizer, data):
    pytest.importorskip("av")
    recs = _records(data)
    j = _first(recs, lambda r: "video" in r and "clip" not in r)
    ds = _dataset(tokenizer, data, sampling_method="fps2")  # 20 frames at 10 fps: frames 2, 8, 12, 18
    s = ds[j]
    _check_sample(s, tokenizer)
    assert s["pixel_values"].shape[0] == 4
    per_frame = len(tokenizer("Frame-4: <img>" + "<IMG_CONTEXT>" * TPT + "</img>\n")["input_ids"])
    short = _dataset(tokenizer, data, seq_length=s["input_ids"].numel() - 2 * per_frame, sampling_method="fps2")[j]
    _check_sample(short, tokenizer)
    assert short["pixel_values"].shape[0] == 2 and short["skipped"] == {}  # 4 frames halved to 2


def test_fixed_size_images(tokenizer, data):
    ds, recs = _dataset(tokenizer, data, dynamic_image_size=False), _records(data)
    j = _first(recs, lambda r: isinstance(r.get("image"), list) and "_10." not in r["image"][0])  # not square
    s = ds[j]
    _check_sample(s, tokenizer)
    assert s["pixel_values"].shape[0] == 2
    image = load_image(Path(data).parent / recs[j]["image"][0])
    assert image.width != image.height
    want = to_pixel_values([image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)])  # pad2square false
    assert torch.equal(s["pixel_values"][:1], want)
    raw = _raw_spec(data, dynamic_image_size=False)
    raw["dataset_param"]["preprocess_parameters"]["train_pipeline"]["image"].insert(
        0, {"trans_type": "Pad2Square", "param": {"mean": [0.485, 0.456, 0.406]}})
    padded = InternVLChatDataset(load_data_spec(raw), tokenizer, 1024, tokens_per_tile=TPT)[j]
    side = max(image.size)
    square = Image.new("RGB", (side, side), (123, 116, 103))  # Pad2Square with the mean colour, centred
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    want = to_pixel_values([square.resize((SIZE, SIZE), Image.Resampling.BICUBIC)])
    assert torch.equal(padded["pixel_values"][:1], want)


def test_text_only_sample(tokenizer, data):
    ds, recs = _dataset(tokenizer, data), _records(data)
    j = _first(recs, lambda r: "image" not in r and "video" not in r)
    s = ds[j]
    _check_sample(s, tokenizer)
    assert s["pixel_values"].shape == (0, 3, SIZE, SIZE) and s["num_image_tokens"] == 0
    ids, labels = build_conversation(recs[j]["conversations"], [], TPT, tokenizer)
    assert torch.equal(s["input_ids"], ids) and torch.equal(s["labels"], labels)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_overlong_image_sample_shrinks_then_skips(tokenizer, data, tmp_path):
    wide = next(r["image"] for r in _records(data) if isinstance(r.get("image"), str) and "_3." in r["image"])
    conv = [{"from": "human", "value": "<image>\nWhat colour is this picture?"}, {"from": "gpt", "value": "It is red."}]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": str(Path(data).parent / wide), "conversations": conv},
                                               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ok"}]}])
    full = _dataset(tokenizer, path)[0]
    assert full["pixel_values"].shape[0] == 4  # 3x1 grid + thumbnail
    text_len = full["input_ids"].numel() - 4 * TPT
    # room for 2 tiles: the budget halves 6 -> 3 (still 4 tiles) -> 1 (one tile, no thumbnail)
    s = _dataset(tokenizer, path, seq_length=text_len + 2 * TPT)[0]
    _check_sample(s, tokenizer)
    assert s["pixel_values"].shape[0] == 1 and s["input_ids"].numel() == text_len + TPT and s["skipped"] == {}
    one_tile = to_pixel_values(dynamic_tiles(load_image(Path(data).parent / wide), SIZE, 1, 1, True))
    assert torch.equal(s["pixel_values"], one_tile)
    # not even one tile fits: the sample is replaced by the next one and counted
    s = _dataset(tokenizer, path, seq_length=text_len + TPT - 1)[0]
    _check_sample(s, tokenizer)
    assert s["skipped"] == {"too_long": 1} and s["num_image_tokens"] == 0


def test_overlong_text_sample_truncated_or_skipped(tokenizer, tmp_path):
    long_answer = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red green blue " * 200}]
    long_question = [{"from": "human", "value": "red green blue " * 200}, {"from": "gpt", "value": "ok"}]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"conversations": long_answer}, {"conversations": long_question}])
    ds = _dataset(tokenizer, path, seq_length=300)
    s = ds[0]
    full, _ = build_conversation(long_answer, [], TPT, tokenizer)
    assert s["input_ids"].numel() == 300 and torch.equal(s["input_ids"], full[:300])
    assert bool((s["labels"] != IGNORE_INDEX).any()) and s["skipped"] == {}
    s = ds[1]  # no answer token within 300: skipped, replaced by record 0
    assert s["skipped"] == {"too_long": 1} and s["input_ids"].numel() == 300


def test_repeat_time_and_several_files(tokenizer, data):
    raw = _raw_spec(data)
    basic = raw["dataset_param"]["basic_parameters"]
    raw["dataset_param"]["basic_parameters"] = [dict(basic, repeat_time=2), dict(basic, repeat_time=0.25)]
    n = len(_records(data))
    ds = InternVLChatDataset(load_data_spec(raw), tokenizer, 1024, TPT)
    assert len(ds) == 2 * n + int(n * 0.25)
    assert torch.equal(ds[n + 1]["input_ids"], ds[1]["input_ids"])
    record, _, tag = ds.records[2 * n + 1]  # the fraction: a seeded subset, in file order
    line = int(tag.rsplit(":", 1)[1]) - 1
    assert record == _records(data)[line] and ds.records.basic(2 * n).name == "data#2"


def test_broken_samples_are_skipped_and_counted(tokenizer, broken_data, caplog):
    ds = _dataset(tokenizer, broken_data)
    totals, seen, loaded = {}, set(), {}
    with caplog.at_level(logging.WARNING, logger="mindspeed_mm.data.dataset"):
        for i in range(len(ds)):
            s = ds[i]
            _check_sample(s, tokenizer)
            for k, v in s["skipped"].items():
                totals[k] = totals.get(k, 0) + v
            for k, v in s["loaded"].items():
                loaded[k] = loaded.get(k, 0) + v
    for record in caplog.records:
        if record.getMessage().startswith("skipping sample"):
            seen.add(record.getMessage().split("): ")[1].split(":")[0])
    assert set(totals) == set(BROKEN_REASONS) == seen
    assert all(totals[k] >= v for k, v in BROKEN_REASONS.items()), totals
    assert set(loaded) == set(BROKEN_LOADED) and all(loaded[k] >= v for k, v in BROKEN_LOADED.items()), loaded
    assert "does_not_exist.png" in caplog.text and "not_an_image.png" in caplog.text and "corrupt.mp4" in caplog.text
    assert "truncated.png is truncated; training on it" in caplog.text

    loader = build_dataloader(ds, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0, consumed_samples=0,
                              num_workers=0, pad_id=tokenizer.pad_token_id)
    summed = {}
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    for batch in islice(loader, len(ds) // 4):
        ids = batch["input_ids"]
        assert ids.shape == batch["labels"].shape == batch["attention_mask"].shape and ids.shape[0] == 4
        assert int((ids == ctx).sum()) == batch["num_image_tokens"] == batch["pixel_values"].shape[0] * TPT
        assert batch["num_tokens"] == int(batch["attention_mask"].sum())
        for k, v in batch["skipped"].items():
            summed[k] = summed.get(k, 0) + v
    assert set(summed) <= set(BROKEN_REASONS) and sum(summed.values()) >= 1


# ------------------------------------------------------------------------------------------------------------
# Collate
# ------------------------------------------------------------------------------------------------------------

def test_collate_pads_and_concatenates():
    def sample(n, tiles, skipped=None):
        return {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(n) - 50,
                "pixel_values": torch.randn(tiles, 3, 4, 4), "image_flags": torch.ones(tiles, dtype=torch.long),
                "num_image_tokens": tiles * 2, "skipped": skipped or {}}
    a, b, c = sample(3, 2, {"too_long": 1}), sample(5, 0), sample(2, 1, {"too_long": 2, "bad_image": 1})
    out = collate_internvl([a, b, c], pad_id=9)
    assert out["input_ids"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5], [1, 2, 9, 9, 9]]
    assert out["labels"][0].tolist() == [-50, -49, -48, -100, -100]
    assert out["attention_mask"].tolist()[2] == [True, True, False, False, False]
    assert torch.equal(out["pixel_values"], torch.cat([a["pixel_values"], c["pixel_values"]]))
    assert out["image_flags"].tolist() == [1, 1, 1]
    assert (out["num_samples"], out["num_tokens"], out["num_image_tokens"]) == (3, 10, 6)
    assert out["skipped"] == {"too_long": 3, "bad_image": 1}
    text_only = collate_internvl([sample(2, 0)], pad_id=0)
    assert text_only["pixel_values"] is None and text_only["image_flags"] is None


# ------------------------------------------------------------------------------------------------------------
# Sampler and loader
# ------------------------------------------------------------------------------------------------------------

def _stream(total, mbs, dp, seed, consumed=0, steps=10, **kw):
    """Per step, the micro-batches of all DP ranks."""
    its = [iter(ResumableBatchSampler(total, mbs, r, dp, seed, consumed, **kw)) for r in range(dp)]
    return [[next(it) for it in its] for _ in range(steps)]


def test_sampler_partitions_and_epochs():
    total, mbs, dp = 23, 2, 3  # 3 global micro-batches of 6 per epoch, 5 samples dropped
    steps = _stream(total, mbs, dp, seed=5, steps=9)
    for step in steps:
        flat = [i for mb in step for i in mb]
        assert all(len(mb) == mbs for mb in step) and len(set(flat)) == mbs * dp
    for epoch in range(3):
        seen = [i for step in steps[3 * epoch: 3 * epoch + 3] for mb in step for i in mb]
        assert len(seen) == len(set(seen)) == 18
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert seen == perm[:18]
    assert _stream(total, mbs, dp, seed=5, steps=3) != _stream(total, mbs, dp, seed=6, steps=3)
    assert [mb for step in _stream(10, 2, 1, 0, steps=5, shuffle=False) for mb in step] == \
        [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_equals_uninterrupted(drop_last):
    total, mbs, dp, seed = 23, 2, 3, 1
    full = _stream(total, mbs, dp, seed, steps=12, drop_last=drop_last)
    for stop in (1, 3, 4, 7):  # 3 and 4: at and just after an epoch boundary (drop_last)
        resumed = _stream(total, mbs, dp, seed, consumed=stop * mbs * dp, steps=12 - stop, drop_last=drop_last)
        assert resumed == full[stop:]
    if not drop_last:  # every sample once per epoch, even those of a micro-batch spanning two epochs
        flat = [i for step in full for mb in step for i in mb]
        assert sorted(flat[:total]) == list(range(total)) and sorted(flat[total:2 * total]) == list(range(total))
    with pytest.raises(ValueError, match="multiple"):
        ResumableBatchSampler(total, mbs, 0, dp, seed, consumed_samples=5)


def test_loader_workers_match_single_process(tokenizer, broken_data):
    ds = _dataset(tokenizer, broken_data)

    def batches(workers, consumed=0):
        loader = build_dataloader(ds, 2, dp_rank=1, dp_size=2, seed=3, consumed_samples=consumed,
                                  num_workers=workers, pad_id=tokenizer.pad_token_id)
        return list(islice(loader, 6))

    def same(x, y):
        assert x.keys() == y.keys()
        for k in x:
            assert (torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]), k

    single, multi = batches(0), batches(2)
    for x, y in zip(single, multi):
        same(x, y)
    for x, y in zip(batches(0, consumed=8), single[2:]):
        same(x, y)


def test_tiny_dataset_is_deterministic(tmp_path):
    a = write_tiny_dataset(tmp_path / "a", SIZE, seed=4)
    b = write_tiny_dataset(tmp_path / "b", SIZE, seed=4)
    assert a.read_text() == b.read_text()
    for p in sorted((tmp_path / "a" / "images").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    assert copy.deepcopy(_records(a)) == _records(b)


# ------------------------------------------------------------------------------------------------------------
# InternVL's own preprocessing (its LazySupervisedDataset), its rules written out here
# ------------------------------------------------------------------------------------------------------------

def _internvl_fps_indices(vlen, input_fps, sample):
    """InternVL's get_frame_indices for 'fps<r>' as read_frames_decord calls it (max_num_frames left at -1)."""
    output_fps = float(sample[3:])
    delta = 1 / output_fps
    seconds = np.arange(delta / 2, vlen / input_fps + delta / 2, delta)
    return [int(e) for e in np.around(seconds * input_fps).astype(int) if e < vlen]


def test_fps_sampling_is_not_capped_by_max_num_frame(tokenizer, tmp_path):
    pytest.importorskip("av")
    want = _internvl_fps_indices(120, 12, "fps2")  # a 10 s clip at 12 fps
    assert len(want) == 20 and want[:3] == [3, 9, 15]
    assert frame_indices(None, 120, "fps2", fps=12) == want
    assert frame_indices(12, 120, "fps2", fps=12) == want[:12]  # an explicit cap keeps the first ones
    frames = [np.full((48, 64, 3), (i * 2, 255 - i * 2, 100), np.uint8) for i in range(120)]
    write_video(tmp_path / "clip.mp4", frames, fps=12)
    (tmp_path / "d.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Colours."}]}) + "\n")
    s = _dataset(tokenizer, tmp_path / "d.jsonl", seq_length=4096, sampling_method="fps2", max_num_frame=12)[0]
    assert s["pixel_values"].shape[0] == 20 and s["num_image_tokens"] == 20 * TPT  # InternVL: 20, not 12
    assert "Frame-20: <img>" in tokenizer.decode(s["input_ids"])


def _skimage_photo(name):
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image not installed (pip install -e .[test])")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def test_truncated_jpeg_is_trained_on_and_counted(tokenizer, tmp_path):
    from PIL import ImageFile

    data = _skimage_photo("rocket.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "text.jpg").write_text("not an image\n")
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")  # strictly, PIL refuses it
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # InternVL's internvl_chat_finetune.py sets this at import
    try:
        internvl = Image.open(tmp_path / "cut.jpg").convert("RGB")  # its load_image
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A rocket."}]
    lines = [{"image": "cut.jpg", "conversations": turns}, {"image": "text.jpg", "conversations": turns},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = _dataset(tokenizer, tmp_path / "d.jsonl")
    s = ds[0]
    assert s["loaded"] == {"truncated_image": 1} and s["skipped"] == {}
    assert ImageFile.LOAD_TRUNCATED_IMAGES == before  # the switch is not left on
    tiles = dynamic_tiles(internvl, SIZE, 1, 6, True)  # data_tiny.json: max_dynamic_patch 6, thumbnail
    assert torch.equal(s["pixel_values"], to_pixel_values(tiles))
    assert s["num_image_tokens"] == len(tiles) * TPT
    assert collate_internvl([s, ds[2]], pad_id=0)["loaded"] == {"truncated_image": 1}
    bad = ds[1]  # not an image at all: still skipped, and the next record used
    assert bad["skipped"] == {"bad_image": 1} and bad["loaded"] == {} and bad["num_image_tokens"] == 0
    strict = _dataset(tokenizer, tmp_path / "d.jsonl", skip_truncated_images=True)[0]
    assert strict["skipped"] == {"truncated_image": 1, "bad_image": 1} and strict["num_image_tokens"] == 0


def _internvl2_5_ids(tokenizer, conversations, num_image_token_list):
    """InternVL's preprocess_internvl2_5 (no system turn in the record, a tokenizer without BOS): the first
    len(list) <image> of the human turns, in order, become <img><IMG_CONTEXT>*n</img>; each turn is tokenised
    alone; system and human turns are ignored, and each gpt turn's `<|im_start|>assistant\\n` and last token."""
    k, batches, roles = 0, [f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"], ["system"]
    for turn in conversations:
        value = turn["value"]
        if turn["from"] == "human":
            for _ in range(value.count("<image>")):
                if k == len(num_image_token_list):
                    break
                value = value.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token_list[k] + "</img>", 1)
                k += 1
            batches.append(f"<|im_start|>user\n{value}<|im_end|>\n")
        else:
            batches.append(f"<|im_start|>assistant\n{value}<|im_end|>\n")
        roles.append(turn["from"])
    assert k == len(num_image_token_list)
    ignore_len = len(tokenizer("<|im_start|>assistant\n")["input_ids"])
    ids, labels = [], []
    for role, text in zip(roles, batches):
        t = list(tokenizer(text)["input_ids"])
        ids += t
        labels += [IGNORE_INDEX] * len(t) if role != "gpt" else [IGNORE_INDEX] * ignore_len + t[ignore_len:-1] + [
            IGNORE_INDEX]
    return ids, labels


def test_later_turn_placeholder_kept_where_written(tokenizer, tmp_path):
    assert not getattr(tokenizer, "add_bos_token", False)
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(tmp_path / "red.png")  # square: one tile, no thumbnail
    turns = [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."},
             {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": ["red.png"], "conversations": turns}) + "\n"  # InternVL: multi_modal_multi_image_get_item
        + json.dumps({"image": "red.png", "conversations": turns}) + "\n"  # ours alike; see the note below
        + json.dumps({"image": "red.png", "conversations": turns[:2]}) + "\n")  # no placeholder at all
    ds = _dataset(tokenizer, tmp_path / "d.jsonl")
    want_ids, want_labels = _internvl2_5_ids(tokenizer, turns, [TPT])
    first_turns = sum(len(tokenizer(t)["input_ids"]) for t in (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n", "<|im_start|>user\nHello.<|im_end|>\n",
        "<|im_start|>assistant\nHi.<|im_end|>\n", "<|im_start|>user\n<img>"))
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    for j in (0, 1):
        s = ds[j]
        assert s["skipped"] == {}, s["skipped"]  # was dropped as malformed: one placeholder too many
        assert s["input_ids"].tolist() == want_ids and s["labels"].tolist() == want_labels
        where = (s["input_ids"] == ctx).nonzero().flatten().tolist()
        assert where == list(range(first_turns, first_turns + TPT))  # in the third turn, after "user\n<img>"
    # InternVL's multi_modal_get_item (image as a string) would prefix "<image>\n" to the first turn and leave
    # the later "<image>" as text; here the image stays where the record puts it (record 1, above).
    s = ds[2]  # no placeholder anywhere: "<image>\n" prefixed to the first turn, as InternVL does
    want_ids, want_labels = _internvl2_5_ids(tokenizer, [{"from": "human", "value": "<image>\nHello."},
                                                         turns[1]], [TPT])
    assert s["input_ids"].tolist() == want_ids and s["labels"].tolist() == want_labels
