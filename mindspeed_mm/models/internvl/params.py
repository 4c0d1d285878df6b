"""Every parameter of InternVLModel, as data: the one description the converter, the sharding and the HF
renames are views of.

A row says, for one parameter of ours (`{i}` standing for the layer index within its module): its shape
from the spec, how tensor parallelism splits it, which part of the model owns it (and so which pipeline
stage), its names in both HF formats, and how several HF tensors merge into it. TP kinds:
- `replicate`: norms, layer scales, the ViT's embeddings, biases added after a row-parallel linear;
- `rows` / `cols`: even split of dim 0 / dim 1 (column- / row-parallel linears);
- `glu`: the LLM's `linear_fc1` is `[gate; up]`, rank r gets `[gate_r; up_r]`;
- `vit_qkv`: the ViT's `[Q; K; V]` by uneven head counts (`head_partition`), rank r gets `[q_r; k_r; v_r]`;
  `vit_heads`: the ViT's `linear_proj` columns by the same head counts; `vit_head_rows`: rows by them (the LoRA
  B of one of the ViT's q, k, v);
- `vocab`: embedding and output rows, zero-padded to a multiple of TP (the model masks padded logits).
Merges: `copy` (one HF tensor), `concat` (row blocks stacked), `interleave` (the LLM's q, k, v stacked per
query group: `[q heads of group g; k_g; v_g]` for each g, what megatron's fused qkv expects).

The LLM's HF names are the same in both formats for every kind: the original format's `language_model` is the
LLM's own transformers class (Qwen2ForCausalLM, Qwen3ForCausalLM, InternLM3ForCausalLM), the native one's the
same modules under `language_model.model` / `lm_head`. InternLM3 (InternVL3-9B's LLM, internlm3-8b-instruct) has
Llama's separate `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` without biases, not InternLM2's
packed `attention.wqkv`: its remote code (`modeling_internlm3.py` of internlm/internlm3-8b-instruct, which
InternVL3-9B ships) defines `InternLM3Attention.q_proj/k_proj/v_proj/o_proj` and `InternLM3MLP.gate_proj/
up_proj/down_proj`; TensorRT-LLM's test of its InternLM3 (`test_internlm3_state_dict_keys`) loads that file's
state dict by exactly these names; vLLM and SGLang load `InternLM3ForCausalLM` checkpoints with their Llama
class, and transformers 5 maps `internlm3` to `LlamaForCausalLM`. Qwen3 adds the per-head `self_attn.q_norm` /
`k_norm` (size head_dim, replicated: every rank applies the one weight to its own heads). Tied embeddings
(`untie_embeddings_and_output_weights` false) have no output-layer row: the model's output layer is the
embedding, and a pipeline stage holding the head without the embedding keeps a copy of it as
`output_layer.weight` (`sharding.stage_name`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Optional

from mindspeed_mm.config.model_spec import InternVLSpec

VIT_EMBED, VIT_LAYER, PROJECTOR = "vit_embed", "vit_layer", "projector"
LLM_EMBED, LLM_LAYER, LLM_HEAD = "llm_embed", "llm_layer", "llm_head"
TP_KINDS = ("replicate", "rows", "cols", "glu", "vit_qkv", "vit_heads", "vit_head_rows", "vocab")
# the dim tensor parallelism cuts; replicated tensors: 0, where TP 1 cuts everything
TP_DIM = {"cols": 1, "vit_heads": 1}

Shape = Callable[[InternVLSpec], tuple]
EMBEDDING, OUTPUT_LAYER = "text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight"


def _always(spec: InternVLSpec) -> bool:
    return True


@dataclass(frozen=True)
class ParamDef:
    name: str
    owner: str
    tp: str
    shape: Shape
    native: tuple[str, ...]
    original: tuple[str, ...]
    merge: str = "copy"
    when: Callable[[InternVLSpec], bool] = _always
    adapter: bool = False  # a LoRA matrix: not in HF model checkpoints; native names are PEFT's
    # the layers that have the row (None: every layer of the owner): Qwen3-MoE's dense and sparse layers differ
    layers: Optional[Callable[[InternVLSpec], Iterable[int]]] = None
    # one tensor per expert (`{e}` in the names: the global expert index; megatron's local_experts count per EP rank)
    per_expert: bool = False
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.tp in TP_KINDS and self.merge in ("copy", "concat", "interleave"), self
        object.__setattr__(self, "pattern", template_regex(self.name))

    def hf(self, fmt: str) -> tuple[str, ...]:
        if fmt not in ("native", "original"):
            raise ValueError(f"unknown HF format {fmt!r} (expected 'native' or 'original')")
        return self.native if fmt == "native" else self.original


@dataclass(frozen=True)
class Param:
    """One row of the registry made concrete for a spec: a parameter of the full model."""
    name: str
    owner: str
    layer: Optional[int]
    tp: str
    shape: tuple[int, ...]
    native: tuple[str, ...]
    original: tuple[str, ...]
    merge: str
    adapter: bool = False
    expert: Optional[int] = None  # the global expert index of an expert's tensor

    def hf(self, fmt: str) -> tuple[str, ...]:
        return self.native if fmt == "native" else self.original


@lru_cache(maxsize=None)
def template_regex(template: str) -> re.Pattern:
    """A name template (`{i}`: a layer index, `{e}`: an expert's) as a regex with a group per index, in order."""
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)").replace(r"\{e\}", r"(\d+)") + "$")


