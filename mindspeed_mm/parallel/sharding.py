"""Per-rank slices of a full (unsharded, HF-derived) state dict for any layout, and the inverse.

Pure functions over tensors and names: the converter writes shards with them, the parallel tests merge
gradients back with them, and the model's parallel layers are built to match them. "Tensor" is a torch
tensor or a numpy array (the converter works on numpy views of mapped files so that it never imports
torch); `narrow`, `cat` and `Slice.pad_block` are all they need and work on either. TP rules by name:
- replicated: norms, layer scales, embeddings of the ViT, biases added after a row-parallel linear;
- rows (dim 0) / columns (dim 1), even: MLP and projector linears, the LLM's `linear_qkv` (already
  interleaved per query group, so rank r's rows are its groups) and `linear_proj`;
- `glu`: the LLM's `linear_fc1` is `[gate; up]`, rank r gets `[gate_r; up_r]`;
- `vit_qkv`: the ViT's `[Q; K; V]` by uneven head counts (`head_partition`), rank r gets `[q_r; k_r; v_r]`;
  `vit_heads`: `linear_proj` columns by the same head counts;
- `vocab`: embedding and output rows, zero-padded to a multiple of TP (the model masks padded logits).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.parallel.layout import LayoutPlan, StagePlan, head_partition

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any

VIT_LAYER = "image_encoder.encoder.encoder.layers."
LLM_LAYER = "text_decoder.decoder.layers."


@dataclass(frozen=True)
class TPRule:
    kind: str  # replicate | rows | cols | glu | vit_qkv | vit_heads | vocab

    @property
    def dim(self) -> int:
        """The dim tensor parallelism cuts (replicated tensors: 0, where TP 1 cuts everything)."""
        return 1 if self.kind in ("cols", "vit_heads") else 0


_RULES = [  # (regex on the full name, rule); first match wins
    (r"image_encoder\.encoder\.encoder\.layers\.\d+\.self_attention\.linear_qkv\.(weight|bias)$", TPRule("vit_qkv")),
    (r"image_encoder\.encoder\.encoder\.layers\.\d+\.self_attention\.linear_proj\.weight$", TPRule("vit_heads")),
    (r"text_decoder\.(embedding\.word_embeddings|output_layer)\.weight$", TPRule("vocab")),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.linear_fc1\.weight$", TPRule("glu")),
    (r"\.(linear_qkv|linear_fc1)\.(weight|bias)$", TPRule("rows")),
    (r"\.(linear_proj|linear_fc2)\.weight$", TPRule("cols")),
]


def tp_rule(name: str) -> TPRule:
    for pattern, rule in _RULES:
        if re.search(pattern, name):
            return rule
    return TPRule("replicate")


def _vit_head_rows(spec: InternVLSpec, tp: int) -> list[int]:
    return [h * spec.vision.head_dim for h in head_partition(spec.vision.num_attention_heads, tp)]


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


def shard_slice(name: str, full_shape: tuple[int, ...], spec: InternVLSpec, tp: int, rank: int,
                padded_vocab: int) -> Slice:
    """Which ranges of the full tensor `name` rank `rank` holds at tensor-parallel size `tp`. Lets a reader
    fetch just those ranges from disk instead of the whole tensor."""
    kind = tp_rule(name).kind
    n = full_shape[0]
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
    rows = _vit_head_rows(spec, tp)
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    if kind == "vit_qkv":
        block = n // 3
        return Slice(0, tuple((b * block + lo, b * block + hi) for b in range(3)))
    if kind == "vit_heads":
        return Slice(1, ((lo, hi),))
    raise AssertionError(kind)


def take(t: Tensor, sl: Slice) -> Tensor:
    """Apply a `Slice` to a full tensor."""
    parts = [narrow(t, sl.dim, a, b - a) for a, b in sl.spans]
    if sl.pad:
        parts.append(sl.pad_block(t))
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0]) if isinstance(t, np.ndarray) else parts[0].contiguous()
    return cat(parts, sl.dim)


def shard_tensor(name: str, t: Tensor, spec: InternVLSpec, tp: int, rank: int, padded_vocab: int) -> Tensor:
    """Rank `rank`'s slice of the full tensor `name` at tensor-parallel size `tp`."""
    return take(t, shard_slice(name, tuple(t.shape), spec, tp, rank, padded_vocab))


