"""HF checkpoint weight files: which safetensors files a directory holds, their headers, their tensors.

Every reader of an HF directory finds its files through `weight_files`, and every writer of one shards
through `write_sharded`. Headers are validated before anything is read, naming the file on any problem
(missing, truncated, corrupt); tensors are read as numpy views of a mapping or through safetensors.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import numpy as np

from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.config import HFFormat, detect_format, read_hf_config, read_json

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The validated header of a .safetensors file and the offset where its data starts, naming the file on
    any problem (missing, truncated, corrupt)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file is missing: {path}") from None
    if size < 8:
        raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > size - 8:
            raise CheckpointFormatError(
                f"{path}: truncated safetensors file (header claims {hlen} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header: {e}") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header entry {name!r}") from None
    if 8 + hlen + end != size:
        raise CheckpointFormatError(
            f"{path}: truncated or corrupt safetensors file (tensor data needs {8 + hlen + end} bytes, file has "
            f"{size})"
        )
    return header, 8 + hlen


# safetensors dtype code -> torch dtype name (the numpy dtype of the same bytes is torch_file.NUMPY_DTYPES[name])
ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_dtype_name(code: str) -> str:
    """"BF16" -> "bfloat16"; an unknown code is returned as it is."""
    return ST_DTYPES.get(code, code)


def safetensors_array(mapped, entry: dict, data_start: int, start: int | None = None,
                      end: int | None = None) -> np.ndarray:
    """Rows [start, end) of one tensor (all rows by default) of a safetensors file mapped with `mmap`
    (`ACCESS_COPY`), as a numpy array over exactly those bytes of the mapping (bfloat16 as uint16): nothing
    is copied, and only the pages touched are read."""
    from mindspeed_mm.checkpoint.torch_file import NUMPY_DTYPES

    shape, dtype = list(entry["shape"]), NUMPY_DTYPES[ST_DTYPES[entry["dtype"]]]
    begin = data_start + int(entry["data_offsets"][0])
    if not shape:
        start, end = 0, 1
    start, end = (0 if start is None else start), (shape[0] if end is None and shape else end)
    row = 1
    for n in shape[1:]:
        row *= n
    out_shape = [end - start] + shape[1:]
    if (end - start) * row == 0:
        return np.empty(out_shape, dtype=dtype)
    t = np.frombuffer(mapped, dtype=dtype, count=(end - start) * row, offset=begin + start * row * dtype.itemsize)
    return t.reshape(out_shape if shape else [])


def read_safetensors(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys``) from one safetensors file; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    read_safetensors_header(path)  # validates: names the file if missing, truncated or corrupt
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else keys
            present = set(f.keys())
            for k in names:
                if k not in present:
                    raise CheckpointFormatError(f"{path}: tensor {k!r} (listed in the index) is not in this file")
                out[k] = f.get_tensor(k)
    except CheckpointFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointFormatError(f"{path}: cannot read safetensors file: {e}") from e
    return out


def weight_files(hf_dir: str | os.PathLike) -> tuple[dict, HFFormat, dict[str, list[str] | None], str]:
    """An HF checkpoint directory's config.json (read as data), its format, which tensors each safetensors file
    holds (None: every tensor of the single file) and a few words on that layout; errors name the file."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory does not exist: {hf_dir}")
    config = read_hf_config(hf_dir)
    try:
        fmt = detect_format(config)
    except ValueError as e:
        raise CheckpointFormatError(f"{hf_dir / 'config.json'}: {e}") from None
    index_path, single = hf_dir / SAFE_INDEX, hf_dir / SAFE_SINGLE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointFormatError(f"{index_path}: no weight_map")
        by_file: dict[str, list[str] | None] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)  # type: ignore[union-attr]
        return config, fmt, by_file, f"sharded ({len(by_file)} files, {index_path.name})"
    if single.exists():
        return config, fmt, {SAFE_SINGLE: None}, f"single file ({SAFE_SINGLE})"
    others = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
    raise FileNotFoundError(f"checkpoint file is missing: {single} (and no {index_path.name}){hint}")


def load_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[dict, HFFormat, dict[str, torch.Tensor]]:
    """Read ``config.json`` (as data) and all safetensors weights of an HF InternVL3 checkpoint directory
    (either layout of `weight_files`): ``(config, format, state_dict)`` with names exactly as stored."""
    config, fmt, by_file, _ = weight_files(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(by_file):
        state.update(read_safetensors(Path(hf_dir) / fname, by_file[fname]))
    return config, fmt, state


def write_sharded(items: Iterable[tuple[str, "torch.Tensor"]], out_dir: Path, max_bytes: int | None = None,
                  on_flush: Callable[[], None] | None = None) -> tuple[list[str], int]:
    """Write `(name, tensor)` pairs, in order, as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` where `max_bytes` splits them (greedy; a tensor larger than the limit
    gets a file of its own; one file means no index, as transformers does). Each file is written as soon as it
    is full (then `on_flush` runs), so at most one file's tensors are held. Returns the file names and the
    tensors' total size."""
    from safetensors.torch import save_file

    parts: list[tuple[str, list[str]]] = []  # (temporary name, keys)
    cur: dict = {}
    cur_bytes = total = 0

    def flush() -> None:
        nonlocal cur, cur_bytes
        name = f".part-{len(parts):05d}.safetensors"
        save_file(cur, str(out_dir / name), metadata={"format": "pt"})
        parts.append((name, list(cur)))
        cur, cur_bytes = {}, 0
        if on_flush is not None:
            on_flush()

    for key, t in items:
        nb = t.numel() * t.element_size()
        if cur and max_bytes is not None and cur_bytes + nb > max_bytes:
            flush()
        cur[key] = t
        cur_bytes += nb
        total += nb
    if cur or not parts:
        flush()
    if len(parts) == 1:
        os.replace(out_dir / parts[0][0], out_dir / SAFE_SINGLE)
        return [SAFE_SINGLE], total
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for (tmp_name, keys), name in zip(parts, names):
        os.replace(out_dir / tmp_name, out_dir / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names, total