def _norm_bias(spec: InternVLSpec) -> bool:
    return spec.vision.normalization == "LayerNorm"


def _vit_qkv_bias(spec: InternVLSpec) -> bool:
    return spec.vision.add_qkv_bias


def _vit_qk_norm(spec: InternVLSpec) -> bool:
    return spec.vision.qk_layernorm


def _llm_qkv_bias(spec: InternVLSpec) -> bool:
    return spec.text.add_qkv_bias


def _llm_qk_norm(spec: InternVLSpec) -> bool:
    return spec.text.qk_layernorm


def _untied(spec: InternVLSpec) -> bool:
    return not spec.text.tied


def _c(s: InternVLSpec) -> tuple:
    return (s.vision.hidden_size,)


def _llm_qkv_rows(s: InternVLSpec) -> int:
    t = s.text
    return (t.num_attention_heads + 2 * t.num_query_groups) * t.kv_channels


def _vit() -> list[ParamDef]:
    e, n, o = "image_encoder.encoder.embeddings.", "vision_tower.embeddings.", "vision_model.embeddings."
    out = [
        ParamDef(e + "class_embedding", VIT_EMBED, "replicate", lambda s: (1, 1, s.vision.hidden_size),
                 (n + "cls_token",), (o + "class_embedding",)),
        ParamDef(e + "position_embedding", VIT_EMBED, "replicate",
                 lambda s: (1, s.vision.num_patches + 1, s.vision.hidden_size),
                 (n + "position_embeddings",), (o + "position_embedding",)),
        ParamDef(e + "patch_embedding.weight", VIT_EMBED, "replicate",
                 lambda s: (s.vision.hidden_size, s.vision.num_channels, s.vision.patch_size, s.vision.patch_size),
                 (n + "patch_embeddings.projection.weight",), (o + "patch_embedding.weight",)),
        ParamDef(e + "patch_embedding.bias", VIT_EMBED, "replicate", _c,
                 (n + "patch_embeddings.projection.bias",), (o + "patch_embedding.bias",)),
    ]
    L, n, o = "image_encoder.encoder.encoder.layers.{i}.", "vision_tower.encoder.layer.{i}.", \
        "vision_model.encoder.layers.{i}."
    for p, when, shape in (("weight", _always, lambda s: (3 * s.vision.hidden_size, s.vision.hidden_size)),
                           ("bias", _vit_qkv_bias, lambda s: (3 * s.vision.hidden_size,))):
        out.append(ParamDef(L + f"self_attention.linear_qkv.{p}", VIT_LAYER, "vit_qkv", shape,
                            tuple(n + f"attention.{x}_proj.{p}" for x in "qkv"), (o + f"attn.qkv.{p}",),
                            "concat", when))
    out += [
        ParamDef(L + "self_attention.linear_proj.weight", VIT_LAYER, "vit_heads",
                 lambda s: (s.vision.hidden_size,) * 2,
                 (n + "attention.projection_layer.weight",), (o + "attn.proj.weight",)),
        ParamDef(L + "self_attention.linear_proj.bias", VIT_LAYER, "replicate", _c,
                 (n + "attention.projection_layer.bias",), (o + "attn.proj.bias",)),
    ]
    out += [ParamDef(L + f"self_attention.{x}_layernorm.weight", VIT_LAYER, "replicate", _c,
                     (n + f"attention.{x}_norm.weight",), (o + f"attn.{x}_norm.weight",), when=_vit_qk_norm)
            for x in "qk"]
    out += [ParamDef(L + f"ls{k}", VIT_LAYER, "replicate", _c, (n + f"lambda_{k}",), (o + f"ls{k}",))
            for k in (1, 2)]
    for ours, native, original in (("input_layernorm", "layernorm_before", "norm1"),
                                   ("pre_mlp_layernorm", "layernorm_after", "norm2")):
        out += [ParamDef(L + f"{ours}.{p}", VIT_LAYER, "replicate", _c, (n + f"{native}.{p}",),
                         (o + f"{original}.{p}",), when=when)
                for p, when in (("weight", _always), ("bias", _norm_bias))]
    out += [
        ParamDef(L + "mlp.linear_fc1.weight", VIT_LAYER, "rows",
                 lambda s: (s.vision.ffn_hidden_size, s.vision.hidden_size),
                 (n + "mlp.fc1.weight",), (o + "mlp.fc1.weight",)),
        ParamDef(L + "mlp.linear_fc1.bias", VIT_LAYER, "rows", lambda s: (s.vision.ffn_hidden_size,),
                 (n + "mlp.fc1.bias",), (o + "mlp.fc1.bias",)),
        ParamDef(L + "mlp.linear_fc2.weight", VIT_LAYER, "cols",
                 lambda s: (s.vision.hidden_size, s.vision.ffn_hidden_size),
                 (n + "mlp.fc2.weight",), (o + "mlp.fc2.weight",)),
        ParamDef(L + "mlp.linear_fc2.bias", VIT_LAYER, "replicate", _c, (n + "mlp.fc2.bias",), (o + "mlp.fc2.bias",)),
    ]
    return out


