"""HuggingFace InternVL3 parameters (either format) <-> ours, unsharded.

One rule per parameter of ours: which HF tensors it is made of and how they merge. The rules are data, so
the converter can stream them tensor by tensor and the tests can invert them. Merges Megatron needs:
- LLM `linear_qkv`: rows interleaved per query group, `[q heads of group g; k_g; v_g]` for each g;
- LLM `linear_fc1`: `[gate; up]`;
- ViT `linear_qkv`: `[Q; K; V]` (the original format already stores it so; native has three tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from mindspeed_mm.checkpoint.hf_formats import native_key_to_original
from mindspeed_mm.config.model_spec import InternVLSpec

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any

VIT = "image_encoder.encoder"

# read(name, dim, start, end): the index range [start, end) along dim of one HF tensor, read from disk.
PartReader = Callable[[str, int, int, int], Tensor]
LLM = "text_decoder"


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


def _norm_params(normalization: str) -> tuple[str, ...]:
    return ("weight", "bias") if normalization == "LayerNorm" else ("weight",)


def native_rules(spec: InternVLSpec) -> list[Rule]:
    """Rules against the transformers-native on-disk names."""
    v, t = spec.vision, spec.text
    rules = [
        Rule(f"{VIT}.embeddings.class_embedding", ("vision_tower.embeddings.cls_token",)),
        Rule(f"{VIT}.embeddings.position_embedding", ("vision_tower.embeddings.position_embeddings",)),
    ]
    rules += [Rule(f"{VIT}.embeddings.patch_embedding.{p}", (f"vision_tower.embeddings.patch_embeddings.projection.{p}",))
              for p in ("weight", "bias")]
    vit_norm = _norm_params(v.normalization)
    for i in range(v.num_layers):
        ours, hf = f"{VIT}.encoder.layers.{i}", f"vision_tower.encoder.layer.{i}"
        qkv_params = ("weight", "bias") if v.add_qkv_bias else ("weight",)
        rules += [Rule(f"{ours}.self_attention.linear_qkv.{p}",
                       tuple(f"{hf}.attention.{x}_proj.{p}" for x in "qkv"), Concat((v.hidden_size,) * 3))
                  for p in qkv_params]
        rules += [Rule(f"{ours}.self_attention.linear_proj.{p}", (f"{hf}.attention.projection_layer.{p}",))
                  for p in ("weight", "bias")]
        if v.qk_layernorm:
            rules += [Rule(f"{ours}.self_attention.{x}_layernorm.weight", (f"{hf}.attention.{x}_norm.weight",))
                      for x in "qk"]
        rules += [Rule(f"{ours}.ls1", (f"{hf}.lambda_1",)), Rule(f"{ours}.ls2", (f"{hf}.lambda_2",))]
        rules += [Rule(f"{ours}.input_layernorm.{p}", (f"{hf}.layernorm_before.{p}",)) for p in vit_norm]
        rules += [Rule(f"{ours}.pre_mlp_layernorm.{p}", (f"{hf}.layernorm_after.{p}",)) for p in vit_norm]
        rules += [Rule(f"{ours}.mlp.linear_{fc}.{p}", (f"{hf}.mlp.{fc}.{p}",))
                  for fc in ("fc1", "fc2") for p in ("weight", "bias")]
    for ours, hf in (("norm", "layer_norm"), ("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
        rules += [Rule(f"image_encoder.projector.{ours}.{p}", (f"multi_modal_projector.{hf}.{p}",))
                  for p in ("weight", "bias")]

    d = t.kv_channels
    qkv = GroupInterleave(t.num_query_groups, t.num_attention_heads // t.num_query_groups, d)
    rules.append(Rule(f"{LLM}.embedding.word_embeddings.weight", ("language_model.model.embed_tokens.weight",)))
    for i in range(t.num_layers):
        ours, hf = f"{LLM}.decoder.layers.{i}", f"language_model.model.layers.{i}"
        qkv_params = ("weight", "bias") if t.add_qkv_bias else ("weight",)
        rules += [Rule(f"{ours}.self_attention.linear_qkv.{p}", tuple(f"{hf}.self_attn.{x}_proj.{p}" for x in "qkv"), qkv)
                  for p in qkv_params]
        rules += [
            Rule(f"{ours}.self_attention.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",)),
            Rule(f"{ours}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",)),
            Rule(f"{ours}.pre_mlp_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",)),
            Rule(f"{ours}.mlp.linear_fc1.weight", (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
                 Concat((t.ffn_hidden_size,) * 2)),
            Rule(f"{ours}.mlp.linear_fc2.weight", (f"{hf}.mlp.down_proj.weight",)),
        ]
    rules += [Rule(f"{LLM}.decoder.final_layernorm.weight", ("language_model.model.norm.weight",)),
              Rule(f"{LLM}.output_layer.weight", ("language_model.lm_head.weight",))]
    return rules


def mapping_rules(spec: InternVLSpec, fmt: str) -> list[Rule]:
    """Rules for `fmt` in {"native", "original"}: the original format differs only in names, and in
    storing the ViT's q, k and v as one `attn.qkv` tensor, which is already our layout."""
    rules = native_rules(spec)
    if fmt == "native":
        return rules
    if fmt != "original":
        raise ValueError(f"unknown HF format {fmt!r} (expected 'native' or 'original')")
    out = []
    for r in rules:
        if r.mm.startswith(VIT) and ".linear_qkv." in r.mm:
            layer, param = r.mm.split(".")[4], r.mm.rsplit(".", 1)[1]
            out.append(Rule(r.mm, (f"vision_model.encoder.layers.{layer}.attn.qkv.{param}",)))
        else:
            out.append(Rule(r.mm, tuple(native_key_to_original(k) for k in r.hf), r.op))
    return out


def _check_covered(available: Iterable[str], wanted: set[str], what: str) -> None:
    available = set(available)
    unknown = sorted(available - wanted)
    if unknown:
        raise KeyError(f"{what} has {len(unknown)} tensor(s) the InternVL3 mapping does not know, "
                       f"e.g. {unknown[:3]}")
    missing = sorted(wanted - available)
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
    return convert(mapping_rules(spec, fmt), hf_state, to_mm=True)


def mm_to_hf(mm_state: Mapping[str, Tensor], spec: InternVLSpec, fmt: str) -> dict[str, Tensor]:
    return convert(mapping_rules(spec, fmt), mm_state, to_mm=False)
