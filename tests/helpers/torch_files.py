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


def saved_tensors(save_dir: Path, iteration: int) -> dict:
    """{(rank dir, section, name): tensor} of a training save's model weights and optimizer state (one chunk)."""
    import torch

    out = {}
    for f in sorted((Path(save_dir) / f"iter_{iteration:07d}").glob("mp_rank_*/model_optim_rng.pt")):
        obj = torch.load(f, weights_only=True)
        for k, v in obj["model"].items():
            out[(f.parent.name, "model", k)] = v
        for kind, sd in obj["optimizer"]["chunks"][0].items():
            for k, v in sd.items():
                out[(f.parent.name, kind, k)] = v
    return out
