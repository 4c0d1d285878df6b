"""save_streaming writes torch.save's bytes (all but torch's serialization id), without torch, from tensors,
numpy arrays, row pieces or column parts, chunk by chunk with O_DIRECT where the filesystem takes it, with
producer errors raised in the caller and nothing of ours needed to load the file."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.checkpoint import streaming_save as ss
from mindspeed_mm.checkpoint.streaming_save import LazyTensor, no_crc32, save_streaming
from tests.helpers.torch_files import without_serialization_id


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


def _big_obj(g: torch.Generator) -> dict:
    """Records of a few KiB, so that with 4 KiB chunks most records straddle chunk edges."""
    return {"model0": {"w": torch.randn(70, 33, generator=g).bfloat16(), "e": torch.zeros(0, 3),
                       "b": torch.randn(999, generator=g)},
            "model1": {"i": torch.randint(0, 9, (300, 2), generator=g), "s": torch.tensor(1.5)},
            "checkpoint_version": 3.0}


@pytest.mark.parametrize("chunk", [4096, 3 * 4096, 2**20])
@pytest.mark.parametrize("writers,direct", [(1, True), (3, True), (1, False), (3, False)])
def test_same_bytes_as_torch_save(tmp_path, monkeypatch, writers, direct, chunk):
    monkeypatch.setattr(ss, "CHUNK_BYTES", chunk)
    for make in (_obj, _big_obj):
        obj = make(torch.Generator().manual_seed(0))
        want = _torch_save(obj, tmp_path / "a" / "rank.pt")  # the archive name comes from the file name
        (tmp_path / "b").mkdir(exist_ok=True)
        save_streaming(tmp_path / "b" / "rank.pt", _lazy(obj), writers=writers, direct=direct)
        assert without_serialization_id(tmp_path / "b" / "rank.pt") == want
        back = torch.load(tmp_path / "b" / "rank.pt", weights_only=True, mmap=True)
        for chunk_key in ("model0", "model1"):
            for k, t in obj[chunk_key].items():
                assert back[chunk_key][k].dtype == t.dtype and torch.equal(back[chunk_key][k], t)


def _takes_direct_io(d: Path) -> bool:
    try:
        os.close(os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_direct_io_where_the_filesystem_takes_it(tmp_path, monkeypatch):
    """Chunks bypass the page cache where the filesystem allows; where it accepts O_DIRECT but refuses a
    write, the rest goes through ordinary writes and the file is the same."""
    modes = []
    real = ss._write_chunk
    monkeypatch.setattr(ss, "_write_chunk", lambda fd, buf, n, off, state: modes.append(
        bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)) or real(fd, buf, n, off, state))
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)
    obj = _big_obj(torch.Generator().manual_seed(3))
    want = _torch_save(obj, tmp_path / "a" / "rank.pt")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "rank.pt", _lazy(obj))
    assert without_serialization_id(tmp_path / "b" / "rank.pt") == want
    assert len(modes) > 3 and set(modes) == {_takes_direct_io(tmp_path)}

    refused = []
    pwrite = os.pwrite

    def picky(fd, data, offset):  # a filesystem that opens with O_DIRECT and then refuses the writes
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(ss.os, "pwrite", picky)
    modes.clear()
    if not _takes_direct_io(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    (tmp_path / "c").mkdir()
    save_streaming(tmp_path / "c" / "rank.pt", _lazy(obj), writers=3)
    assert without_serialization_id(tmp_path / "c" / "rank.pt") == want
    assert refused and modes.count(False) >= len(modes) - 3  # each writer thread saw at most one refusal


def test_row_pieces_are_stored_as_one_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)
    t = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = _torch_save({"x": t}, tmp_path / "a" / "r.pt")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"x": LazyTensor((1000, 3), torch.bfloat16,
                                                             lambda: [t[:400], t[400:401], t[401:401], t[401:]])},
                   writers=2)
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want


def test_mapped_pieces_are_handed_back_after_their_copy(tmp_path, monkeypatch):
    """Pieces viewing a mapped file are copied out chunk by chunk, each copied part handed to `after_write`
    (so its pages can go): together they are every byte of every piece, once."""
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)
    src = torch.randn(640, 33, generator=torch.Generator().manual_seed(2)).bfloat16()
    raw = tmp_path / "src.bin"
    raw.write_bytes(b"x" * 13 + src.view(torch.uint8).numpy().tobytes())  # an unaligned start, as in safetensors
    f = open(raw, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    full = np.frombuffer(m, np.uint16, src.numel(), 13).reshape(640, 33)
    base = full.__array_interface__["data"][0] - 13
    stored = []
    want = _torch_save({"y": torch.cat([src[400:], src[:400]])}, tmp_path / "a" / "r.pt")
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"y": LazyTensor((640, 33), "bfloat16", lambda: [full[400:], full[:400]],
                                                             after_write=stored.append)}, writers=2)
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want
    spans = sorted((a.__array_interface__["data"][0] - base, a.nbytes) for a in stored)
    assert len(spans) > 2 and sum(n for _, n in spans) == src.numel() * 2
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no byte handed back twice
    full = stored = None  # the mapping cannot close while a view of it lives
    m.close()
    f.close()


@pytest.mark.parametrize("writers", [1, 3])
def test_tensors_live_only_while_their_chunks_are_filled(tmp_path, monkeypatch, writers):
    """Memory stays near `writers` chunks: a tensor is produced when the first chunk holding it is filled and
    let go after the last, not kept for the whole file."""
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)
    alive, peak = set(), [0]

    class Tracked(np.ndarray):
        def __del__(self):
            alive.discard(id(self))

    def make(i):
        def load():
            a = np.full(3000, i, np.float32).view(Tracked)
            alive.add(id(a))
            peak[0] = max(peak[0], len(alive))
            return a
        return load

    obj = {f"t{i}": LazyTensor((3000,), "float32", make(i)) for i in range(30)}
    save_streaming(tmp_path / "r.pt", obj, writers=writers)
    back = torch.load(tmp_path / "r.pt", weights_only=True)
    assert all(torch.equal(back[f"t{i}"], torch.full((3000,), float(i))) for i in range(30))
    assert 1 <= peak[0] <= 2 * writers + 1  # a 12 KB tensor straddles at most 4 chunks, shared with 2 others


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
    """A column slice made of several sources' columns is joined straight into the chunks that hold it
    (rows cut by a chunk's edge through a small buffer), never whole; each part is handed back after."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1500, 6, generator=g).bfloat16(), torch.randn(1500, 10, generator=g).bfloat16()
    want = _torch_save({"w": torch.cat([a[:, 1:4], b[:, 2:], a[:, :0]], dim=1)}, tmp_path / "a" / "r.pt")
    na, nb = (t.view(torch.int16).numpy().view("<u2") for t in (a, b))
    if kind == "transposed":  # rows of a column-major source are strided
        na = np.asfortranarray(na)
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)  # 22-byte rows: most chunk edges cut a row
    monkeypatch.setattr(ss, "_BLOCK_BYTES", 22 * 60)
    stored = []
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"w": LazyTensor(
        (1500, 11), "bfloat16", lambda: [ss.SideBySide((na[:, 1:4], nb[:, 2:], na[:, :0]))], "w",
        after_write=stored.append)}, writers=2)
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want
    assert len(stored) % 3 == 0 and sum(p.shape[0] for p in stored[::3]) >= 1500  # every row of each part


def test_strided_piece_is_stored_as_columns(tmp_path, monkeypatch):
    """A strided 2-D piece (a transposed view) is copied a block of rows at a time, not made contiguous."""
    t = torch.randn(40, 300, generator=torch.Generator().manual_seed(7))
    want = _torch_save({"t": t.t().contiguous()}, tmp_path / "a" / "r.pt")
    monkeypatch.setattr(ss, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(ss, "byte_view", lambda p: pytest.fail("a strided piece was made contiguous"))
    (tmp_path / "b").mkdir()
    save_streaming(tmp_path / "b" / "r.pt", {"t": LazyTensor((300, 40), "float32", lambda: t.numpy().T)})
    assert without_serialization_id(tmp_path / "b" / "r.pt") == want


def test_real_tensors_are_refused(tmp_path):
    with pytest.raises(TypeError, match="LazyTensor"):
        save_streaming(tmp_path / "r.pt", {"a": torch.zeros(2)})