def merge_tensor(name: str, shards: list[Tensor], spec: InternVLSpec) -> Tensor:
    """The full tensor from every TP rank's slice, in rank order (inverse of `shard_tensor`)."""
    tp = len(shards)
    rule = tp_rule(name)
    shape = list(shards[0].shape)
    if rule.kind == "vocab":
        shape[0] = spec.text.vocab_size
    elif rule.kind != "replicate" and tp > 1:
        shape[rule.dim] = sum(s.shape[rule.dim] for s in shards)
    padded_vocab = shards[0].shape[0] * tp
    dim, pieces = slice_from_shards(name, tuple(shape), spec, shards, padded_vocab, Slice(0, ((0, shape[0]),)))
    return cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def slice_from_shards(name: str, full_shape: tuple[int, ...], spec: InternVLSpec, shards: list[Tensor],
                      padded_vocab: int, want: Slice) -> tuple[int, list[Tensor]]:
    """`take(merge_tensor(name, shards, spec), want)` as (dim, pieces): the pieces concatenated along `dim`
    are that slice, each a view of one shard (plus a zero block for `want.pad`). Moving to another TP size
    thus never builds the full tensor, and row pieces stay views of whatever the shards map (a file, for
    the converter). `dim` is the shards' dim, which differs from `want.dim` only where `want` is whole.

    `shards` are the TP ranks' slices at tp = len(shards), with `padded_vocab` the vocabulary padding of
    that layout; `want` is a slice at any TP size (`shard_slice`)."""
    tp = len(shards)
    have = [shard_slice(name, full_shape, spec, tp, r, padded_vocab) for r in range(tp)]
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


def _layer_key(name: str) -> tuple[str, int, str] | None:
    for prefix in (VIT_LAYER, LLM_LAYER):
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            return prefix, int(idx), rest
    return None


def stage_name(name: str, stage: StagePlan) -> str | None:
    """The stage-local name of full-model parameter `name`, or None if the stage does not hold it."""
    layer = _layer_key(name)
    if layer is not None:
        prefix, idx, rest = layer
        layers = stage.vit_layers if prefix == VIT_LAYER else stage.llm_layers
        return f"{prefix}{idx - layers.start}.{rest}" if idx in layers else None
    held = {
        "image_encoder.encoder.embeddings.": stage.has_vit_embed,
        "image_encoder.projector.": stage.has_projector,
        "text_decoder.embedding.": stage.has_llm_embed,
        "text_decoder.decoder.final_layernorm.": stage.has_llm_head,
        "text_decoder.output_layer.": stage.has_llm_head,
    }
    for prefix, here in held.items():
        if name.startswith(prefix):
            return name if here else None
    raise KeyError(f"{name}: not a parameter of the InternVL3 model")


def global_name(local: str, stage: StagePlan) -> str:
    layer = _layer_key(local)
    if layer is None:
        return local
    prefix, idx, rest = layer
    start = (stage.vit_layers if prefix == VIT_LAYER else stage.llm_layers).start
    return f"{prefix}{idx + start}.{rest}"


def local_state_dict(full: Mapping[str, Tensor], spec: InternVLSpec, plan: LayoutPlan,
                     tp_rank: int, stage: StagePlan) -> dict[str, Tensor]:
    """What the model chunk of `stage` on TP rank `tp_rank` loads."""
    out = {}
    for name, t in full.items():
        local = stage_name(name, stage)
        if local is not None:
            out[local] = shard_tensor(name, t, spec, plan.parallel.tp, tp_rank, plan.padded_vocab_size)
    return out


def full_state_dict(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], spec: InternVLSpec,
                    plan: LayoutPlan) -> dict[str, Tensor]:
    """Inverse of `local_state_dict` over all `(tp_rank, stage)` pieces; each name must be complete."""
    pieces: dict[str, dict[int, Tensor]] = {}
    for (tp_rank, stage_idx), sd in shards.items():
        stage = plan.stages[stage_idx]
        for local, t in sd.items():
            pieces.setdefault(global_name(local, stage), {})[tp_rank] = t
    tp = plan.parallel.tp
    out = {}
    for name, by_rank in pieces.items():
        if sorted(by_rank) != list(range(tp)):
            raise KeyError(f"{name}: have TP ranks {sorted(by_rank)}, need 0..{tp - 1}")
        out[name] = merge_tensor(name, [by_rank[r] for r in range(tp)], spec)
    return out
