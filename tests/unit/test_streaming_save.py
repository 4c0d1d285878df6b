"""save_streaming writes torch.save's bytes (all but torch's serialization id), without torch, from tensors,
numpy arrays, row pieces, or file ranges copied by the kernel, with producer errors raised in the caller and
nothing of ours needed to load the file."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.checkpoint import streaming_save as ss
from mindspeed_mm.checkpoint.streaming_save import LazyTensor, no_crc32, save_streaming
from mindspeed_mm.testing.torch_files import without_serialization_id


def _obj(g: torch.Generator) -> dict:
    return {
        "model0": {"w": torch.randn(5, 7, generator=g).bfloat16(), "b": torch.randn(7, generator=g),
                   "empty": torch.zeros(0, 4, dtype=torch.float16), "scalar": torch.tensor(3.5)},
        "model1": {"i": torch.randint(0, 9, (4, 2), generator=g), "h": torch.randn(3, 2, 2, generator=g).half()},
        "checkpoint_version": 3.0,
    }


def _lazy(obj, make=lambda t: (lambda: t)):
    if isinstance(obj, dict):
        return {k: _lazy(v, make) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return LazyTensor(tuple(obj.shape), obj.dtype, make(obj), "t")
    return obj


def _torch_save(obj, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with no_crc32():
        torch.save(obj, path)
    return without_serialization_id(path)


@pytest.mark.parametrize("budget,writers", [(1, 1), (10**9, 1), (1, 3), (10**9, 3)])
def test_same_bytes_as_torch_save(tmp_path, budget, writers):
    obj = _obj(torch.Generator().manual_seed(0))
    want = _torch_save(obj, tmp_path / "a" / "rank.pt")  # the archive name comes from the file name
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "rank.pt", _lazy(obj), budget_bytes=budget, writers=writers)
    assert without_serialization_id(tmp_path / "b" / "rank.pt") == want
    back = torch.load(tmp_path / "b" / "rank.pt", weights_only=True, mmap=True)
    for chunk in ("model0", "model1"):
        for k, t in obj[chunk].items():
            assert back[chunk][k].dtype == t.dtype and torch.equal(back[chunk][k], t)


def test_row_pieces_are_stored_as_one_tensor(tmp_path):
    t = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = _torch_save({"x": t}, tmp_path / "a" / "r.pt")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"x": LazyTensor((10, 3), torch.bfloat16,
                                                             lambda: [t[:4], t[4:5], t[5:5], t[5:]])})
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_pieces_located_in_a_file(tmp_path, monkeypatch, kernel_copy):
    """Pieces that are views of a mapped file are copied file to file (or, where the kernel cannot, stored
    from memory and handed to `after_write`): the bytes are the same either way."""
    monkeypatch.setattr(ss, "_kernel_copy", [kernel_copy and hasattr(os, "copy_file_range")])
    src = torch.randn(64, 33, generator=torch.Generator().manual_seed(2)).bfloat16()
    raw = tmp_path / "src.bin"
    raw.write_bytes(b"x" * 13 + src.view(torch.uint8).numpy().tobytes())  # an unaligned start, as in safetensors
    f = open(raw, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    full = torch.frombuffer(m, dtype=torch.bfloat16, count=src.numel(), offset=13).view(64, 33)
    base = full.data_ptr() - 13
    located, stored = [], []

    def locate(p):
        located.append(p.shape[0])
        return f.fileno(), p.data_ptr() - base

    want = _torch_save({"y": torch.cat([src[40:], src[:40]])}, tmp_path / "a" / "r.pt")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"y": LazyTensor((64, 33), torch.bfloat16, lambda: [full[40:], full[:40]],
                                                             locate=locate, after_write=stored.append)})
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want
    assert located == [24, 40]
    assert len(stored) == (0 if ss._kernel_copy[0] else 2)
    full = None  # the mapping cannot close while a view of it lives
    m.close()
    f.close()


@pytest.mark.parametrize("writers", [1, 3])
def test_producer_error_is_raised_by_the_caller(tmp_path, writers):
    def boom():
        raise OSError("source vanished")

    obj = {"a": LazyTensor((2,), torch.float32, lambda: torch.zeros(2)), "b": LazyTensor((2,), torch.float32, boom),
           "c": LazyTensor((2,), torch.float32, lambda: torch.zeros(2))}
    with pytest.raises(OSError, match="source vanished"):
        save_streaming(tmp_path / "r.pt", obj, writers=writers)


def test_wrong_declared_shape_names_the_tensor(tmp_path):
    obj = {"a": LazyTensor((3,), torch.float32, lambda: torch.zeros(2), "decoder.w (tp_rank 1)")}
    with pytest.raises(ValueError, match=r"decoder\.w \(tp_rank 1\).*declared \(3,\)"):
        save_streaming(tmp_path / "r.pt", obj)
    bad_dtype = {"a": LazyTensor((2,), torch.bfloat16, lambda: torch.zeros(2), "w")}
    with pytest.raises(ValueError, match="w: produced"):
        save_streaming(tmp_path / "r2.pt", bad_dtype)


def test_numpy_pieces(tmp_path):
    """The converter's pieces are numpy arrays, bfloat16 as uint16 of the same bytes; declared by name."""
    t = torch.randn(6, 4, generator=torch.Generator().manual_seed(4)).bfloat16()
    b = torch.arange(5, dtype=torch.int64)
    want = _torch_save({"x": t, "b": b}, tmp_path / "a" / "r.pt")
    u16 = t.view(torch.int16).numpy().view("<u2")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"x": LazyTensor((6, 4), "bfloat16", lambda: [u16[:2], u16[2:]]),
                                             "b": LazyTensor((5,), "int64", lambda: b.numpy())})
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want
    bad = {"x": LazyTensor((6, 4), "bfloat16", lambda: u16.view("<i2"), "x")}  # int16 is not bfloat16
    with pytest.raises(ValueError, match="x: produced"):
        save_streaming(tmp_path / "b" / "r2.pt", bad)


