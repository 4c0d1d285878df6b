"""Read and write `torch.save` zip files without importing torch.

A converter process that only moves bytes between checkpoint formats need not pay torch's ~1.3 s import
(nor its memory). The file format is small: a protocol-2 pickle (`data.pkl`) whose tensors refer to
storage records by key, and an uncompressed zip laid out by torch's `PyTorchStreamWriter` (miniz with
64-byte aligned records). `dumps` and `write_archive` reproduce torch's bytes exactly (tests compare with
`torch.save`), so what they write is a plain `torch.save` file; `load` maps one and unpickles it with an
allowlist, every tensor a numpy view of the mapping. Torch-free by design: never import torch here.
"""
from __future__ import annotations

import codecs
import collections
import hashlib
import io
import math
import mmap
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["ALIGNMENT", "NUMPY_DTYPES", "STORAGE_TYPES", "ArchiveLayout", "StandIn", "StoredTensor",
           "UnsupportedPickle", "archive_layout", "dumps", "load", "record_spans", "write_archive"]

STORAGE_TYPES = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                 "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                 "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}
# numpy has no bfloat16: its bytes travel as uint16.
NUMPY_DTYPES = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                "bfloat16": np.dtype("<u2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
                "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?")}

# ---------------------------------------------------------------------------------------------- pickle out


class _Global:
    """Pickled as GLOBAL `module name`: the standard pickler would import the module to check the name."""
    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # `save_reduce` insists on a callable
        raise TypeError(f"{self.module}.{self.name} is a pickling stand-in")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", cls) for dtype, cls in STORAGE_TYPES.items()}


class _StorageRef:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):  # as torch: a zero-sized dim counts as 1
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, whose dispatch table can take the stand-ins; for protocol 2 its bytes equal
    the C pickler's that torch.save uses."""
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def __init__(self, file, tensor_leaf):
        super().__init__(file, protocol=2)
        self.tensor_leaf, self.leaves = tensor_leaf, []

    def persistent_id(self, obj):
        if type(obj) is _StorageRef:  # the literals below are interned, like torch's, so memo hits match
            return ("storage", _STORAGE_GLOBALS[obj.dtype], obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if type(obj) in self.dispatch or isinstance(obj, type):
            return NotImplemented
        spec = self.tensor_leaf(obj)
        if spec is None:
            return NotImplemented
        shape, dtype = spec
        if dtype not in STORAGE_TYPES:
            raise ValueError(f"unsupported tensor dtype {dtype!r}")
        shape = tuple(int(s) for s in shape)  # a new tuple per tensor, as torch's tuple(size()): never a memo hit
        ref = _StorageRef(str(len(self.leaves)), dtype, math.prod(shape))
        self.leaves.append(obj)
        return _REBUILD, (ref, 0, shape, _contiguous_stride(shape), False, collections.OrderedDict())

    def _save_stand_in(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_stand_in


def dumps(obj: Any, tensor_leaf: Callable[[Any], tuple[tuple[int, ...], str] | None]) -> tuple[bytes, list[Any]]:
    """The `data.pkl` torch.save writes for `obj` where each leaf for which `tensor_leaf(leaf)` gives
    (shape, dtype name) stands for a contiguous CPU tensor owning its storage; storage keys "0", "1", ...
    in the order met. Returns (pickle bytes, leaves in key order). `tensor_leaf` is asked about every object
    that is not a builtin scalar or container."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, tensor_leaf)
    pickler.dump(obj)
    return buf.getvalue(), pickler.leaves

# ---------------------------------------------------------------------------------------------- zip out


_U32 = 0xFFFFFFFF
ALIGNMENT = 64  # torch's kFieldAlignment; torch.load takes any alignment, mmap=True needs this one


def _archive_name(path: str) -> str:
    """torch's `basename()`: the file name up to its last dot. A non-ASCII path makes torch.save write
    through a Python file object, for which the writer's folder is "archive"."""
    if not path.isascii():
        return "archive"
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    name = name.rsplit(".", 1)[0] if "." in name else name
    if not name:
        raise ValueError(f"invalid file name: {path}")
    return name


def _flags(size: int) -> int:
    """UTF-8 names; miniz writes a data descriptor (bit 3) after every non-empty record."""
    return 0x0808 if size else 0x0800


def _local_header(name: bytes, size: int, cursor: int) -> tuple[bytes, bool]:
    zip64 = b""
    if size >= _U32:
        zip64 += struct.pack("<QQ", size, 0)
    if cursor >= _U32:
        zip64 += struct.pack("<Q", cursor)
    if zip64:
        zip64 = struct.pack("<HH", 1, len(zip64)) + zip64
    start = cursor + 30 + len(name) + len(zip64) + 4  # miniz's header, then torch's "FB" padding field
    pad = -start % ALIGNMENT
    extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    head = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name), len(extra))
    return head + name + extra, bool(zip64)