def _projector() -> list[ParamDef]:
    P, n = "image_encoder.projector.", "multi_modal_projector."
    pin = lambda s: (s.projector.input_size,)  # noqa: E731
    h = lambda s: (s.text.hidden_size,)  # noqa: E731
    return [
        ParamDef(P + "norm.weight", PROJECTOR, "replicate", pin, (n + "layer_norm.weight",), ("mlp1.0.weight",)),
        ParamDef(P + "norm.bias", PROJECTOR, "replicate", pin, (n + "layer_norm.bias",), ("mlp1.0.bias",)),
        ParamDef(P + "linear_fc1.weight", PROJECTOR, "rows", lambda s: (s.text.hidden_size, s.projector.input_size),
                 (n + "linear_1.weight",), ("mlp1.1.weight",)),
        ParamDef(P + "linear_fc1.bias", PROJECTOR, "rows", h, (n + "linear_1.bias",), ("mlp1.1.bias",)),
        ParamDef(P + "linear_fc2.weight", PROJECTOR, "cols", lambda s: (s.text.hidden_size,) * 2,
                 (n + "linear_2.weight",), ("mlp1.3.weight",)),
        ParamDef(P + "linear_fc2.bias", PROJECTOR, "replicate", h, (n + "linear_2.bias",), ("mlp1.3.bias",)),
    ]


