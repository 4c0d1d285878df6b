"""HuggingFace InternVL3 parameters (either format) <-> ours, unsharded.

One rule per parameter of ours (a view of the registry, `params.py`): which HF tensors it is made of and how
they merge. The converter streams them tensor by tensor and the tests invert them. Merges Megatron needs:
- LLM `linear_qkv`: rows interleaved per query group, `[q heads of group g; k_g; v_g]` for each g;
- LLM `linear_fc1`: `[gate; up]`;
- ViT `linear_qkv`: `[Q; K; V]` (the original format already stores it so; native has three tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.params import Param, params
from mindspeed_mm.models.internvl.hf.keys import split_fused_experts

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any

# read(name, dim, start, end): the index range [start, end) along dim of one HF tensor, read from disk.
PartReader = Callable[[str, int, int, int], Tensor]


@dataclass(frozen=True)
class Copy:
    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shapes of the HF tensors that make a tensor of ours shaped `shape` (what `split` returns)."""
        return [tuple(shape)]

    def merge(self, parts: list[Tensor]) -> Tensor:
        return parts[0]

    def split(self, t: Tensor) -> list[Tensor]:
        return [t]

    def read(self, read: PartReader, names: tuple[str, ...], dim: int, a: int, b: int) -> list[Tensor]:
        return [read(names[0], dim, a, b)]


@dataclass(frozen=True)
class Concat:
    """Row blocks stacked in order (sizes given so that split needs no shapes from elsewhere)."""
    sizes: tuple[int, ...]

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [(n, *shape[1:]) for n in self.sizes]

    def merge(self, parts: list[Tensor]) -> Tensor:
        import torch

        assert tuple(p.shape[0] for p in parts) == self.sizes, (tuple(p.shape[0] for p in parts), self.sizes)
        return torch.cat(parts, dim=0)

    def split(self, t: Tensor) -> list[Tensor]:
        import torch

        return [p.contiguous() for p in torch.split(t, list(self.sizes), dim=0)]

    def read(self, read: PartReader, names: tuple[str, ...], dim: int, a: int, b: int) -> list[Tensor]:
        assert dim == 0, "row blocks are only ever cut along rows"
        out, offset = [], 0
        for name, size in zip(names, self.sizes):
            lo, hi = max(a, offset), min(b, offset + size)
            if lo < hi:
                out.append(read(name, 0, lo - offset, hi - offset))
            offset += size
        return out


@dataclass(frozen=True)
class GroupInterleave:
    """[Q; K; V] (Q: groups*q_per_group*d rows, K and V: groups*d) -> per group [q_g; k_g; v_g]."""
    groups: int
    q_per_group: int
    head_dim: int

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        g, d = self.groups, self.head_dim
        return [(g * self.q_per_group * d, *shape[1:]), (g * d, *shape[1:]), (g * d, *shape[1:])]

    def merge(self, parts: list[Tensor]) -> Tensor:
        import torch

        q, k, v = parts
        g, d = self.groups, self.head_dim
        rest = q.shape[1:]
        q = q.reshape(g, self.q_per_group * d, *rest)
        return torch.cat([q, k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)

    def split(self, t: Tensor) -> list[Tensor]:
        import torch

        g, d = self.groups, self.head_dim
        rest = t.shape[1:]
        q, k, v = torch.split(t.reshape(g, (self.q_per_group + 2) * d, *rest), [self.q_per_group * d, d, d], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]

    def read(self, read: PartReader, names: tuple[str, ...], dim: int, a: int, b: int) -> list[Tensor]:
        """Rows [a, b) of the interleaved tensor, which tensor parallelism cuts at group boundaries: per group
        its q rows, k rows and v rows (`merge`'s order)."""
        rows = (self.q_per_group + 2) * self.head_dim
        assert dim == 0 and a % rows == 0 and b % rows == 0, (dim, a, b, rows)
        qd, d = self.q_per_group * self.head_dim, self.head_dim
        out = []
        for g in range(a // rows, b // rows):
            out += [read(names[0], 0, g * qd, (g + 1) * qd), read(names[1], 0, g * d, (g + 1) * d),
                    read(names[2], 0, g * d, (g + 1) * d)]
        return out


@dataclass(frozen=True)
class Rule:
    mm: str
    hf: tuple[str, ...]
    op: Copy | Concat | GroupInterleave = Copy()


def _op(p: Param, names: tuple[str, ...], spec: InternVLSpec) -> Copy | Concat | GroupInterleave:
    if len(names) == 1:
        return Copy()
    if p.merge == "concat":
        return Concat((p.shape[0] // len(names),) * len(names))
    t = spec.text
    return GroupInterleave(t.num_query_groups, t.num_attention_heads // t.num_query_groups, t.kv_channels)


def mapping_rules(spec: InternVLSpec, fmt: str) -> list[Rule]:
    """One rule per parameter of ours for HF format `fmt` ("native" or "original"), from the registry."""
    if fmt not in ("native", "original"):
        raise ValueError(f"unknown HF format {fmt!r} (expected 'native' or 'original')")
    return [Rule(p.name, p.hf(fmt), _op(p, p.hf(fmt), spec)) for p in params(spec)]


def uncovered(available: Iterable[str], wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """(unknown, missing): the names `available` has beyond `wanted`, and those of `wanted` it lacks; sorted."""
    available, wanted = set(available), set(wanted)
    return sorted(available - wanted), sorted(wanted - available)


def _check_covered(available: Iterable[str], wanted: set[str], what: str) -> None:
    unknown, missing = uncovered(available, wanted)
    if unknown:
        raise KeyError(f"{what} has {len(unknown)} tensor(s) the InternVL3 mapping does not know, "
                       f"e.g. {unknown[:3]}")
    if missing:
        raise KeyError(f"{what} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")


def convert(rules: list[Rule], source: Mapping[str, Tensor], to_mm: bool,
            get: Callable[[str], Tensor] | None = None) -> dict[str, Tensor]:
    """Apply `rules` in either direction, checking that every source tensor is used exactly once."""
    get = get or source.__getitem__
    if to_mm:
        _check_covered(source.keys(), {k for r in rules for k in r.hf}, "the HF checkpoint")
        return {r.mm: r.op.merge([get(k) for k in r.hf]) for r in rules}
    _check_covered(source.keys(), {r.mm for r in rules}, "the MM state dict")
    out = {}
    for r in rules:
        out.update(zip(r.hf, r.op.split(get(r.mm))))
    return out


def pieces_from_parts(rule: Rule, sl, read: PartReader) -> list[Tensor]:
    """A rank's slice (`parallel.sharding.Slice`) of our tensor `rule.mm` as the pieces whose concatenation
    along `sl.dim` it is, each read range by range from the HF tensors it is made of: the whole tensor is
    never assembled, and a writer can store row pieces one after another without concatenating them."""
    pieces = [p for a, b in sl.spans for p in rule.op.read(read, rule.hf, sl.dim, a, b)]
    if sl.pad:
        pieces.append(sl.pad_block(pieces[0]))
    return pieces


def hf_to_mm(hf_state: Mapping[str, Tensor], spec: InternVLSpec, fmt: str) -> dict[str, Tensor]:
    """`hf_state` by on-disk or in-memory names (transformers' fused experts of a loaded model included)."""
    return convert(mapping_rules(spec, fmt), split_fused_experts(hf_state) if spec.text.moe else hf_state, to_mm=True)


def mm_to_hf(mm_state: Mapping[str, Tensor], spec: InternVLSpec, fmt: str) -> dict[str, Tensor]:
    return convert(mapping_rules(spec, fmt), mm_state, to_mm=False)
