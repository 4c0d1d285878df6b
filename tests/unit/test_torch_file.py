"""torch_file writes torch.save's bytes (all but the 40-digit serialization id) and reads torch.save files
into views of one mapping, without importing torch; torch is the oracle here."""
from __future__ import annotations

import collections
import ctypes
import datetime
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.checkpoint import torch_file as tf


@pytest.fixture(autouse=True)
def _no_crc32():
    from torch.utils.serialization import config

    crc, config.save.compute_crc32 = config.save.compute_crc32, False
    yield
    config.save.compute_crc32 = crc


@dataclass(eq=False)
class Leaf:
    tensor: torch.Tensor


def _leaf(x):
    return (tuple(x.tensor.shape), str(x.tensor.dtype).removeprefix("torch.")) if isinstance(x, Leaf) else None


def _without_id(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    offset, size = tf.record_spans(path)[".data/serialization_id"]
    assert size == 40 and data[offset:offset + size].isdigit()
    data[offset:offset + size] = b"0" * size
    return bytes(data)


def _obj(g: torch.Generator) -> dict:
    w = torch.randn(5, 7, generator=g).bfloat16()
    return {
        "model0": {"w": w, "b": torch.randn(7, generator=g), "empty": torch.zeros(0, 4, dtype=torch.float16),
                   "scalar": torch.tensor(3.5), "i": torch.randint(-9, 9, (4, 2), generator=g), "tied": w},
        "model1": {"h": torch.randn(3, 0, 2, generator=g).half(), "m": torch.rand(6, generator=g) > 0.5,
                   "0": torch.arange(3, dtype=torch.int8), "cpu": torch.arange(4, dtype=torch.uint8),
                   "d": torch.randn(2, 3, generator=g).double(), "i32": torch.arange(5, dtype=torch.int32),
                   "i16": torch.arange(2, dtype=torch.int16)},
        "checkpoint_version": 3.0,
        "iteration": 3,
        "args": {"lr": 0.1, "name": "x", "flags": [True, None], "device": "cpu", "big": 2**70, "neg": -5,
                 "t": (1, "storage", 2.5), "many": list(range(1500))},
    }


def _keep_identity(obj, seen):
    """obj with one Leaf per tensor object, so a tensor saved twice is one leaf met twice."""
    if isinstance(obj, dict):
        return {k: _keep_identity(v, seen) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return seen.setdefault(id(obj), Leaf(obj))
    return obj


def _write(path: Path, obj) -> tuple[dict, list[Leaf]]:
    data, leaves = tf.dumps(_keep_identity(obj, {}), _leaf)
    sizes = [x.tensor.numel() * x.tensor.element_size() for x in leaves]
    spans = tf.write_archive(path, [("data.pkl", data), (".format_version", b"1"), (".storage_alignment", b"64"),
                                    ("byteorder", b"little")] + [(f"data/{i}", n) for i, n in enumerate(sizes)])
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, x in enumerate(leaves):
            os.pwrite(fd, x.tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), spans[f"data/{i}"][0])
    finally:
        os.close(fd)
    return spans, leaves


def test_dumps_and_write_archive_equal_torch_save(tmp_path):
    obj = _obj(torch.Generator().manual_seed(0))
    (tmp_path / "ref").mkdir()
    ref = tmp_path / "ref" / "model_optim_rng.pt"
    torch.save(obj, ref)

    out = tmp_path / "model_optim_rng.pt"
    spans, leaves = _write(out, obj)
    assert len(leaves) == 12  # 13 tensors, "tied" being "w"
    assert spans == tf.record_spans(out) == tf.record_spans(ref)
    assert _without_id(out) == _without_id(ref)
    assert all(offset % 64 == 0 for offset, _ in spans.values())

    loaded = torch.load(out, weights_only=True)
    for part in ("model0", "model1"):
        for k, t in obj[part].items():
            assert loaded[part][k].dtype == t.dtype and torch.equal(loaded[part][k], t)
    assert loaded["args"] == obj["args"] and loaded["iteration"] == 3
    assert loaded["model0"]["tied"].data_ptr() == loaded["model0"]["w"].data_ptr()


def _pickle_of(path: Path) -> bytes:
    offset, size = tf.record_spans(path)["data.pkl"]
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_dumps_shared_shape_tuple_pickles_as_torch(tmp_path):
    shape = (2, 3)  # one tuple for both leaves; torch pickles a fresh tuple per tensor, never a memo reference
    obj = {"a": torch.zeros(shape), "b": torch.zeros(shape), "c": "cpu"}
    torch.save(obj, tmp_path / "s.pt")
    data, leaves = tf.dumps({"a": Leaf(obj["a"]), "b": Leaf(obj["b"]), "c": "cpu"},
                            lambda x: (shape, "float32") if isinstance(x, Leaf) else None)
    assert data == _pickle_of(tmp_path / "s.pt") and len(leaves) == 2


def _gaps(spans: dict[str, tuple[int, int]], reserved: list[str], end: int) -> list[tuple[int, int]]:
    holes = sorted(spans[name] for name in reserved)
    out, at = [], 0
    for offset, size in holes:
        out.append((at, offset))
        at = offset + size
    return out + [(at, end)]


@pytest.mark.parametrize("sizes", [[12, 5 * 2**30, 12, 12], [2**32 - 1 - 60, 100], [2**32 - 1, 3],
                                   [2**32 - 2, 0, 7], [2**32 - 200, 2**32 + 5],
                                   # data/1's header at 0xFFFFFFFF, then one byte below it
                                   [2**32 - 1 - 144, 5], [2**32 - 2 - 144, 5]])
def test_write_archive_zip64_layout_equals_torch_writer(tmp_path, sizes):
    ref = tmp_path / "ref" / "big.pt"
    ref.parent.mkdir()
    with torch.serialization._open_zipfile_writer(str(ref)) as zf:
        zf.write_record("data.pkl", b"abc", 3)
        for i, n in enumerate(sizes):
            zf.write_record_metadata(f"data/{i}", n)
    out = tmp_path / "big.pt"
    names = [f"data/{i}" for i in range(len(sizes))]
    spans = tf.write_archive(out, [("data.pkl", b"abc")] + list(zip(names, sizes)))
    assert spans == tf.record_spans(out) == tf.record_spans(ref)
    end = out.stat().st_size
    assert end == ref.stat().st_size
    id_offset, _ = spans[".data/serialization_id"]
    with open(out, "rb") as a, open(ref, "rb") as b:
        for start, stop in _gaps(spans, names, end):
            a.seek(start), b.seek(start)
            x, y = bytearray(a.read(stop - start)), bytearray(b.read(stop - start))
            if start <= id_offset < stop:
                x[id_offset - start:id_offset - start + 40] = y[id_offset - start:id_offset - start + 40]
            assert x == y, (start, stop)
    with zipfile.ZipFile(out) as z:
        assert [(i.filename, i.file_size) for i in z.infolist()][1:1 + len(sizes)] == [
            (f"big/{n}", s) for n, s in zip(names, sizes)]


def test_write_archive_many_records_equals_torch_writer(tmp_path):
    n = 0xFFFF + 3  # past the plain end record's 16-bit entry counts
    ref = tmp_path / "ref" / "many.pt"
    ref.parent.mkdir()
    with torch.serialization._open_zipfile_writer(str(ref)) as zf:
        for i in range(n):
            zf.write_record(f"r{i}", b"x", 1)
    out = tmp_path / "many.pt"
    tf.write_archive(out, [(f"r{i}", b"x") for i in range(n)])
    assert _without_id(out) == _without_id(ref)


def test_archive_name_is_torch_basename(tmp_path):
    for name in ("a.b.pt", "noext", "ünïcode.pt"):
        ref, out = tmp_path / "ref" / name, tmp_path / name
        ref.parent.mkdir(exist_ok=True)
        with torch.serialization._open_zipfile_writer(str(ref)) as zf:
            zf.write_record("data.pkl", b"abc", 3)
        tf.write_archive(out, [("data.pkl", b"abc")])
        assert _without_id(out) == _without_id(ref), name


def _address(a) -> int:
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else ctypes.addressof(
        ctypes.c_char.from_buffer(a))


def _as_torch(st: tf.StoredTensor) -> torch.Tensor:
    return torch.from_numpy(st.array.copy()).view(getattr(torch, st.dtype))


def test_load_views_the_mapped_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=g).bfloat16()
    m = torch.randn(3, 5, generator=g)
    obj = {"w": w, "rows": w[1:3], "col": w[:, 2], "t": m.t(), "b": torch.rand(5, generator=g) > 0.5,
           "s": torch.tensor(7, dtype=torch.int64), "e": torch.zeros(0, 3),
           "more": [torch.arange(6, dtype=torch.int16).reshape(2, 3)[:, 1:], (1, "x", b"yz", b"")],
           "od": collections.OrderedDict(a=1.5), "none": None, "flag": False}
    path = tmp_path / "f.pt"
    torch.save(obj, path)
    keys = {"w": "0", "rows": "0", "col": "0", "t": "1", "b": "2", "s": "3", "e": "4"}

    got, mm = tf.load(path)
    base = _address(mm)
    spans = tf.record_spans(path)
    flat = {**{k: got[k] for k in keys}, "more": got["more"][0]}
    ref = {**{k: obj[k] for k in keys}, "more": obj["more"][0]}
    for k, st in flat.items():
        t = ref[k]
        assert isinstance(st, tf.StoredTensor) and st.dtype == str(t.dtype).removeprefix("torch.")
        assert st.array.dtype == tf.NUMPY_DTYPES[st.dtype] and st.array.shape == tuple(t.shape)
        assert st.array.strides == tuple(s * t.element_size() for s in t.stride())
        assert torch.equal(_as_torch(st), t), k
        if k in keys:
            assert _address(st.array) - base == spans[f"data/{keys[k]}"][0] + t.storage_offset() * t.element_size()
    assert np.shares_memory(got["w"].array, got["rows"].array) and np.shares_memory(got["w"].array, got["col"].array)
    assert got["more"][1] == (1, "x", b"yz", b"")
    assert type(got["od"]) is collections.OrderedDict and got["od"] == obj["od"]
    assert got["none"] is None and got["flag"] is False
    got["w"].array[0, 0] = 0  # a private mapping: the file is untouched
    assert torch.equal(torch.load(path, weights_only=False)["w"], w)  # b"" pickles as builtins.bytes


