"""`torch.save` for objects whose tensors are produced one at a time while the file is written.

The converter's rank files are plain `torch.save` files (so `torch.load` and the reference system's tooling
read them), but building a whole rank file in memory and then saving it costs the file's size in RAM, an
extra copy of every byte, and serialises reading the source with writing the output. `torch.save` writes
the pickle first (tensors are referenced by storage key) and the storage bytes after it, so nothing forces
the bytes to exist before the pickle is written. `save_streaming`:

1. pickles `LazyTensor` placeholders exactly as `torch.save` pickles real tensors;
2. lets torch's own zip writer lay the file out with every storage record reserved but not written (what
   `torch.serialization.skip_data` does);
3. stores each record's bytes at its offset as a producer thread delivers them, with at most
   `budget_bytes` waiting. A record may arrive as row pieces (views of a mapped source file), which are
   stored one after another, so they are never concatenated in memory.

The file is byte-identical to `torch.save` of the materialised object (a test checks this), so loading it
needs nothing of ours. Records and pickling follow `torch.serialization._save` (torch 2.6 to 2.14); where its
writer lacks `write_record_metadata` the object is materialised and handed to `torch.save` instead.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

__all__ = ["LazyTensor", "save_streaming", "materialize", "owned", "no_crc32", "record_spans"]

DEFAULT_BUDGET = 512 * 2**20


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A contiguous tensor known by shape and dtype now, produced by `load()` when the writer reaches it.

    `load` returns the tensor, or a list of pieces whose concatenation along dim 0 is the tensor (the writer
    stores them one after another, so row blocks need not be concatenated in memory first)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], Union[torch.Tensor, list[torch.Tensor]]]
    name: str = ""
    # Where a piece's bytes lie in an open file, (fd, offset), if they do: such a piece is copied file to
    # file by the kernel (`os.copy_file_range`), never touching its pages in this process.
    locate: Optional[Callable[[torch.Tensor], Optional[tuple[int, int]]]] = None
    after_write: Optional[Callable[[torch.Tensor], None]] = None  # called with each piece stored from memory

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def pieces(self) -> list[torch.Tensor]:
        out = self.load()
        pieces = [out] if isinstance(out, torch.Tensor) else list(out)
        if isinstance(out, torch.Tensor):
            ok = tuple(out.shape) == tuple(self.shape)
        else:
            ok = (len(self.shape) > 0 and all(p.dim() == len(self.shape) and tuple(p.shape[1:]) == self.shape[1:]
                                              for p in pieces)
                  and sum(p.shape[0] for p in pieces) == self.shape[0])
        if not ok or any(p.dtype != self.dtype for p in pieces):
            raise ValueError(f"{self.name or 'tensor'}: produced {[tuple(p.shape) for p in pieces]} "
                             f"{sorted({str(p.dtype) for p in pieces})}, declared {tuple(self.shape)} {self.dtype}")
        return [p.contiguous() for p in pieces]

    def produce(self) -> torch.Tensor:
        pieces = self.pieces()
        return owned(pieces[0]) if len(pieces) == 1 else torch.cat(pieces, dim=0)


def owned(t: torch.Tensor) -> torch.Tensor:
    """A compact tensor owning exactly its bytes: torch.save writes a view's whole storage, and safetensors
    refuses tensors that share one."""
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def materialize(obj: Any) -> Any:
    """`obj` with every `LazyTensor` replaced by its tensor."""
    if isinstance(obj, LazyTensor):
        return obj.produce()
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(materialize(v) for v in obj)
    return obj


class _StorageRef:
    __slots__ = ("key", "lazy")

    def __init__(self, key: str, lazy: LazyTensor):
        self.key, self.lazy = key, lazy


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class _Pickler(pickle.Pickler):
    """Pickles a `LazyTensor` as `Tensor._reduce_ex_internal` pickles a contiguous CPU tensor of that shape
    and dtype (`_rebuild_tensor_v2` over a typed storage), and its storage as `torch.save`'s persistent id."""

    def __init__(self, file, protocol: int):
        super().__init__(file, protocol=protocol)
        self.order: list[_StorageRef] = []

    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.lazy.dtype])
            numel = 1
            for s in obj.lazy.shape:
                numel *= s
            return ("storage", storage_type, obj.key, "cpu", numel)
        if isinstance(obj, torch.Tensor) or torch.is_storage(obj):
            raise TypeError("save_streaming takes LazyTensor leaves only; wrap real tensors in LazyTensor")
        return None

    def reducer_override(self, obj: Any):
        if isinstance(obj, LazyTensor):
            ref = _StorageRef(str(len(self.order)), obj)
            self.order.append(ref)
            return (torch._utils._rebuild_tensor_v2,
                    (ref, 0, tuple(obj.shape), _contiguous_stride(tuple(obj.shape)), False,
                     collections.OrderedDict()))
        return NotImplemented


def _writer_available(obj: Any) -> bool:
    """torch's own zip writer can reserve records, and no dtype needs `_rebuild_tensor_v3` (uint16 etc.)."""
    s = torch.serialization
    new_dtypes = torch.storage._new_dtypes()
    return (hasattr(s, "_open_zipfile_writer") and hasattr(s, "_get_storage_alignment")
            and hasattr(torch._C.PyTorchFileWriter, "write_record_metadata")
            and hasattr(torch.storage, "_dtype_to_storage_type_map")
            and not any(t.dtype in new_dtypes for t in _iter_lazy(obj)))