def _central_entry(name: bytes, size: int, offset: int) -> bytes:
    zip64 = (struct.pack("<QQ", size, size) if size >= _U32 else b"") + (
        struct.pack("<Q", offset) if offset >= _U32 else b"")
    extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
    n = min(size, _U32)
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, _flags(size), 0, 0, 0, 0, n, n, len(name),
                       len(extra), 0, 0, 0, 0, min(offset, _U32)) + name + extra


@dataclass(frozen=True)
class ArchiveLayout:
    """Where everything of a torch.save zip lies: `spans[name]` = (offset of the record's bytes, size), and
    `parts`, the bytes around the records (headers, descriptors, the given records' own bytes, the central
    directory), as (offset, bytes) in file order. Parts and reserved records tile [0, size) with no gap."""
    parts: list[tuple[int, bytes]]
    spans: dict[str, tuple[int, int]]
    size: int


def archive_layout(path, records: list[tuple[str, bytes | int]]) -> ArchiveLayout:
    """The zip torch's PyTorchStreamWriter writes (CRC32 off) for `records` in order, then the records its
    `writeEndOfFile` adds ("version", "byteorder" where missing, ".data/serialization_id"). A record given as
    an int is reserved: its bytes are the caller's to store. The serialization id is derived from the records
    (torch's is a random-like hash), so files equal torch's but for those 40 digits."""
    path = os.fspath(path)
    records = list(records)
    names = [n for n, _ in records]
    if len(set(names)) != len(names) or ".data/serialization_id" in names:
        raise ValueError(f"{path}: duplicate or reserved record names in {names}")
    if "version" not in names and ".data/version" not in names:
        records.append(("version", b"3\n"))
    if "byteorder" not in names:
        records.append(("byteorder", sys.byteorder.encode()))
    digest = hashlib.sha256(_archive_name(path).encode())
    for name, data in records:
        digest.update(f"{name}\0{data if isinstance(data, int) else len(data)}\0".encode())
        if not isinstance(data, int):
            digest.update(data)
    records.append((".data/serialization_id", b"%040d" % (int(digest.hexdigest(), 16) % 10 ** 40)))

    prefix = _archive_name(path) + "/"
    parts: list[tuple[int, bytes]] = []
    spans, central, cursor = {}, [], 0
    pending = b""  # bytes not yet placed, starting at `cursor - len(pending)`
    for name, data in records:
        full = (prefix + name).encode()
        size = data if isinstance(data, int) else len(data)
        head, zip64 = _local_header(full, size, cursor)
        spans[name] = (cursor + len(head), size)
        descriptor = struct.pack("<4sIQQ" if zip64 else "<4sIII", b"PK\x07\x08", 0, size, size) if size else b""
        central.append(_central_entry(full, size, cursor))
        if isinstance(data, int):
            parts.append((cursor - len(pending), pending + head))
            pending = descriptor
        else:
            pending += head + data + descriptor
        cursor += len(head) + size + len(descriptor)
    cd = b"".join(central)
    n = len(central)
    tail = (cd + struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), cursor)
            + struct.pack("<4sIQI", b"PK\x06\x07", 0, cursor + len(cd), 1)
            + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                          min(len(cd), _U32), min(cursor, _U32), 0))
    parts.append((cursor - len(pending), pending + tail))
    return ArchiveLayout([(o, b) for o, b in parts if b], spans, cursor + len(tail))


def write_archive(path, records: list[tuple[str, bytes | int]]) -> dict[str, tuple[int, int]]:
    """`archive_layout` written to `path`, reserved records left as holes for the caller to fill with
    os.pwrite. Returns name -> (offset of its bytes, size)."""
    layout = archive_layout(path, records)
    with open(path, "wb") as f:
        for offset, data in layout.parts:
            f.seek(offset)
            f.write(data)
        f.truncate(layout.size)
    return layout.spans

# ---------------------------------------------------------------------------------------------- read


def record_spans(path) -> dict[str, tuple[int, int]]:
    """Record name without the archive folder ("data/0", "data.pkl", ...) -> (offset of its bytes, size),
    from the central directory and each local header (whose extra field pads to the alignment)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():
                f.seek(info.header_offset)
                head = f.read(30)
                if head[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{path}: record {info.filename} is not stored uncompressed")
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                out[info.filename.split("/", 1)[-1]] = (info.header_offset + 30 + name_len + extra_len,
                                                        info.file_size)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a torch.save zip file ({e})") from e
    return out


@dataclass(frozen=True)
class StoredTensor:
    array: np.ndarray  # a view of the mapped file: dtype NUMPY_DTYPES[dtype], shape/strides/offset as pickled
    dtype: str         # torch dtype name, e.g. "bfloat16"


class UnsupportedPickle(ValueError):
    """The file's pickle needs a global this reader does not allow."""


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:  # not constructible from the pickle, so a tensor's bytes are always a checked record
    __slots__ = ("dtype", "numel", "offset")

    def __init__(self, dtype: str, offset: int, numel: int):
        self.dtype, self.offset, self.numel = dtype, offset, numel


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How protocol 2 pickles bytes (`_codecs.encode(text, "latin1")`), without other codecs' reach."""
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsupportedPickle(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): _latin1_bytes,
            **{("torch", cls): _StorageType(dtype) for dtype, cls in STORAGE_TYPES.items()},
            **{(module, t.__name__): t for module in ("builtins", "__builtin__")
               for t in (dict, list, tuple, str, int, float, bool, bytes)}}


