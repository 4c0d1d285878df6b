"""Per-rank slices of full tensors for tensor parallelism, and the way back, by TP kind.

Pure functions over tensors and index ranges, model-agnostic: a model's parameter registry says which kind
each parameter is (`models/internvl/params.py`), and `models/internvl/sharding.py` applies these to names.
"Tensor" is a torch tensor or a numpy array (the converter works on numpy views of mapped files so that it
never imports torch); `narrow`, `cat` and `Slice.pad_block` are all they need and work on either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any


@dataclass(frozen=True)
class Slice:
    """Rank r's part of a full tensor: the concatenation, along `dim`, of the full tensor's index ranges
    `spans`, followed by `pad` zero rows (vocabulary padding)."""
    dim: int
    spans: tuple[tuple[int, int], ...]
    pad: int = 0

    def shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this slice of a tensor shaped `full_shape`."""
        out = list(full_shape)
        out[self.dim] = sum(b - a for a, b in self.spans) + self.pad
        return tuple(out)

    def pad_block(self, like: Tensor) -> Tensor:
        """The `pad` zero rows that end this slice, otherwise shaped and typed like `like`."""
        shape = list(like.shape)
        shape[self.dim] = self.pad
        return np.zeros(shape, like.dtype) if isinstance(like, np.ndarray) else like.new_zeros(shape)


def narrow(t: Tensor, dim: int, start: int, length: int) -> Tensor:
    """`t.narrow(dim, start, length)` for a torch tensor or a numpy array: a view."""
    return t[(slice(None),) * dim + (slice(start, start + length),)]


def cat(parts: list[Tensor], dim: int) -> Tensor:
    """`parts` joined along `dim` into new memory (a copy even of a single part)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0].copy()
    import torch

    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()


def uneven_split(n: int, tp: int) -> list[int]:
    """`n` rows over `tp` ranks without padding, the first `n % tp` ranks one more (MindSpeed-MM's
    `cal_split_sizes`; 397 on 2: 199, 198)."""
    return [n // tp + (r < n % tp) for r in range(tp)]


def tp_slice(kind: str, full_shape: tuple[int, ...], tp: int, rank: int, padded_vocab: int,
             head_rows: Sequence[int] = ()) -> Slice:
    """Which ranges of a full tensor of TP kind `kind` rank `rank` holds at tensor-parallel size `tp`
    (`head_rows`: rows per rank of the uneven `vit_qkv` / `vit_heads` kinds). Lets a reader fetch just those
    ranges from disk instead of the whole tensor. Besides the registry's kinds (`models/internvl/params.py`),
    `uneven_rows`: dim 0 by `uneven_split`, unpadded (another system's vocabulary split)."""
    n = full_shape[0]
    if kind == "uneven_rows":
        sizes = uneven_split(n, tp)
        start = sum(sizes[:rank])
        return Slice(0, ((start, start + sizes[rank]),))
    if kind == "replicate" or tp == 1 and kind != "vocab":
        return Slice(0, ((0, n),))
    if kind == "rows":
        return Slice(0, ((rank * n // tp, (rank + 1) * n // tp),))
    if kind == "cols":
        m = full_shape[1]
        return Slice(1, ((rank * m // tp, (rank + 1) * m // tp),))
    if kind == "glu":
        half = n // 2
        return Slice(0, tuple((o + rank * half // tp, o + (rank + 1) * half // tp) for o in (0, half)))
    if kind == "vocab":
        per = padded_vocab // tp
        start, end = rank * per, (rank + 1) * per
        return Slice(0, ((min(start, n), min(end, n)),), pad=end - max(start, min(end, n)))
    lo, hi = sum(head_rows[:rank]), sum(head_rows[:rank + 1])
    if kind == "vit_qkv":
        block = n // 3
        return Slice(0, tuple((b * block + lo, b * block + hi) for b in range(3)))
    if kind == "vit_heads":
        return Slice(1, ((lo, hi),))
    if kind == "vit_head_rows":
        return Slice(0, ((lo, hi),))
    raise AssertionError(kind)


def take(t: Tensor, sl: Slice) -> Tensor:
    """Apply a `Slice` to a full tensor."""
    parts = [narrow(t, sl.dim, a, b - a) for a, b in sl.spans]
    if sl.pad:
        parts.append(sl.pad_block(t))
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0]) if isinstance(t, np.ndarray) else parts[0].contiguous()
    return cat(parts, sl.dim)


def cut_from_shards(name: str, full_shape: tuple[int, ...], shards: list[Tensor], have: list[Slice],
                    want: Slice) -> tuple[int, list[Tensor]]:
    """Slice `want` of the full tensor `name` as (dim, pieces) from the TP ranks' `shards`, rank r holding
    slice `have[r]`: the pieces concatenated along `dim` are that slice, each a view of one shard (plus a
    zero block for `want.pad`). Moving to another TP size thus never builds the full tensor, and row pieces
    stay views of whatever the shards map (a file, for the converter). `dim` is the shards' dim, which
    differs from `want.dim` only where `want` is whole."""
    tp = len(shards)
    for r, (sl, t) in enumerate(zip(have, shards)):
        if tuple(t.shape) != sl.shape(full_shape):
            raise ValueError(f"{name}: TP rank {r} of {tp} has shape {tuple(t.shape)}, expected "
                             f"{sl.shape(full_shape)} for a full shape {tuple(full_shape)}")
    d = have[0].dim

    def whole(sl: Slice) -> bool:
        return not sl.pad and sl.spans == ((0, full_shape[sl.dim]),)

    if want.dim != d:  # one side is whole (TP 1, a replicated tensor): cut it along the other's dim instead
        if all(whole(sl) for sl in have):
            d = want.dim
            have = [Slice(d, ((0, full_shape[d]),))] * tp
        elif whole(want):
            want = Slice(d, ((0, full_shape[d]),))
        else:
            raise ValueError(f"{name}: cannot cut dim {want.dim} {want.spans} from shards cut along dim {d}")
    runs = []  # (global start, global end, rank, local start): where each shard's spans sit in the full tensor
    for r, sl in enumerate(have):
        local = 0
        for a, b in sl.spans:
            runs.append((a, b, r, local))
            local += b - a
    runs.sort(key=lambda x: (x[0], x[2]))  # replicated ranges: rank 0's copy first
    pieces = []
    for a, b in want.spans:
        at = a
        for lo, hi, r, local in runs:
            if hi <= at or lo >= b:
                continue
            if lo > at:
                break
            end = min(hi, b)
            pieces.append(narrow(shards[r], d, local + at - lo, end - at))
            at = end
        if at != b:
            raise ValueError(f"{name}: the shards do not cover [{at}, {b}) along dim {d}")
    if want.pad:  # want.dim == d: a padded slice is never whole
        pieces.append(want.pad_block(shards[0]))
    return d, pieces