def record_spans(path: str | Path) -> dict[str, tuple[int, int]]:
    """Where each record of a `torch.save` zip file lies: name without the archive folder (`data/0`,
    `data.pkl`, ...) -> (offset of its bytes, size), from the central directory and each record's local header
    (whose extra field pads the data to torch's storage alignment). Records are stored uncompressed."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
                raise RuntimeError(f"{path}: unexpected zip record {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[info.filename.split("/", 1)[-1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _record_offsets(path: Path, keys: list[str], sizes: list[int]) -> list[int]:
    """Where each reserved `data/<key>` record's bytes start."""
    spans = record_spans(path)
    out = []
    for key, size in zip(keys, sizes):
        offset, n = spans[f"data/{key}"]
        if n != size:
            raise RuntimeError(f"{path}: unexpected zip record data/{key} from torch's writer")
        out.append(offset)
    return out


def _pwrite_all(fd: int, t: torch.Tensor, offset: int) -> int:
    if t.numel() == 0:
        return 0
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):  # one pwrite stores at most ~2 GiB on Linux
        done += os.pwrite(fd, view[done:], offset + done)
    return done


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


def _produce_all(refs: list[_StorageRef], budget: int, out: collections.deque, cond: threading.Condition,
                 state: dict) -> None:
    """Producer thread: each record's pieces in storage-key order, waiting while `budget` bytes are queued."""
    try:
        for ref in refs:
            need = ref.lazy.nbytes
            with cond:
                cond.wait_for(lambda: state["stop"] or state["queued"] == 0 or state["queued"] + need <= budget)
                if state["stop"]:
                    return
            pieces = ref.lazy.pieces()
            with cond:
                out.append(pieces)
                state["queued"] += need
                cond.notify_all()
    except BaseException as e:  # handed to the writer, which raises it
        with cond:
            out.append(e)
            cond.notify_all()


@contextmanager
def no_crc32() -> Iterator[None]:
    """torch.save's zip CRC32 costs ~3x the write itself (measured: 0.38 GiB bf16 in 1.11 s with it, 0.30 s
    without); torch.load reads files either way. torch keeps the setting per thread (a ContextVar), so each
    thread that writes must switch it off itself."""
    from torch.utils.serialization import config as serialization_config

    crc, serialization_config.save.compute_crc32 = serialization_config.save.compute_crc32, False
    try:
        yield
    finally:
        serialization_config.save.compute_crc32 = crc


def save_streaming(path: str | Path, obj: Any, budget_bytes: int = DEFAULT_BUDGET) -> int:
    """`torch.save(materialize(obj), path)`, byte for byte, without holding more than about `budget_bytes` of
    tensors: torch's writer lays out the file with each storage record reserved, then a second thread
    produces the tensors in order while this one stores them into their records. Returns the file size."""
    path = Path(path)
    if not _writer_available(obj):
        with no_crc32():
            torch.save(materialize(obj), path)
        return path.stat().st_size
    buf = io.BytesIO()
    pickler = _Pickler(buf, torch.serialization.DEFAULT_PROTOCOL)
    pickler.dump(obj)
    refs = pickler.order
    data = buf.getvalue()
    with no_crc32(), torch.serialization._open_zipfile_writer(str(path)) as zf:
        zf.write_record("data.pkl", data, len(data))
        zf.write_record(".format_version", "1", len("1"))
        alignment = str(torch.serialization._get_storage_alignment())
        zf.write_record(".storage_alignment", alignment, len(alignment))
        zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for ref in refs:
            zf.write_record_metadata(f"data/{ref.key}", ref.lazy.nbytes)
    offsets = _record_offsets(path, [r.key for r in refs], [r.lazy.nbytes for r in refs])

    out: collections.deque = collections.deque()
    cond = threading.Condition()
    state = {"queued": 0, "stop": False}
    producer = threading.Thread(target=_produce_all, args=(refs, budget_bytes, out, cond, state),
                                name="save_streaming", daemon=True)
    fd = os.open(path, os.O_WRONLY)
    try:
        producer.start()
        for ref, offset in zip(refs, offsets):
            with cond:
                cond.wait_for(lambda: bool(out))
                pieces = out.popleft()
            if isinstance(pieces, BaseException):
                raise pieces
            for p in pieces:
                n = p.numel() * p.element_size()
                loc = ref.lazy.locate(p) if ref.lazy.locate is not None and n else None
                if loc is None or not _copy_range(loc[0], loc[1], fd, offset, n):
                    _pwrite_all(fd, p, offset)
                    if ref.lazy.after_write is not None:
                        ref.lazy.after_write(p)
                offset += n
            with cond:
                state["queued"] -= ref.lazy.nbytes
                cond.notify_all()
            del pieces, p
    finally:
        os.close(fd)
        with cond:
            state["stop"] = True
            cond.notify_all()
        producer.join()
    return path.stat().st_size


def _iter_lazy(obj: Any) -> Iterator[LazyTensor]:
    if isinstance(obj, LazyTensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_lazy(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_lazy(v)