class StandIn:
    """What a global outside the allowlist unpickles to in `load(..., stand_ins=True)`: an inert record of its
    name and of whatever the pickle passed it (call arguments, state). Its subclasses are made per global, so
    that the pickle's NEWOBJ (which needs a class) works; nothing of the named module is imported or called."""
    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    # what APPENDS / SETITEMS do to an object reduced from a list or dict subclass
    def append(self, item):
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("items", []).extend(items)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", []).append((key, value))

    def __repr__(self) -> str:
        return f"<stand-in {self.module}.{self.qualname}>"


def _stand_in(module: str, name: str) -> type:
    return type(f"StandIn[{module}.{name}]", (StandIn,), {"module": module, "qualname": name})


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path, mm: mmap.mmap, spans: dict[str, tuple[int, int]], stand_ins: bool):
        super().__init__(io.BytesIO(data))
        self.path, self.mm, self.spans, self.storages = path, mm, spans, {}
        self.stand_ins: dict[tuple[str, str], type] | None = {} if stand_ins else None

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if (module, name) not in _ALLOWED:
            if self.stand_ins is not None:
                return self.stand_ins.setdefault((module, name), _stand_in(module, name))
            raise UnsupportedPickle(f"{self.path}: data.pkl needs {module}.{name}, which this reader does not allow")
        return _ALLOWED[module, name]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            if self.stand_ins is not None:  # e.g. an UntypedStorage (uint32 tensors): never read
                return _stand_in("torch", "storage")(pid)
            raise UnsupportedPickle(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            offset, size = self.spans.get(f"data/{key}", (0, -1))
            if not isinstance(numel, int) or not 0 <= numel * NUMPY_DTYPES[storage_type.dtype].itemsize <= size:
                raise ValueError(f"{self.path}: record data/{key} is missing or holds fewer than {numel!r} elements")
            self.storages[key] = _Storage(storage_type.dtype, offset, numel)
        return self.storages[key]

    def _rebuild(self, storage, storage_offset, size, stride, requires_grad, hooks, *metadata):
        if isinstance(storage, StandIn):
            return _stand_in("torch._utils", "_rebuild_tensor_v2")(storage, storage_offset, size, stride)
        if not isinstance(storage, _Storage):
            raise UnsupportedPickle(f"{self.path}: a tensor's storage is not a storage record")
        np_dtype = NUMPY_DTYPES[storage.dtype]
        extent = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
        if min(stride, default=0) < 0 or storage_offset < 0 or storage_offset + extent > storage.numel:
            raise ValueError(f"{self.path}: tensor {tuple(size)} stride {tuple(stride)} at {storage_offset} "
                             f"lies outside its storage of {storage.numel}")
        array = np.ndarray(tuple(size), np_dtype, buffer=self.mm,
                           offset=storage.offset + storage_offset * np_dtype.itemsize,
                           strides=tuple(s * np_dtype.itemsize for s in stride))
        return StoredTensor(array, storage.dtype)


def load(path, stand_ins: bool = False) -> tuple[Any, mmap.mmap]:
    """The object torch.save wrote to `path`, each tensor a StoredTensor viewing one private (copy-on-write)
    mapping of the file, which is returned too: array address - mapping address = file offset. Unpickling
    allows only the globals torch.save uses for plain tensors and builtin values (UnsupportedPickle else),
    so nothing in the file can run code. `stand_ins`: every other global (a training save's argparse
    Namespace, numpy arrays, enums, torch dtypes, storages of other dtypes) becomes an inert `StandIn`
    instead, for a caller that then ignores those entries."""
    spans = record_spans(path)
    if "data.pkl" not in spans:
        raise ValueError(f"{path}: no data.pkl record")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if "byteorder" in spans:
        offset, size = spans["byteorder"]
        if mm[offset:offset + size] != b"little":
            raise ValueError(f"{path}: big-endian tensors are not supported")
    offset, size = spans["data.pkl"]
    return _Unpickler(mm[offset:offset + size], path, mm, spans, stand_ins).load(), mm
