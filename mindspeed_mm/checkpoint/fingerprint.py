"""The fingerprint of the frozen base an adapter save was trained on, and its check.

An adapter save (LoRA) holds the adapters and the trainable parameters only; the frozen base is referenced by
its path and fingerprinted: per parameter (full-model name), the float64 sum and sum of squares of the whole
tensor. These do not depend on the layout (a TP slice's sums add up; vocabulary padding rows are zeros), so a
base converted or resharded to another layout has the same fingerprint, up to summation order, while another
checkpoint's weights (another model, another finetune, a truncated conversion) differ. The model in memory
(`runtime.chunks.base_fingerprint`) and the converter's full tensors compute the same numbers.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from mindspeed_mm.errors import CheckpointFormatError

__all__ = ["tensor_stats", "add_stats", "check_fingerprint", "RTOL"]

RTOL = 1e-9  # float64 sums of the same numbers in another order
_CHUNK = 1 << 22


def tensor_stats(t: Any) -> list[float]:
    """[sum, sum of squares] of a torch tensor or numpy array, in float64, a chunk at a time."""
    flat = t.reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.shape[0], _CHUNK):
        part = flat[start:start + _CHUNK]
        part = part.double() if hasattr(part, "double") else np.asarray(part, dtype=np.float64)
        total += float(part.sum())
        squares += float((part * part).sum())
    return [total, squares]


def add_stats(into: dict[str, list[float]], name: str, stats: list[float]) -> None:
    old = into.setdefault(name, [0.0, 0.0])
    old[0] += stats[0]
    old[1] += stats[1]


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL * scale)


def check_fingerprint(expected: Mapping[str, list[float]], actual: Mapping[str, list[float]], base: str,
                      save: str) -> None:
    """The base loaded (`base` names it) must be the one the adapters in `save` were trained on: every
    fingerprinted parameter present with the same sums."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise CheckpointFormatError(f"{save}: the base loaded ({base}) lacks {len(missing)} frozen parameter(s) "
                                    f"the adapters were trained on, e.g. {missing[0]}")
    for name, (s, ss) in expected.items():
        a, aa = actual[name]
        if not (_close(a, s, math.sqrt(abs(ss)) + 1.0) and _close(aa, ss, abs(ss) + 1.0)):
            raise CheckpointFormatError(
                f"{save}: the base loaded ({base}) is not the one its adapters were trained on: {name} differs "
                f"(sum {a:.9g} vs {s:.9g}, sum of squares {aa:.9g} vs {ss:.9g} recorded); load the original base "
                f"with --load, or merge the adapters into the base they belong to")
