"""Comparing `torch.save` files that should be equal: torch derives each file's 40-digit serialization id
from an unordered hash set, so files written by the converter (`streaming_save`) and by `torch.save` agree
in every byte but those."""
from __future__ import annotations

from pathlib import Path

from mindspeed_mm.checkpoint.torch_file import record_spans


def without_serialization_id(path: str | Path) -> bytes:
    """The file's bytes with its serialization id blanked."""
    data = bytearray(Path(path).read_bytes())
    offset, size = record_spans(path)[".data/serialization_id"]
    data[offset:offset + size] = b"0" * size
    return bytes(data)