@pytest.mark.parametrize("kind", ["views", "transposed"])
def test_side_by_side_columns(tmp_path, monkeypatch, kind):
    """A column slice made of several sources' columns is stored a block of rows at a time, never joined
    whole; each part is handed back after, so its mapped pages can go."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1500, 6, generator=g).bfloat16(), torch.randn(1500, 10, generator=g).bfloat16()
    want = _torch_save({"w": torch.cat([a[:, 1:4], b[:, 2:], a[:, :0]], dim=1)}, tmp_path / "a" / "r.pt")
    na, nb = (t.view(torch.int16).numpy().view("<u2") for t in (a, b))
    if kind == "transposed":  # rows of a column-major source are strided
        na = np.asfortranarray(na)
    blocks = []
    real = ss._pwrite_all
    monkeypatch.setattr(ss, "_pwrite_all", lambda fd, p, off: blocks.append(p.shape[0]) or real(fd, p, off))
    monkeypatch.setattr(ss, "_BLOCK_BYTES", 22 * 600)  # 600 rows of 11 bf16 per block
    stored = []
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"w": LazyTensor(
        (1500, 11), "bfloat16", lambda: [ss.SideBySide((na[:, 1:4], nb[:, 2:], na[:, :0]))], "w",
        after_write=stored.append)})
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want
    assert blocks[1:] == [600, 600, 300]  # after the outer call: the blocks
    assert len(stored) == 3


def test_writeback_starts_while_writing(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES stored, and at the end, the file's dirty pages are handed to the disk; the bytes
    are the same."""
    obj = _obj(torch.Generator().manual_seed(6))
    want = _torch_save(obj, tmp_path / "a" / "rank.pt")
    calls = []
    monkeypatch.setattr(ss, "_start_writeback", lambda fd: calls.append(fd))
    monkeypatch.setattr(ss, "WRITEBACK_BYTES", 100)  # the 5x7 bf16 and 4x2 int64 tensors pass it alone
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "rank.pt", _lazy(obj))
    assert without_serialization_id(tmp_path / "b" / "rank.pt") == want
    assert len(calls) >= 2


def test_real_tensors_are_refused(tmp_path):
    with pytest.raises(TypeError, match="LazyTensor"):
        save_streaming(tmp_path / "r.pt", {"a": torch.zeros(2)})