def _dense_layers(s: InternVLSpec) -> list[int]:
    return [i for i in range(s.text.num_layers) if not s.text.is_moe_layer(i)]


def _moe_layers(s: InternVLSpec) -> tuple[int, ...]:
    return s.text.moe_layers


def _moe(s: InternVLSpec) -> bool:
    return s.text.moe


def _llm() -> list[ParamDef]:
    def same(ours, owner, tp, shape, *hf, merge="copy", when=_always, **kw):
        return ParamDef(ours, owner, tp, shape, hf, hf, merge, when, **kw)

    h = lambda s: (s.text.hidden_size,)  # noqa: E731
    vocab = lambda s: (s.text.vocab_size, s.text.hidden_size)  # noqa: E731
    L, hf = "text_decoder.decoder.layers.{i}.", "language_model.model.layers.{i}."
    return [
        same(EMBEDDING, LLM_EMBED, "vocab", vocab,
             "language_model.model.embed_tokens.weight"),
        same(L + "self_attention.linear_qkv.weight", LLM_LAYER, "rows",
             lambda s: (_llm_qkv_rows(s), s.text.hidden_size),
             *(hf + f"self_attn.{x}_proj.weight" for x in "qkv"), merge="interleave"),
        same(L + "self_attention.linear_qkv.bias", LLM_LAYER, "rows", lambda s: (_llm_qkv_rows(s),),
             *(hf + f"self_attn.{x}_proj.bias" for x in "qkv"), merge="interleave", when=_llm_qkv_bias),
        same(L + "self_attention.linear_proj.weight", LLM_LAYER, "cols",
             lambda s: (s.text.hidden_size, s.text.num_attention_heads * s.text.kv_channels),
             hf + "self_attn.o_proj.weight"),
        *(same(L + f"self_attention.{x}_layernorm.weight", LLM_LAYER, "replicate", lambda s: (s.text.kv_channels,),
               hf + f"self_attn.{x}_norm.weight", when=_llm_qk_norm) for x in "qk"),
        same(L + "input_layernorm.weight", LLM_LAYER, "replicate", h, hf + "input_layernorm.weight"),
        same(L + "pre_mlp_layernorm.weight", LLM_LAYER, "replicate", h, hf + "post_attention_layernorm.weight"),
        same(L + "mlp.linear_fc1.weight", LLM_LAYER, "glu", lambda s: (2 * s.text.ffn_hidden_size, s.text.hidden_size),
             hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight", merge="concat", layers=_dense_layers),
        same(L + "mlp.linear_fc2.weight", LLM_LAYER, "cols", lambda s: (s.text.hidden_size, s.text.ffn_hidden_size),
             hf + "mlp.down_proj.weight", layers=_dense_layers),
        # Qwen3-MoE's sparse layers: the router (HF's `gate`) and each expert's SwiGLU, megatron's SequentialMLP
        same(L + "mlp.router.weight", LLM_LAYER, "replicate", lambda s: (s.text.num_experts, s.text.hidden_size),
             hf + "mlp.gate.weight", when=_moe, layers=_moe_layers),
        same(L + "mlp.experts.local_experts.{e}.linear_fc1.weight", LLM_LAYER, "glu",
             lambda s: (2 * s.text.moe_ffn_hidden_size, s.text.hidden_size),
             hf + "mlp.experts.{e}.gate_proj.weight", hf + "mlp.experts.{e}.up_proj.weight", merge="concat",
             when=_moe, layers=_moe_layers, per_expert=True),
        same(L + "mlp.experts.local_experts.{e}.linear_fc2.weight", LLM_LAYER, "cols",
             lambda s: (s.text.hidden_size, s.text.moe_ffn_hidden_size),
             hf + "mlp.experts.{e}.down_proj.weight", when=_moe, layers=_moe_layers, per_expert=True),
        same("text_decoder.decoder.final_layernorm.weight", LLM_HEAD, "replicate", h, "language_model.model.norm.weight"),
        same(OUTPUT_LAYER, LLM_HEAD, "vocab", vocab, "language_model.lm_head.weight",
             when=_untied),
    ]


# ---------------------------------------------------------------------------------------------------- LoRA
# One adapter pair per adapted HF linear (transformers' native names, as PEFT names them): for a column-parallel
# linear A whole and B split like its part's rows; for a row-parallel one A split like the weight's columns and B
# whole. Our fused linears (the qkv, the LLM's gate/up) hold one pair per part: `lora_a_q`, `lora_b_q`, ...
# Which part sits where in the fused rows is `models/lora.py`'s business; the registry names and cuts each.
LORA_BASE = {"vision": "image_encoder.encoder.encoder.layers.{i}.", "text": "text_decoder.decoder.layers.{i}."}
# part -> (our linear, the suffix of its adapters' names, the HF module of the part), per module
LORA_LINEARS = {
    "vision": {"q_proj": ("self_attention.linear_qkv", "_q", "attention.q_proj"),
               "k_proj": ("self_attention.linear_qkv", "_k", "attention.k_proj"),
               "v_proj": ("self_attention.linear_qkv", "_v", "attention.v_proj"),
               "projection_layer": ("self_attention.linear_proj", "", "attention.projection_layer"),
               "fc1": ("mlp.linear_fc1", "", "mlp.fc1"), "fc2": ("mlp.linear_fc2", "", "mlp.fc2")},
    "text": {"q_proj": ("self_attention.linear_qkv", "_q", "self_attn.q_proj"),
             "k_proj": ("self_attention.linear_qkv", "_k", "self_attn.k_proj"),
             "v_proj": ("self_attention.linear_qkv", "_v", "self_attn.v_proj"),
             "o_proj": ("self_attention.linear_proj", "", "self_attn.o_proj"),
             "gate_proj": ("mlp.linear_fc1", "_gate", "mlp.gate_proj"),
             "up_proj": ("mlp.linear_fc1", "_up", "mlp.up_proj"),
             "down_proj": ("mlp.linear_fc2", "", "mlp.down_proj")},
}
_LORA_HF = {"vision": "vision_tower.encoder.layer.{i}.", "text": "language_model.model.layers.{i}."}


def _lora_sizes(module: str, part: str, s: InternVLSpec) -> tuple[int, int]:
    """(out, in) of the HF linear `part` of `module`."""
    if module == "vision":
        h, f = s.vision.hidden_size, s.vision.ffn_hidden_size
        return {"fc1": (f, h), "fc2": (h, f)}.get(part, (h, h))
    t = s.text
    q, kv, h, f = t.num_attention_heads * t.kv_channels, t.num_query_groups * t.kv_channels, t.hidden_size, \
        t.ffn_hidden_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (f, h),
            "up_proj": (f, h), "down_proj": (h, f)}[part]