def test_load_reads_what_write_archive_wrote(tmp_path):
    obj = _obj(torch.Generator().manual_seed(2))
    _write(tmp_path / "x.pt", obj)
    got, _ = tf.load(tmp_path / "x.pt")
    assert got["args"] == obj["args"] and got["iteration"] == 3
    for part in ("model0", "model1"):
        assert all(torch.equal(_as_torch(got[part][k]), t) for k, t in obj[part].items())
    assert got["model0"]["tied"] is got["model0"]["w"]


def test_load_refuses_other_globals(tmp_path):
    path = tmp_path / "date.pt"
    torch.save({"x": datetime.date(2020, 1, 2)}, path)
    with pytest.raises(tf.UnsupportedPickle, match=r"date\.pt.*datetime\.date"):
        tf.load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy.pt"):
        tf.load(legacy)


def test_module_does_not_import_torch():
    code = "import mindspeed_mm.checkpoint.torch_file, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_torch_reads_a_file_past_4_gib(tmp_path):
    """A rank file larger than 4 GiB (zip64 offsets; a resplit of the 8B shape to TP1 PP2 writes 7.7 GiB
    ones) is read by torch.load itself, and by `load`. The big record stays a hole, so this costs no disk."""
    from mindspeed_mm.checkpoint.streaming_save import LazyTensor, _tensor_leaf

    big = (2**32 + 2**20) // 2  # bf16 elements
    small = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    obj = {"model": {"big": LazyTensor((big,), "bfloat16", lambda: None),
                     "small": LazyTensor((2, 3), "float32", lambda: None)}, "checkpoint_version": 3.0}
    data, leaves = tf.dumps(obj, _tensor_leaf)
    path = tmp_path / "model_optim_rng.pt"
    spans = tf.write_archive(path, [("data.pkl", data), (".format_version", b"1"), (".storage_alignment", b"64"),
                                    ("byteorder", b"little"), ("data/0", big * 2), ("data/1", 24)])
    assert spans["data/1"][0] > 2**32
    with open(path, "r+b") as f:
        f.seek(spans["data/1"][0])
        f.write(small.numpy().tobytes())
    back = torch.load(path, mmap=True, weights_only=True)
    assert back["model"]["big"].shape == (big,) and back["model"]["big"].dtype == torch.bfloat16
    assert torch.equal(back["model"]["small"], small) and back["checkpoint_version"] == 3.0
    ours, _ = tf.load(path)
    assert ours["model"]["small"].array.tolist() == small.tolist() and ours["model"]["big"].array.shape == (big,)
