"""`torch.save` files written while their tensors are produced, without torch.

The converter's rank files are plain `torch.save` files (so `torch.load` and the reference system's tooling
read them), but building a whole rank file in memory and then saving it costs the file's size in RAM, an
extra copy of every byte, and serialises reading the source with writing the output. `torch.save` writes
the pickle first (tensors are referenced by storage key) and the storage bytes after it, so nothing forces
the bytes to exist before the pickle is written. `save_streaming`:

1. pickles `LazyTensor` placeholders exactly as `torch.save` pickles real tensors (`torch_file.dumps`);
2. lays the zip file out as torch's writer does, every storage record reserved but not written
   (`torch_file.write_archive`);
3. stores each record's bytes at its offset as a producer thread delivers them, with at most
   `budget_bytes` waiting. A record may arrive as row pieces (views of a mapped source file), which are
   stored one after another, so they are never concatenated in memory; a piece that lies in an open file
   is copied file to file by the kernel.

None of this imports torch, so a conversion process never pays its import (1.3 s, more than a copy of a
2B checkpoint) or teardown. The file equals `torch.save` of the materialised object byte for byte except
the 40-digit serialization id (torch derives it from an unordered hash set; tests check the rest). Pieces
are numpy arrays (bfloat16 travels as uint16 of the same bytes) or torch tensors.
"""
from __future__ import annotations

import collections
import ctypes
import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from mindspeed_mm.checkpoint.torch_file import ALIGNMENT, NUMPY_DTYPES, STORAGE_TYPES, dumps, write_archive

__all__ = ["LazyTensor", "SideBySide", "save_streaming", "owned", "no_crc32", "dtype_name", "byte_view"]

DEFAULT_BUDGET = 512 * 2**20


