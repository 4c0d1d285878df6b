"""`torch.save` files written while their tensors are produced, without torch.

The converter's rank files are plain `torch.save` files (so `torch.load` and the reference system's tooling
read them), but building a whole rank file in memory and then saving it costs the file's size in RAM, an
extra copy of every byte, and serialises reading the source with writing the output. `torch.save` writes
the pickle first (tensors are referenced by storage key) and the storage bytes after it, so nothing forces
the bytes to exist before the pickle is written. `save_streaming`:

1. pickles `LazyTensor` placeholders exactly as `torch.save` pickles real tensors (`torch_file.dumps`);
2. lays the zip file out as torch's writer does (`torch_file.archive_layout`), so every byte's place is known
   before any tensor is produced;
3. writes the file front to back in `CHUNK_BYTES` chunks, several threads each filling one chunk at a time
   from the layout's headers and the tensors' bytes, producing a tensor when the first chunk needing it is
   filled and dropping it after the last. A tensor may come as row pieces or column parts (`SideBySide`)
   viewing a mapped source file: they are copied straight into the chunk, never joined whole.

Chunks are written with O_DIRECT where the filesystem takes it: from the aligned buffer straight to the
disk, bypassing the page cache. A converter writes each byte once, usually for other machines to read, so
caching it only costs: page allocation (on this project's VM, buffered writes of the same chunks took
7.7-13.9 s against 2.6-4.1 s direct and 2.8-6.9 s for `cp`; docs/benchmarks.md), dirty memory the kernel
must throttle, and the source's cached pages evicted.

None of this imports torch, so a conversion process never pays its import (1.3 s, more than a copy of a 2B
checkpoint). The file equals `torch.save` of the materialised object byte for byte except the 40-digit
serialization id (torch derives it from an unordered hash set; tests check the rest). Pieces are numpy
arrays (bfloat16 travels as uint16 of the same bytes) or torch tensors.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from mindspeed_mm.checkpoint.torch_file import ALIGNMENT, NUMPY_DTYPES, STORAGE_TYPES, archive_layout, dumps

__all__ = ["LazyTensor", "SideBySide", "save_streaming", "owned", "no_crc32", "dtype_name", "byte_view"]

CHUNK_BYTES = 8 * 2**20  # measured: 8-64 MiB chunks write a 2B checkpoint equally fast; RSS is writers x this
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses in logical blocks (512 or 4096)
_BLOCK_BYTES = 2**20  # rows of a SideBySide joined at once when they straddle a chunk's edge


def dtype_name(dtype: Any) -> str:
    """"bfloat16" for torch.bfloat16 or "bfloat16"."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SideBySide:
    """2-D numpy arrays joined along dim 1 (a column slice of a tensor, or one made of TP shards' columns),
    joined straight into the chunks that hold them: never whole in memory of its own, and never written row
    by row (measured on a mapped 2B checkpoint's 1.08 GiB of column slices, one thread: joined into a 1-4 MiB
    buffer and written, 0.47-0.67 s; `pwritev` of the rows, 0.84-1.77 s; `copy_file_range` per row,
    1.9-3.3 s; docs/benchmarks.md)."""
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
    # Called with the part of a piece (a view of it) just copied out, so a mapped source's pages can go.
    after_write: Optional[Callable[[Any], None]] = None

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


# ---------------------------------------------------------------------------------------------- pieces

def _normalise(p: Any) -> Union[np.ndarray, SideBySide]:
    """A piece as what the chunk filler copies from: its bytes as a flat uint8 view, or columns side by
    side (a strided 2-D array is one column part, so it is never made contiguous whole)."""
    if isinstance(p, SideBySide):
        return p
    if isinstance(p, np.ndarray) and not p.flags.c_contiguous and p.ndim == 2:
        return SideBySide((p,))
    return byte_view(p)


def _copy_out(p: Union[np.ndarray, SideBySide], lo: int, out: np.ndarray, scratch: list,
              after_write: Optional[Callable[[Any], None]]) -> None:
    """Bytes [lo, lo + len(out)) of piece `p` into `out` (uint8)."""
    hi = lo + len(out)
    if isinstance(p, np.ndarray):
        out[:] = p[lo:hi]
        if after_write is not None:
            after_write(p[lo:hi])
        return
    width = p.shape[1]
    row_bytes = width * p.dtype.itemsize
    if row_bytes == 0:
        return
    r0, r1 = lo // row_bytes, -(-hi // row_bytes)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for r in range(r0, r1, step):
        k = min(step, r1 - r)
        a, b = max(lo, r * row_bytes), min(hi, (r + k) * row_bytes)
        if a == r * row_bytes and b == (r + k) * row_bytes:  # whole rows: joined in place
            block = out[a - lo:b - lo].view(p.dtype).reshape(k, width)
            np.concatenate([q[r:r + k] for q in p.parts], axis=1, out=block)
            continue
        if not scratch or scratch[0].nbytes < k * row_bytes:
            scratch[:] = [np.empty(max(k * row_bytes, _BLOCK_BYTES), np.uint8)]
        block = scratch[0][:k * row_bytes].view(p.dtype).reshape(k, width)
        np.concatenate([q[r:r + k] for q in p.parts], axis=1, out=block)
        out[a - lo:b - lo] = block.reshape(-1).view(np.uint8)[a - r * row_bytes:b - r * row_bytes]
    if after_write is not None:
        for q in p.parts:
            after_write(q[r0:r1])


# ---------------------------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    data: Optional[bytes]  # header bytes, or None for record `record`
    record: int = -1