def _lora() -> list[ParamDef]:
    out = []
    for module, linears in LORA_LINEARS.items():
        owner = VIT_LAYER if module == "vision" else LLM_LAYER
        for part, (linear, suffix, hf) in linears.items():
            row_parallel = linear.endswith(("linear_proj", "linear_fc2"))
            if row_parallel:
                a_kind, b_kind = ("vit_heads" if part == "projection_layer" else "cols"), "replicate"
            else:
                a_kind, b_kind = "replicate", ("vit_head_rows" if module == "vision" and suffix else "rows")

            def when(s, module=module, part=part):
                lora = getattr(s, module).lora
                return lora is not None and part in lora.target_modules

            def a_shape(s, module=module, part=part):
                return (getattr(s, module).lora.rank, _lora_sizes(module, part, s)[1])

            def b_shape(s, module=module, part=part):
                return (_lora_sizes(module, part, s)[0], getattr(s, module).lora.rank)

            for ab, kind, shape in (("a", a_kind, a_shape), ("b", b_kind, b_shape)):
                native = (_LORA_HF[module] + f"{hf}.lora_{ab.upper()}.weight",)
                out.append(ParamDef(f"{LORA_BASE[module]}{linear}.lora_{ab}{suffix}", owner, kind, shape, native,
                                    (), when=when, adapter=True))
    return out