def dtype_name(dtype: Any) -> str:
    """"bfloat16" for torch.bfloat16 or "bfloat16"."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SideBySide:
    """2-D numpy arrays joined along dim 1 (a column slice of a tensor, or one made of TP shards' columns),
    stored a block of rows at a time through one small buffer: never joined whole in memory, and never
    written row by row (measured on a mapped 2B checkpoint's 1.08 GiB of column slices, one thread: joined
    into a reused 1-4 MiB buffer and written, 0.47-0.67 s; `pwritev` of the rows, 0.84-1.77 s;
    `copy_file_range` per row, 1.9-3.3 s; docs/benchmarks.md)."""
    parts: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.parts[0].shape[0], sum(p.shape[1] for p in self.parts))

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _piece_dtype(p: Any) -> str:
    if isinstance(p, (np.ndarray, SideBySide)):
        return next((k for k, v in NUMPY_DTYPES.items() if v == p.dtype), str(p.dtype))
    return dtype_name(p.dtype)


def byte_view(p: Any) -> np.ndarray:
    """The bytes of a numpy array or torch tensor as a flat uint8 array (copied only if not contiguous)."""
    if isinstance(p, np.ndarray):
        return np.ascontiguousarray(p).reshape(-1).view(np.uint8)
    return p.contiguous().reshape(-1).view(sys.modules["torch"].uint8).numpy()


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A contiguous tensor known by shape and dtype now, produced by `load()` when the writer reaches it.

    `load` returns the tensor (numpy array or torch tensor), or a list of pieces whose concatenation along
    dim 0 is the tensor (the writer stores them one after another, so row blocks need not be concatenated
    in memory first). A numpy piece of a bfloat16 tensor is uint16 (numpy has no bfloat16)."""
    shape: tuple[int, ...]
    dtype: Any  # a dtype name ("bfloat16") or torch dtype
    load: Callable[[], Any]
    name: str = ""
    # Where a piece's bytes lie in an open file, (fd, offset), if they do: such a piece is copied file to
    # file by the kernel (`os.copy_file_range`), never touching its pages in this process.
    locate: Optional[Callable[[Any], Optional[tuple[int, int]]]] = None
    after_write: Optional[Callable[[Any], None]] = None  # called with each piece stored from memory

    def __post_init__(self):
        name = dtype_name(self.dtype)
        if name not in STORAGE_TYPES:
            raise ValueError(f"{self.name or 'tensor'}: dtype {name} cannot be saved (supported: {sorted(STORAGE_TYPES)})")
        object.__setattr__(self, "dtype", name)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPES[self.dtype].itemsize

    def pieces(self) -> list[Any]:
        out = self.load()
        whole = not isinstance(out, (list, tuple))
        pieces = [out] if whole else list(out)
        if whole:
            ok = tuple(out.shape) == self.shape
        else:
            ok = (len(self.shape) > 0 and all(len(p.shape) == len(self.shape) and tuple(p.shape[1:]) == self.shape[1:]
                                              for p in pieces)
                  and sum(p.shape[0] for p in pieces) == self.shape[0])
        if not ok or any(_piece_dtype(p) != self.dtype for p in pieces):
            raise ValueError(f"{self.name or 'tensor'}: produced {[tuple(p.shape) for p in pieces]} "
                             f"{sorted({_piece_dtype(p) for p in pieces})}, declared {self.shape} {self.dtype}")
        return pieces


def owned(t):
    """A compact torch tensor owning exactly its bytes: torch.save writes a view's whole storage, and
    safetensors refuses tensors that share one."""
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        return t.clone(memory_format=sys.modules["torch"].contiguous_format)
    return t


_BLOCK_BYTES = 2**20  # one block of a SideBySide piece: small enough to stay in cache between join and write


def _pwrite_side_by_side(fd: int, p: SideBySide, offset: int) -> int:
    rows, width = p.shape
    step = max(1, _BLOCK_BYTES // max(1, width * p.dtype.itemsize))
    buf = np.empty((min(rows, step), width), p.dtype)
    done = 0
    for r in range(0, rows, step):
        block = buf[:min(step, rows - r)]
        np.concatenate([q[r:r + len(block)] for q in p.parts], axis=1, out=block)
        done += _pwrite_all(fd, block, offset + done)
    return done


def _pwrite_all(fd: int, p: Any, offset: int) -> int:
    if isinstance(p, SideBySide):
        return _pwrite_side_by_side(fd, p, offset)
    view = memoryview(byte_view(p))
    done = 0
    while done < len(view):  # one pwrite stores at most ~2 GiB on Linux
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _nbytes(p: Any) -> int:
    return p.nbytes if isinstance(p, (np.ndarray, SideBySide)) else p.numel() * p.element_size()


_kernel_copy = [hasattr(os, "copy_file_range")]


def _copy_range(src_fd: int, src_offset: int, fd: int, offset: int, n: int) -> bool:
    """Copy n bytes file to file inside the kernel, as `cp` does (on this project's VM 2x faster than
    storing from a mapping); False, and not tried again, where the kernel or filesystem cannot."""
    if not _kernel_copy[0]:
        return False
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src_fd, fd, n - done, src_offset + done, offset + done)
            if k <= 0:
                raise OSError(f"copy_file_range returned {k}")
            done += k
    except OSError:
        if done:  # the rest goes through memory; what was copied is in place
            raise
        _kernel_copy[0] = False
        return False
    return True


def _produce_all(refs: list[LazyTensor], budget: int, out: collections.deque, cond: threading.Condition,
                 state: dict) -> None:
    """Producer thread: each record's pieces in storage-key order, waiting while `budget` bytes are queued."""
    try:
        for i, ref in enumerate(refs):
            need = ref.nbytes
            with cond:
                cond.wait_for(lambda: state["stop"] or state["queued"] == 0 or state["queued"] + need <= budget)
                if state["stop"]:
                    return
            pieces = ref.pieces()
            with cond:
                out.append((i, pieces))
                state["queued"] += need
                cond.notify_all()
    except BaseException as e:  # handed to the writer, which raises it
        with cond:
            out.append(e)
            cond.notify_all()


@contextmanager
def no_crc32() -> Iterator[None]:
    """For `torch.save` itself (training saves): its zip CRC32 costs ~3x the write (measured: 0.38 GiB bf16
    in 1.11 s with it, 0.30 s without); torch.load reads files either way. torch keeps the setting per
    thread (a ContextVar), so each thread that saves must switch it off itself."""
    from torch.utils.serialization import config as serialization_config

    crc, serialization_config.save.compute_crc32 = serialization_config.save.compute_crc32, False
    try:
        yield
    finally:
        serialization_config.save.compute_crc32 = crc


def _tensor_leaf(x: Any) -> Optional[tuple[tuple[int, ...], str]]:
    if isinstance(x, LazyTensor):
        return x.shape, x.dtype
    if isinstance(x, np.ndarray) or hasattr(x, "untyped_storage"):
        raise TypeError("save_streaming takes LazyTensor leaves only; wrap real tensors in LazyTensor")
    return None


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return f


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_BYTES = 64 * 2**20


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (`sync_file_range`): the disk works
    while later records are copied, instead of all at the end (the 2B shape's final sync took ~1 s), and
    dirty memory stays low. Linux only; elsewhere the kernel's own writeback does it later."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _store(fd: int, ref: LazyTensor, offset: int, pieces: list[Any]) -> None:
    for p in pieces:
        n = _nbytes(p)
        whole = not isinstance(p, SideBySide)
        loc = ref.locate(p) if ref.locate is not None and n and whole else None
        if loc is None or not _copy_range(loc[0], loc[1], fd, offset, n):
            _pwrite_all(fd, p, offset)
            if ref.after_write is not None:
                for q in ((p,) if whole else p.parts):
                    ref.after_write(q)
        offset += n


def save_streaming(path: Union[str, Path], obj: Any, budget_bytes: int = DEFAULT_BUDGET, writers: int = 1) -> int:
    """`torch.save(materialised obj, path)` without holding more than about `budget_bytes` of tensors: the
    file is laid out with each storage record reserved, then a second thread produces the tensors in order
    while `writers` threads (this one among them) store them into their records, in whatever order they
    finish: records are independent byte ranges. Returns the file size."""
    path = Path(path)
    data, refs = dumps(obj, _tensor_leaf)
    records: list[tuple[str, Union[bytes, int]]] = [
        ("data.pkl", data), (".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", sys.byteorder.encode())]
    records += [(f"data/{i}", ref.nbytes) for i, ref in enumerate(refs)]
    spans = write_archive(path, records)
    offsets = [spans[f"data/{i}"][0] for i in range(len(refs))]

    out: collections.deque = collections.deque()
    cond = threading.Condition()
    state = {"queued": 0, "stop": False, "left": len(refs), "unflushed": 0}
    errors: list[BaseException] = []
    producer = threading.Thread(target=_produce_all, args=(refs, budget_bytes, out, cond, state),
                                name="save_streaming", daemon=True)
    fd = os.open(path, os.O_WRONLY)

    def store_all() -> None:
        try:
            while True:
                with cond:
                    cond.wait_for(lambda: bool(out) or state["stop"] or state["left"] == 0)
                    if state["stop"] or not out:
                        return
                    item = out.popleft()
                if isinstance(item, BaseException):
                    raise item
                i, pieces = item
                _store(fd, refs[i], offsets[i], pieces)
                del pieces, item
                with cond:
                    state["queued"] -= refs[i].nbytes
                    state["left"] -= 1
                    state["unflushed"] += refs[i].nbytes
                    flush = state["unflushed"] >= WRITEBACK_BYTES
                    if flush:
                        state["unflushed"] = 0
                    cond.notify_all()
                if flush:
                    _start_writeback(fd)
        except BaseException as e:
            with cond:
                errors.append(e)
                state["stop"] = True
                cond.notify_all()

    helpers = [threading.Thread(target=store_all, name="save_streaming_writer", daemon=True)
               for _ in range(max(1, writers) - 1)]
    try:
        producer.start()
        for t in helpers:
            t.start()
        store_all()
        for t in helpers:
            t.join()
        if not errors:
            _start_writeback(fd)
    finally:
        os.close(fd)
        with cond:
            state["stop"] = True
            cond.notify_all()
        producer.join()
    if errors:
        raise errors[0]
    return path.stat().st_size
