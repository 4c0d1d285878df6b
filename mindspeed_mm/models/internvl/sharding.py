"""Per-rank, per-stage views of InternVL3's full state dict: the registry (`params.py`) applied to names.

The converter writes shards with these, the parallel tests merge gradients back with them, and the model's
parallel layers are built to match them (tests/unit/test_param_registry.py checks that they do).

`tp_style` says whose convention the rank files follow: "mm" (ours, what the model holds) or "mindspeed"
(MindSpeed-MM's files: the projector whole on every TP rank, the vocabulary in unpadded uneven row blocks).
The two differ only in those two places, so a style is a remapping of the registry's TP kinds (`tp_kind_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.params import (
    EMBEDDING, LLM_EMBED, LLM_HEAD, OUTPUT_LAYER, PROJECTOR, TP_DIM, VIT_EMBED, VIT_LAYER, expert_index, lookup,
    with_expert, with_layer,
)
from mindspeed_mm.parallel.layout import LayoutPlan, StagePlan, head_partition
from mindspeed_mm.parallel.sharding import Slice, cat, cut_from_shards, take, tp_slice

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any


TP_STYLES = ("mm", "mindspeed")


@dataclass(frozen=True)
class ExpertShard:
    """Which experts one expert-parallel rank holds: `local` consecutive ones from `rank * local` (megatron numbers
    them 0..local-1 on every rank); `local` None: all of them (no expert parallelism)."""
    rank: int = 0
    local: Optional[int] = None

    @classmethod
    def of(cls, num_experts: Optional[int], ep: int, rank: int) -> "ExpertShard":
        return cls() if not num_experts or ep == 1 else cls(rank, num_experts // ep)

    def to_local(self, e: int) -> Optional[int]:
        if self.local is None:
            return e
        return e - self.rank * self.local if self.rank * self.local <= e < (self.rank + 1) * self.local else None

    def to_global(self, e: int) -> int:
        return e if self.local is None else e + self.rank * self.local


ALL_EXPERTS = ExpertShard()


def tp_kind_for(name: str, style: str = "mm") -> str:
    """The TP kind of parameter `name` in rank files of `style` (the registry's kind for "mm")."""
    d, _ = lookup(name)
    if style == "mm":
        return d.tp
    if style != "mindspeed":
        raise ValueError(f"unknown tp_style {style!r} (expected one of {TP_STYLES})")
    if d.owner == PROJECTOR:
        return "replicate"
    return "uneven_rows" if d.tp == "vocab" else d.tp


def shard_slice(name: str, full_shape: tuple[int, ...], spec: InternVLSpec, tp: int, rank: int,
                padded_vocab: int, style: str = "mm", etp: Optional[int] = None) -> Slice:
    """Which ranges of the full tensor `name` rank `rank` holds at tensor-parallel size `tp` in `style`; an
    expert's tensors are cut by the expert tensor-parallel size `etp` (default `tp`: megatron's), rank % etp."""
    if etp is not None and etp != tp and lookup(name)[0].per_expert:
        tp, rank = etp, rank % etp
    kind = tp_kind_for(name, style)
    rows = ()
    if kind in ("vit_qkv", "vit_heads", "vit_head_rows"):
        rows = [h * spec.vision.head_dim for h in head_partition(spec.vision.num_attention_heads, tp)]
    return tp_slice(kind, full_shape, tp, rank, padded_vocab, rows)


def shard_tensor(name: str, t: Tensor, spec: InternVLSpec, tp: int, rank: int, padded_vocab: int,
                 style: str = "mm", etp: Optional[int] = None) -> Tensor:
    """Rank `rank`'s slice of the full tensor `name` at tensor-parallel size `tp` in `style`."""
    return take(t, shard_slice(name, tuple(t.shape), spec, tp, rank, padded_vocab, style, etp))


def slice_from_shards(name: str, full_shape: tuple[int, ...], spec: InternVLSpec, shards: list[Tensor],
                      padded_vocab: int, want: Slice, style: str = "mm") -> tuple[int, list[Tensor]]:
    """`take(merge_tensor(name, shards, spec, style), want)` as views of the shards (`cut_from_shards`);
    `shards` are the TP ranks' slices at tp = len(shards) in `style` with that layout's `padded_vocab`, `want`
    a slice at any TP size and style (`shard_slice`). Of a replicated tensor, rank 0's copy is read; every
    rank's copy must have the full shape."""
    tp = len(shards)
    have = [shard_slice(name, full_shape, spec, tp, r, padded_vocab, style) for r in range(tp)]
    return cut_from_shards(name, full_shape, shards, have, want)


def merge_tensor(name: str, shards: list[Tensor], spec: InternVLSpec, style: str = "mm") -> Tensor:
    """The full tensor from every TP rank's slice, in rank order (inverse of `shard_tensor`)."""
    tp = len(shards)
    kind = tp_kind_for(name, style)
    shape = list(shards[0].shape)
    if lookup(name)[0].tp == "vocab":  # in either style, padding (if any) is beyond the vocabulary
        shape[0] = spec.text.vocab_size
    elif kind != "replicate" and tp > 1:
        dim = TP_DIM.get(kind, 0)
        shape[dim] = sum(s.shape[dim] for s in shards)
    padded_vocab = shards[0].shape[0] * tp
    dim, pieces = slice_from_shards(name, tuple(shape), spec, shards, padded_vocab, Slice(0, ((0, shape[0]),)),
                                    style)
    return cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def _held(owner: str, stage: StagePlan) -> bool:
    return {VIT_EMBED: stage.has_vit_embed, PROJECTOR: stage.has_projector, LLM_EMBED: stage.has_llm_embed,
            LLM_HEAD: stage.has_llm_head}[owner]


def _layers(owner: str, stage: StagePlan) -> range:
    return stage.vit_layers if owner == VIT_LAYER else stage.llm_layers


def stage_name(name: str, stage: StagePlan, experts: ExpertShard = ALL_EXPERTS) -> str | None:
    """The stage-local name of full-model parameter `name`, or None if the stage does not hold it (or, for an
    expert's tensor, the expert-parallel rank `experts` does not). With tied embeddings the token embeddings are
    held twice when the LLM spans stages: by the LLM's first stage, and by its last as the output layer's weight
    (`StagePlan.has_tied_output`), the same slices."""
    d, layer = lookup(name)
    if layer is None:
        if name == EMBEDDING and stage.has_tied_output:
            return OUTPUT_LAYER
        return name if _held(d.owner, stage) else None
    layers = _layers(d.owner, stage)
    if layer not in layers:
        return None
    local = with_layer(d.name, layer - layers.start)
    if not d.per_expert:
        return local
    e = experts.to_local(expert_index(name))
    return None if e is None else with_expert(local, e)


def global_name(local: str, stage: StagePlan, experts: ExpertShard = ALL_EXPERTS) -> str:
    if local == OUTPUT_LAYER and stage.has_tied_output:
        return EMBEDDING
    d, layer = lookup(local)
    if layer is None:
        return local
    name = with_layer(d.name, layer + _layers(d.owner, stage).start)
    return with_expert(name, experts.to_global(expert_index(local))) if d.per_expert else name


def local_state_dict(full: Mapping[str, Tensor], spec: InternVLSpec, plan: LayoutPlan,
                     tp_rank: int, stage: StagePlan, style: str = "mm", ep_rank: int = 0) -> dict[str, Tensor]:
    """What the model chunk of `stage` on TP rank `tp_rank` (and expert-parallel rank `ep_rank`) loads ("mm"),
    or what a rank file of `style` holds for it."""
    out = {}
    experts = ExpertShard.of(spec.text.num_experts, plan.parallel.ep, ep_rank)
    for name, t in full.items():
        local = stage_name(name, stage, experts)
        if local is not None:
            out[local] = shard_tensor(name, t, spec, plan.parallel.tp, tp_rank, plan.padded_vocab_size, style,
                                      plan.parallel.expert_tp)
    return out


def full_state_dict(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], spec: InternVLSpec,
                    plan: LayoutPlan, style: str = "mm") -> dict[str, Tensor]:
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
        out[name] = merge_tensor(name, [by_rank[r] for r in range(tp)], spec, style)
    return out