REGISTRY: tuple[ParamDef, ...] = (*_vit(), *_projector(), *_llm())
LORA_REGISTRY: tuple[ParamDef, ...] = tuple(_lora())
LAYER_OWNERS = {VIT_LAYER: "vision", LLM_LAYER: "text"}  # owner -> the spec section whose num_layers counts them


def params(spec: InternVLSpec, adapters: bool = False) -> list[Param]:
    """Every parameter of the full model for `spec`, in the registry's order, layer by layer; `adapters`: with
    the LoRA matrices its spec asks for (they follow their layer's weights)."""
    out = []
    for d in REGISTRY + (LORA_REGISTRY if adapters else ()):
        if not d.when(spec):
            continue
        shape = tuple(d.shape(spec))
        if d.layers is not None:
            layers: list = list(d.layers(spec))
        elif d.owner in LAYER_OWNERS:
            layers = list(range(getattr(spec, LAYER_OWNERS[d.owner]).num_layers))
        else:
            layers = [None]
        for i in layers:
            for e in range(spec.text.num_experts) if d.per_expert else [None]:
                def fill(t, i=i, e=e):
                    t = t if i is None else t.replace("{i}", str(i))
                    return t if e is None else t.replace("{e}", str(e))
                out.append(Param(fill(d.name), d.owner, i, d.tp, shape, tuple(map(fill, d.native)),
                                 tuple(map(fill, d.original)), d.merge, d.adapter, e))
    order = {VIT_EMBED: 0, VIT_LAYER: 1, PROJECTOR: 2, LLM_EMBED: 3, LLM_LAYER: 4, LLM_HEAD: 5}
    return sorted(out, key=lambda p: (order[p.owner], -1 if p.layer is None else p.layer, p.adapter))


def expert_index(name: str) -> Optional[int]:
    """The expert index in an expert tensor's name (global in full-model names, local in a chunk's), else None."""
    d, _ = lookup(name)
    return int(d.pattern.match(name).group(2)) if d.per_expert else None


def with_expert(template: str, expert: Optional[int]) -> str:
    return template if expert is None else template.replace("{e}", str(expert))


def param_shapes(spec: InternVLSpec) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every parameter of ours, from the spec alone."""
    return {p.name: p.shape for p in params(spec)}


@lru_cache(maxsize=None)
def lookup(name: str) -> tuple[ParamDef, Optional[int]]:
    """The registry row of one of our parameter names (global or stage-local) and its layer index."""
    for d in REGISTRY + LORA_REGISTRY:
        m = d.pattern.match(name)
        if m:
            return d, int(m.group(1)) if m.groups() else None
    raise KeyError(f"{name}: not a parameter of the InternVL3 model")


def tp_kind(name: str) -> str:
    return lookup(name)[0].tp


def is_adapter(name: str) -> bool:
    return lookup(name)[0].adapter


def trainable(spec: InternVLSpec, name: str) -> bool:
    """Whether parameter `name` (global) trains under `spec`: the LoRA matrices always; a module's own weights
    unless it is frozen, then the ViT's last `unfreeze_last_layers` layers and, with `unfreeze_output_layer`,
    the LLM's output layer (the token embeddings when tied) still do. The one rule the model applies."""
    d, layer = lookup(name)
    if d.adapter:
        return True
    if d.owner in (VIT_EMBED, VIT_LAYER):
        v = spec.vision
        return not v.frozen or d.owner == VIT_LAYER and layer >= v.num_layers - v.unfreeze_last_layers
    if d.owner == PROJECTOR:
        return not spec.projector.frozen
    t = spec.text
    head = OUTPUT_LAYER if not t.tied else EMBEDDING
    return not t.frozen or t.unfreeze_output_layer and name == head


def with_layer(template: str, layer: Optional[int]) -> str:
    return template if layer is None else template.replace("{i}", str(layer))