class _Records:
    """Each record's pieces, produced when the first chunk needing them is filled and dropped when the last
    one is written (`chunks_left` counts down); threads filling other chunks wait for, never repeat, a load."""

    def __init__(self, refs: list[LazyTensor], chunks_left: list[int]):
        self.refs = refs
        self.left = chunks_left
        self.lock = threading.Lock()
        self.loads = [threading.Lock() for _ in refs]
        self.pieces: dict[int, list[tuple[int, Union[np.ndarray, SideBySide]]]] = {}

    def get(self, i: int) -> list[tuple[int, Union[np.ndarray, SideBySide]]]:
        """Record i's pieces, each with its byte offset in the record."""
        with self.loads[i]:
            got = self.pieces.get(i)
            if got is None:
                got, at = [], 0
                for p in self.refs[i].pieces():
                    q = _normalise(p)
                    got.append((at, q))
                    at += q.nbytes
                self.pieces[i] = got
        return got

    def done(self, i: int) -> None:
        with self.lock:
            self.left[i] -= 1
            if self.left[i] == 0:
                self.pieces.pop(i, None)


def _fill(segments: list[_Segment], records: _Records, lo: int, out: np.ndarray, scratch: list) -> None:
    """Bytes [lo, lo + len(out)) of the file into `out`, from the segments that overlap them."""
    hi = lo + len(out)
    for seg in segments:
        a, b = max(seg.start, lo), min(seg.end, hi)
        if seg.data is not None:
            out[a - lo:b - lo] = np.frombuffer(seg.data, np.uint8, b - a, a - seg.start)
            continue
        ref = records.refs[seg.record]
        for at, p in records.get(seg.record):
            pa, pb = max(a, seg.start + at), min(b, seg.start + at + p.nbytes)
            if pa < pb:
                _copy_out(p, pa - seg.start - at, out[pa - lo:pb - lo], scratch, ref.after_write)


def _aligned_buffer(n: int) -> tuple[mmap.mmap, np.ndarray]:
    m = mmap.mmap(-1, n)  # anonymous mappings are page aligned, as O_DIRECT needs
    return m, np.frombuffer(m, np.uint8)


def _set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for `fd`; False where the OS or filesystem refuses (Linux: tmpfs before 6.6)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


def save_streaming(path: Union[str, Path], obj: Any, writers: int = 1, direct: bool = True) -> int:
    """`torch.save(materialised obj, path)`, each tensor produced only while the chunks holding it are filled:
    `writers` threads (this one among them) fill and write `CHUNK_BYTES` chunks front to back, so about
    `writers` chunks and the tensors they straddle are in memory. `direct`: write with O_DIRECT where the
    filesystem takes it, falling back to ordinary writes where it does not. Returns the file size."""
    path = Path(path)
    data, refs = dumps(obj, _tensor_leaf)
    records: list[tuple[str, Union[bytes, int]]] = [
        ("data.pkl", data), (".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", sys.byteorder.encode())]
    records += [(f"data/{i}", ref.nbytes) for i, ref in enumerate(refs)]
    layout = archive_layout(path, records)
    segments = [_Segment(o, o + len(b), b) for o, b in layout.parts]
    for i in range(len(refs)):
        start, size = layout.spans[f"data/{i}"]
        segments.append(_Segment(start, start + size, None, i))
    segments.sort(key=lambda s: (s.start, s.end))
    n_chunks = -(-layout.size // CHUNK_BYTES)
    by_chunk: list[list[_Segment]] = [[] for _ in range(n_chunks)]
    chunks_left = [0] * len(refs)
    for seg in segments:  # an empty record belongs to the chunk it starts in, which produces (and checks) it
        for c in range(seg.start // CHUNK_BYTES, max(seg.start, seg.end - 1) // CHUNK_BYTES + 1):
            by_chunk[c].append(seg)
            if seg.data is None:
                chunks_left[seg.record] += 1
    assert all(a.end == b.start for a, b in zip(segments, segments[1:])) and segments[-1].end == layout.size
    recs = _Records(refs, chunks_left)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    state = {"next": 0, "direct": direct and _set_direct(fd, True)}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write_chunks() -> None:
        buf_map, buf = _aligned_buffer(CHUNK_BYTES)
        scratch: list = []
        try:
            while True:
                with lock:
                    c = state["next"]
                    state["next"] += 1
                    if errors or c >= n_chunks:
                        return
                lo = c * CHUNK_BYTES
                n = min(CHUNK_BYTES, layout.size - lo)
                _fill(by_chunk[c], recs, lo, buf[:n], scratch)
                _write_chunk(fd, buf, n, lo, state)
                for seg in by_chunk[c]:
                    if seg.data is None:
                        recs.done(seg.record)
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            del buf
            try:
                buf_map.close()
            except BufferError:  # a view outlived the chunk (an error mid-write); the mapping goes with it
                pass

    helpers = [threading.Thread(target=write_chunks, name="save_streaming", daemon=True)
               for _ in range(max(1, writers) - 1)]
    try:
        for t in helpers:
            t.start()
        write_chunks()
        for t in helpers:
            t.join()
        if not errors:
            os.ftruncate(fd, layout.size)  # the last chunk's direct write was rounded up to whole blocks
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return layout.size


def _write_chunk(fd: int, buf: np.ndarray, n: int, offset: int, state: dict) -> None:
    """buf[:n] to the file at `offset`; a direct write is rounded up to whole blocks (zeros, cut off by the
    final ftruncate). A filesystem that accepted O_DIRECT but refuses the write gets ordinary writes."""
    if state["direct"]:
        padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
        buf[n:padded] = 0
        try:
            _pwrite_all(fd, buf[:padded], offset)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _set_direct(fd, False)  # first, so that a thread seeing the flag down writes to an ordinary fd
            state["direct"] = False
    _pwrite_all(fd, buf[:n], offset)


def _pwrite_all(fd: int, view: np.ndarray, offset: int) -> None:
    mv = memoryview(view)
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)
