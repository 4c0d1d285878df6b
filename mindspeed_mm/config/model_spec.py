"""Typed InternVL3 model spec: the ``model_*.json`` a user hands us, parsed and validated.

The JSON schema is the reference one (MindSpeed-MM's ``examples/internvl3/model_8B.json``)::

    {
      "model_id": "InternVL3", "img_context_token_id": 151667,
      "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2",
      "text_decoder": {...},                                  -> TextDecoderSpec
      "image_encoder": {"vision_encoder": {...},              -> VisionEncoderSpec
                        "vision_projector": {...}}            -> ProjectorSpec
    }

Rules, applied the same way whether a spec comes from JSON, from an HF ``config.json`` or from Python:

* every value is type-checked (``bool`` is not an ``int``; an ``int`` is accepted where a float is wanted);
* a key nobody knows is an error naming its path (``text_decoder.num_layer``);
* keys the reference files carry but that have no effect (``img_embedding_idx``, ``pre_tockens``, ...) are
  accepted and reported in ONE logged warning per load, never dropped silently; those that would change
  behaviour if they held another value (dropouts, ``reset_attention_mask``) must hold the harmless value;
* keys that duplicate another one (``num_key_value_heads`` vs ``num_query_groups``, ``bf16`` vs
  ``params_dtype``, the ViT's copy of ``downsample_ratio``) must agree with it;
* size inconsistencies are errors. Every error is a :class:`ModelSpecError` (the one
  :class:`~mindspeed_mm.config.validate.ConfigError` of every config file) whose message starts with the key
  path and quotes the bad value.

``num_layers`` is always the module's GLOBAL layer count; ``pipeline_num_layers`` says how the layers are
spread over pipeline stages (``[pp]``, or ``[vpp][pp]`` under virtual pipelining) and must sum to it.

Architecture and run settings. A field declared with ``_run(...)`` is a run setting: it says how a run trains,
lays out or computes the model, not what the model is, so a checkpoint written under one value loads under any
other (:data:`RUN_SETTINGS` lists them; :func:`architecture_differences` compares the rest). They are

* training only: ``freeze``, ``recompute_granularity``/``recompute_method``/``recompute_num_layers``,
  ``drop_path_rate`` (stochastic depth, the identity in eval), ``init_method_std`` and ``initializer_factor``
  (initial values; loaded weights replace them), the experts' ``moe_aux_loss_coeff`` and ``moe_z_loss_coeff``;
* layout and parallelism: ``pipeline_num_layers``, the ViT's ``sequence_parallel`` and
  ``context_parallel_size``, ``variable_seq_lengths``, ``pre_process``/``post_process``;
* precision: ``params_dtype`` (the same weights in another dtype; inference names its own ``dtype``);
* context length: ``max_position_embeddings`` and ``rope_scaling`` (RoPE has no weights, and the maths is
  plain RoPE up to ``max_position_embeddings`` positions).

Everything else, ``attention_softmax_in_fp32`` included (it changes what the forward computes), is the
architecture.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from mindspeed_mm.config.validate import ConfigError, Section, check_fields, check_value, describe, join, read_json


logger = logging.getLogger(__name__)

__all__ = [
    "ModelSpecError",
    "RUN_SETTINGS",
    "RopeScaling",
    "VisionEncoderSpec",
    "ProjectorSpec",
    "TextDecoderSpec",
    "InternVLSpec",
    "architecture_differences",
    "load_model_spec",
    "spec_from_dict",
    "to_dict",
    "to_json",
    "dump_model_spec",
    "DEFAULT_IMG_CONTEXT_TOKEN_ID",
    "IMG_CONTEXT_TOKEN",
    "IGNORE_INDEX",
    "PARAMS_DTYPES",
    "PARAMS_DTYPE_NAMES",
    "LLM_KINDS",
    "LoraSpec",
    "LORA_PARTS",
    "lora_spec",
]

DEFAULT_IMG_CONTEXT_TOKEN_ID = 151667  # <IMG_CONTEXT> in the Qwen2.5-based InternVL3 tokenizers
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IGNORE_INDEX = -100  # label of a position that is not a target (the data marks them, the loss skips them)
# params_dtype -> the tensor dtype's name (torch.<name>; a checkpoint's dtype name)
PARAMS_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PARAMS_DTYPES = tuple(PARAMS_DTYPE_NAMES)
# text_decoder.model_id -> the LLM kind: the reference's names for Qwen2 ("internllm" in its training JSONs,
# "Qwen2.5llm" in its inference JSON), and ours for the other kinds
LLM_KINDS = {"internllm": "qwen2", "Qwen2.5llm": "qwen2", "qwen3": "qwen3", "internlm3": "internlm3",
             "qwen3_moe": "qwen3_moe"}
# the mixture-of-experts fields of text_decoder: set for a qwen3_moe LLM, absent (null) for the dense kinds
MOE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size")

# Pipeline layout as stored: (n_stage0, n_stage1, ...) or ((vp0 stages...), (vp1 stages...), ...).
PipelineNumLayers = Optional[Tuple[Any, ...]]

_VISION_PATH = "image_encoder.vision_encoder"
_PROJECTOR_PATH = "image_encoder.vision_projector"
_TEXT_PATH = "text_decoder"


ModelSpecError = ConfigError  # the name this module's callers and users know


def _run(default: Any) -> Any:
    """A run setting (see the module docstring): how a run trains, lays out or computes the model, not what it is."""
    return dataclasses.field(default=default, metadata={"run": True})


# --------------------------------------------------------------------------------------------------
# Shared checks of the spec dataclasses
# --------------------------------------------------------------------------------------------------

def _check_pipeline(path: str, value: Any, num_layers: int) -> Optional[Tuple[Any, ...]]:
    """Validate ``pipeline_num_layers`` ([pp] or [vpp][pp] non-negative ints summing to num_layers)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ModelSpecError(path, f"expected a non-empty list of ints (or of lists of ints), got {value!r}")
    if all(isinstance(v, (list, tuple)) for v in value):
        lengths = {len(v) for v in value}
        if len(lengths) != 1 or min(lengths) < 2:
            raise ModelSpecError(path, "a virtual-pipeline layout must be [vpp][pp] lists of equal length with "
                                 f"pp >= 2, got {value!r}")
        rows = tuple(tuple(check_value(f"{path}[{i}][{j}]", int, n, minimum=0) for j, n in enumerate(row))
                     for i, row in enumerate(value))
        total = sum(sum(r) for r in rows)
        result: Tuple[Any, ...] = rows
    else:
        result = tuple(check_value(f"{path}[{i}]", int, n, minimum=0) for i, n in enumerate(value))
        total = sum(result)
    if total != num_layers:
        raise ModelSpecError(path, f"{list(_plain(result))} sums to {total}, but num_layers is {num_layers}")
    return result


def pipeline_shape(layout: Optional[Tuple[Any, ...]]) -> Optional[Tuple[int, Optional[int]]]:
    """(pp, vpp) of a stored pipeline layout; vpp is None for a flat list."""
    if layout is None:
        return None
    if layout and isinstance(layout[0], tuple):
        return len(layout[0]), len(layout)
    return len(layout), None


def _plain(value: Any) -> Any:
    """Tuples -> lists, dataclasses -> dicts, recursively (for JSON)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


class _SpecBase:
    """Type-checks and normalises every annotated field in ``__post_init__``."""

    _PATH = ""
    _CHOICES: Dict[str, Tuple[Any, ...]] = {}

    def _check_fields(self) -> None:
        # pipeline_num_layers is checked by the subclass once num_layers is known
        check_fields(self, self._PATH, self._CHOICES, skip=("pipeline_num_layers",))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _err(self, name: str, message: str) -> ModelSpecError:
        return ModelSpecError(join(self._PATH, name), message)

    def _positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise self._err(n, f"must be > 0, got {v!r}")

    def _check_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers  # type: ignore
        if g is None:
            if m is not None or n is not None:
                raise self._err("recompute_granularity",
                                f"is null but recompute_method={m!r} / recompute_num_layers={n!r} are set")
            return
        if g == "full":
            if m is None:
                raise self._err("recompute_method", 'must be "uniform" or "block" with recompute_granularity "full"')
            if n is None or n < 1:
                raise self._err("recompute_num_layers",
                                f'must be an int >= 1 with recompute_granularity "full", got {n!r}')
        elif n is not None:
            raise self._err("recompute_num_layers", f'must be null with recompute_granularity "selective", got {n!r}')


_RECOMPUTE_CHOICES = {
    "recompute_granularity": ("full", "selective"),
    "recompute_method": ("uniform", "block"),
}


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------

# The linears a LoRA may adapt, per module, by their names in transformers' native InternVL (one adapter pair
# per HF linear, as PEFT has them; our fused qkv and gate/up linears hold one pair per part).
LORA_PARTS = {
    "vision": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),
    "text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _target_names() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """Every name a user may give in ``target_modules`` -> the parts it means: ours (megatron's), InternVL's own
    (its PEFT target lists) and transformers' native names, with or without their parent module."""
    qkv = ("q_proj", "k_proj", "v_proj")
    vision = {"linear_qkv": qkv, "attn.qkv": qkv, "qkv": qkv, "linear_proj": ("projection_layer",),
              "attn.proj": ("projection_layer",), "proj": ("projection_layer",),
              "linear_fc1": ("fc1",), "linear_fc2": ("fc2",)}
    for part in LORA_PARTS["vision"]:
        parent = "mlp" if part.startswith("fc") else "attention"
        vision[part] = vision[f"{parent}.{part}"] = (part,)
    text = {"linear_qkv": qkv, "linear_proj": ("o_proj",), "linear_fc1": ("gate_proj", "up_proj"),
            "linear_fc2": ("down_proj",)}
    for part in LORA_PARTS["text"]:
        parent = "mlp" if part in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        text[part] = text[f"{parent}.{part}"] = (part,)
    return {"vision": vision, "text": text}


LORA_TARGET_NAMES = _target_names()


@dataclass(frozen=True)
class LoraSpec:
    """A module's LoRA (``image_encoder.vision_encoder.lora`` / ``text_decoder.lora``): each adapted linear W
    computes ``W x + (alpha / rank) * B A dropout(x)``, A of rank x in, B of out x rank. ``target_modules``
    holds the adapted parts in :data:`LORA_PARTS` order (transformers' native names); build it with
    :func:`lora_spec`, which also reads InternVL's and our names."""

    rank: int
    alpha: float
    dropout: float
    target_modules: Tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_spec(module: str, raw: Any, path: str) -> Optional[LoraSpec]:
    """``raw`` (a JSON object: rank, alpha = 2 x rank, dropout = 0.05, target_modules = every part; or a
    LoraSpec, checked and normalised the same way) checked for ``module`` ("vision" or "text"); rank 0 is no
    LoRA."""
    if raw is None:
        return None
    if isinstance(raw, LoraSpec):
        raw = {**dataclasses.asdict(raw), "target_modules": list(raw.target_modules)}
    s = Section(raw, path, known=("rank", "alpha", "dropout", "target_modules"))
    rank = s.get("rank", int, minimum=0)
    if rank == 0:
        return None
    alpha = s.get("alpha", float, None, nullable=True)
    alpha = 2.0 * rank if alpha is None else alpha
    if alpha <= 0:
        raise ModelSpecError(s.key("alpha"), f"must be > 0, got {alpha!r}")
    dropout = s.get("dropout", float, 0.05)
    if not 0.0 <= dropout < 1.0:
        raise ModelSpecError(s.key("dropout"), f"must be in [0, 1), got {dropout!r}")
    names = LORA_TARGET_NAMES[module]
    given = s.get("target_modules", list, None, nullable=True)
    parts: set = set()
    for i, name in enumerate(given if given is not None else LORA_PARTS[module]):
        if name not in names:
            raise ModelSpecError(f"{s.key('target_modules')}[{i}]", f"{name!r} is not a linear of this module; "
                                 f"known: {', '.join(sorted(names))}")
        parts.update(names[name])
    if not parts:
        raise ModelSpecError(s.key("target_modules"), "is empty (omit lora, or set rank 0, for no LoRA)")
    return LoraSpec(rank, alpha, dropout, tuple(p for p in LORA_PARTS[module] if p in parts))


# --------------------------------------------------------------------------------------------------
# The spec dataclasses
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionEncoderSpec(_SpecBase):
    """InternViT (``image_encoder.vision_encoder``).

    ``qk_layernorm`` is InternViT-6B's norm of Q and K over the FULL embedding (all heads together), of
    type ``normalization``; ``initializer_factor`` is the initial value of the layer-scale vectors
    ``ls1``/``ls2``. ``downsample_ratio``/``select_layer``/``ps_version`` duplicate the top-level keys:
    left null they are filled from there, given they must agree with them.
    ``sequence_parallel`` null follows the run's setting; false keeps the ViT out of SP (78B).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    model_id: str = "InternViT"
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    add_qkv_bias: bool = True
    qk_layernorm: bool = False
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-6
    activation_func: str = "gelu"
    drop_path_rate: float = _run(0.0)
    initializer_factor: float = _run(1.0)
    init_method_std: float = _run(0.02)
    post_layer_norm: bool = False
    downsample_ratio: Optional[float] = None
    select_layer: Optional[int] = None
    ps_version: Optional[str] = None
    freeze: Optional[bool] = _run(None)
    lora: Optional[LoraSpec] = _run(None)
    unfreeze_last_layers: int = _run(0)
    params_dtype: str = _run("fp32")
    pipeline_num_layers: PipelineNumLayers = _run(None)
    recompute_granularity: Optional[str] = _run(None)
    recompute_method: Optional[str] = _run(None)
    recompute_num_layers: Optional[int] = _run(None)
    sequence_parallel: Optional[bool] = _run(None)
    context_parallel_size: int = _run(1)

    _PATH = _VISION_PATH
    _CHOICES = {
        "model_id": ("InternViT",),
        "normalization": ("LayerNorm", "RMSNorm"),
        "activation_func": ("gelu",),
        "post_layer_norm": (False,),
        "select_layer": (-1,),
        "ps_version": ("v2",),
        "params_dtype": PARAMS_DTYPES,
        "context_parallel_size": (1,),
        **_RECOMPUTE_CHOICES,
    }

    def __post_init__(self) -> None:
        self._set("lora", lora_spec("vision", self.lora, join(self._PATH, "lora")))
        self._check_fields()
        self._positive("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_size",
                       "image_size", "num_channels", "layernorm_epsilon", "downsample_ratio")
        if self.hidden_size % self.num_attention_heads:
            raise self._err("num_attention_heads", f"{self.num_attention_heads} does not divide "
                            f"hidden_size {self.hidden_size}")
        if self.image_size % self.patch_size:
            raise self._err("image_size", f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise self._err("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate!r}")
        self._set("pipeline_num_layers", _check_pipeline(
            join(self._PATH, "pipeline_num_layers"), self.pipeline_num_layers, self.num_layers))
        self._check_recompute()
        if not 0 <= self.unfreeze_last_layers <= self.num_layers:
            raise self._err("unfreeze_last_layers", f"must be in [0, num_layers={self.num_layers}], got "
                            f"{self.unfreeze_last_layers!r}")

    @property
    def frozen(self) -> bool:
        """Whether the ViT's own weights are frozen: ``freeze`` when given, else frozen (the reference's
        default; with LoRA: only the adapters train)."""
        return True if self.freeze is None else self.freeze

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile (without the CLS token)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ProjectorSpec(_SpecBase):
    """InternVLMLP (``image_encoder.vision_projector``): LayerNorm(4C) -> Linear -> GELU -> Linear.

    ``vit_hidden_size``/``llm_hidden_size``/``downsample_ratio`` left null are filled from the other modules;
    given, they must agree with them. ``layernorm_epsilon`` is the eps of the input LayerNorm (1e-5 in
    InternVL3).
    """

    model_id: str = "InternVLMLP"
    downsample_ratio: Optional[float] = None
    vit_hidden_size: Optional[int] = None
    llm_hidden_size: Optional[int] = None
    freeze: Optional[bool] = _run(None)
    activation_func: str = "gelu"
    layernorm_epsilon: float = 1e-5

    _PATH = _PROJECTOR_PATH
    _CHOICES = {"model_id": ("InternVLMLP",), "activation_func": ("gelu",)}

    def __post_init__(self) -> None:
        self._check_fields()
        self._positive("downsample_ratio", "vit_hidden_size", "llm_hidden_size", "layernorm_epsilon")

    @property
    def frozen(self) -> bool:
        """Whether the projector is frozen: ``freeze`` when given, else trainable (the reference's default)."""
        return bool(self.freeze)

    @property
    def input_size(self) -> int:
        """Width of the projector input: the ViT width times the pixel-shuffle factor (1/r)^2."""
        assert self.vit_hidden_size is not None and self.downsample_ratio is not None
        return int(round(self.vit_hidden_size / self.downsample_ratio ** 2))


_ROPE_SCALING_PATH = join(_TEXT_PATH, "rope_scaling")


def _check_rope_type(value: Any) -> str:
    """Checked before the section's keys, so that another type's own keys (yarn's, llama3's, ...) are not what
    the error names: the type is what we lack."""
    key = f"{_ROPE_SCALING_PATH}.type"
    value = check_value(key, str, value)
    if value != "dynamic":
        raise ModelSpecError(key, f"{value!r} is not implemented; only \"dynamic\" (dynamic NTK) is")
    return value


@dataclass(frozen=True)
class RopeScaling:
    """``text_decoder.rope_scaling``: dynamic-NTK RoPE, applied as transformers' Qwen2 applies it
    (:mod:`mindspeed_mm.models.internvl.rope`). A forward over L > ``max_position_embeddings`` positions
    rotates with base * (factor*L/max_pos - (factor-1))^(d/(d-2)), d the rotary dimension; shorter ones run
    plain RoPE. Any other type is an error, never ignored."""

    type: str
    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _check_rope_type(self.type))
        object.__setattr__(self, "factor", check_value(f"{_ROPE_SCALING_PATH}.factor", float, self.factor,
                                                       minimum=1.0))


@dataclass(frozen=True)
class TextDecoderSpec(_SpecBase):
    """The LLM (``text_decoder``). ``model_id`` says which kind (:data:`LLM_KINDS`): "internllm" (the reference's
    name) and "Qwen2.5llm" (its inference JSON's) are Qwen2, "qwen3" and "internlm3" the others. The kinds
    differ in ``add_qkv_bias`` (Qwen2 only) and ``qk_layernorm`` (Qwen3 only: RMSNorm of every q and k head
    over head_dim before RoPE, one weight of size head_dim shared by the heads); left null they take the
    kind's value, given they must agree with it.

    ``num_query_groups`` (alias ``num_key_value_heads``) null means no GQA; ``kv_channels`` (head_dim) null
    means hidden_size // num_attention_heads, given it need not be that (Qwen3-0.6B: hidden 1024, 16 heads of
    128). ``untie_embeddings_and_output_weights`` false ties the output layer to the token embeddings.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    model_id: str = "internllm"
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = _run(32768)
    rotary_base: float = 1000000.0
    rotary_percent: float = 1.0
    position_embedding_type: str = "rope"
    rope_scaling: Optional[RopeScaling] = _run(None)
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    activation_func: str = "silu"
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: Optional[bool] = None
    qk_layernorm: Optional[bool] = None
    init_method_std: float = _run(0.02)
    attention_softmax_in_fp32: bool = True
    params_dtype: str = _run("fp32")
    pipeline_num_layers: PipelineNumLayers = _run(None)
    freeze: Optional[bool] = _run(None)
    lora: Optional[LoraSpec] = _run(None)
    unfreeze_output_layer: bool = _run(False)
    recompute_granularity: Optional[str] = _run(None)
    recompute_method: Optional[str] = _run(None)
    recompute_num_layers: Optional[int] = _run(None)
    variable_seq_lengths: bool = _run(False)
    untie_embeddings_and_output_weights: bool = True
    # Qwen3-MoE (model_id "qwen3_moe"): the sparse layers' experts and router, as transformers' Qwen3MoeConfig
    num_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: Any = ()
    moe_aux_loss_coeff: float = _run(0.001)
    moe_z_loss_coeff: Optional[float] = _run(None)

    _PATH = _TEXT_PATH
    _CHOICES = {
        "model_id": tuple(LLM_KINDS),
        "position_embedding_type": ("rope",),
        "normalization": ("RMSNorm",),
        "activation_func": ("silu",),
        "gated_linear_unit": (True,),
        "add_bias_linear": (False,),
        "params_dtype": PARAMS_DTYPES,
        **_RECOMPUTE_CHOICES,
    }

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            self._set("rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        self._set("lora", lora_spec("text", self.lora, join(self._PATH, "lora")))
        self._check_fields()
        self._positive("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                       "num_query_groups", "kv_channels", "max_position_embeddings", "rotary_base",
                       "layernorm_epsilon")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise self._err("num_attention_heads", f"{self.num_attention_heads} does not divide "
                            f"hidden_size {self.hidden_size} (set kv_channels for another head size)")
        kind = LLM_KINDS[self.model_id]
        self._check_moe(kind)
        for name, value in (("add_qkv_bias", kind == "qwen2"), ("qk_layernorm", kind in ("qwen3", "qwen3_moe"))):
            given = getattr(self, name)
            if given is None:
                self._set(name, value)
            elif given != value:
                raise self._err(name, f"{json.dumps(given)} does not fit model_id {self.model_id!r} (a {kind} LLM "
                                f"has {json.dumps(value)}): another model's weights would load and compute "
                                "something else")
        if self.num_query_groups is None:
            self._set("num_query_groups", self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise self._err("num_query_groups", f"{self.num_query_groups} does not divide "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.kv_channels is None:
            self._set("kv_channels", self.hidden_size // self.num_attention_heads)
        if not 0.0 < self.rotary_percent <= 1.0:
            raise self._err("rotary_percent", f"must be in (0, 1], got {self.rotary_percent!r}")
        self._set("pipeline_num_layers", _check_pipeline(
            join(self._PATH, "pipeline_num_layers"), self.pipeline_num_layers, self.num_layers))
        self._check_recompute()

    def _check_moe(self, kind: str) -> None:
        if kind != "qwen3_moe":
            for name in MOE_FIELDS:
                if getattr(self, name) is not None:
                    raise self._err(name, f"is set, but model_id {self.model_id!r} is a dense LLM (experts need "
                                    "model_id \"qwen3_moe\")")
            return
        for name in MOE_FIELDS:
            if getattr(self, name) is None:
                raise self._err(name, "missing: a qwen3_moe LLM needs num_experts, moe_router_topk and "
                                "moe_ffn_hidden_size")
        self._positive(*MOE_FIELDS, "decoder_sparse_step")
        if self.moe_router_topk > self.num_experts:
            raise self._err("moe_router_topk", f"{self.moe_router_topk} > num_experts {self.num_experts}")
        only = self.mlp_only_layers
        if not isinstance(only, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in only):
            raise self._err("mlp_only_layers", f"expected a list of layer indices in [0, {self.num_layers}), "
                            f"got {describe(only)}")
        self._set("mlp_only_layers", tuple(sorted(set(only))))
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0) < 0:
            raise self._err("moe_aux_loss_coeff", "the loss coefficients must be >= 0")
        mlp = sorted(set(self.lora.target_modules) & {"gate_proj", "up_proj", "down_proj"}) if self.lora else []
        if mlp and (self.num_experts and len(self.mlp_only_layers) < self.num_layers):
            raise self._err("lora.target_modules", f"{mlp}: LoRA on the experts' MLPs is not supported (attention "
                            "targets are)")

    @property
    def moe(self) -> bool:
        return self.kind == "qwen3_moe"

    @property
    def moe_layers(self) -> Tuple[int, ...]:
        """The sparse layers (transformers' Qwen3-MoE rule): not in ``mlp_only_layers`` and every
        ``decoder_sparse_step``-th; the others have the dense MLP of ``ffn_hidden_size``."""
        if not self.moe:
            return ()
        return tuple(i for i in range(self.num_layers)
                     if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def head_dim(self) -> int:
        return self.kv_channels  # type: ignore[return-value]

    @property
    def frozen(self) -> bool:
        """Whether the LLM's own weights are frozen: ``freeze`` when given, else only with LoRA (the adapters
        train; ``freeze: false`` with LoRA trains both)."""
        return self.lora is not None if self.freeze is None else self.freeze

    @property
    def kind(self) -> str:
        """"qwen2", "qwen3", "internlm3" or "qwen3_moe" (:data:`LLM_KINDS`)."""
        return LLM_KINDS[self.model_id]

    @property
    def tied(self) -> bool:
        """The output layer is the token embedding matrix."""
        return not self.untie_embeddings_and_output_weights


def _rope_scaling_from_dict(raw: Mapping[str, Any]) -> RopeScaling:
    _check_rope_type(raw.get("rope_type", raw.get("type")))
    s = Section(raw, _ROPE_SCALING_PATH, known=("type", "rope_type", "factor"))
    # HF writes "rope_type" (and sometimes both); the reference JSON writes "type".
    if "rope_type" in s and "type" in s and raw["type"] != raw["rope_type"]:
        raise ModelSpecError(s.key("rope_type"), f"{raw['rope_type']!r} disagrees with type {raw['type']!r}")
    return RopeScaling(type=raw["rope_type"] if "rope_type" in s else s.get("type"), factor=s.get("factor"))


@dataclass(frozen=True)
class InternVLSpec(_SpecBase):
    """The whole InternVL3 model: ViT -> pixel shuffle -> projector -> LLM with the image splice."""

    img_context_token_id: int
    vision: VisionEncoderSpec
    projector: ProjectorSpec
    text: TextDecoderSpec
    model_id: str = "InternVL3"
    downsample_ratio: Optional[float] = None
    select_layer: int = -1
    ps_version: str = "v2"
    pre_process: bool = _run(True)
    post_process: bool = _run(True)

    _PATH = ""
    _CHOICES = {"model_id": ("InternVL3",), "select_layer": (-1,), "ps_version": ("v2",)}

    def __post_init__(self) -> None:
        self._check_fields()
        v, p, t = self.vision, self.projector, self.text
        # One downsample ratio, however many places say it.
        if self.downsample_ratio is None:
            self._set("downsample_ratio", v.downsample_ratio or p.downsample_ratio or 0.5)
        r = self.downsample_ratio
        self._positive("downsample_ratio")
        for path, value in ((join(_VISION_PATH, "downsample_ratio"), v.downsample_ratio),
                            (join(_PROJECTOR_PATH, "downsample_ratio"), p.downsample_ratio)):
            if value is not None and value != r:
                raise ModelSpecError(path, f"{value!r} disagrees with the top-level downsample_ratio {r!r}")
        for name in ("select_layer", "ps_version"):
            value = getattr(v, name)
            if value is not None and value != getattr(self, name):
                raise ModelSpecError(join(_VISION_PATH, name),
                                     f"{value!r} disagrees with the top-level {name} {getattr(self, name)!r}")
        inv = 1.0 / r
        if abs(inv - round(inv)) > 1e-9:
            raise ModelSpecError("downsample_ratio", f"1/{r!r} must be an integer (pixel shuffle)")
        grid = v.image_size // v.patch_size
        if grid % round(inv):
            raise ModelSpecError("downsample_ratio", f"{r!r} does not evenly shrink the {grid}x{grid} patch grid "
                                 f"of {_VISION_PATH} (image_size {v.image_size}, patch_size {v.patch_size})")
        v = dataclasses.replace(v, downsample_ratio=r, select_layer=self.select_layer, ps_version=self.ps_version)
        # Projector sizes must match the modules it joins.
        if p.vit_hidden_size is not None and p.vit_hidden_size != v.hidden_size:
            raise ModelSpecError(join(_PROJECTOR_PATH, "vit_hidden_size"),
                                 f"{p.vit_hidden_size} != {_VISION_PATH}.hidden_size {v.hidden_size}")
        if p.llm_hidden_size is not None and p.llm_hidden_size != t.hidden_size:
            raise ModelSpecError(join(_PROJECTOR_PATH, "llm_hidden_size"),
                                 f"{p.llm_hidden_size} != {_TEXT_PATH}.hidden_size {t.hidden_size}")
        p = dataclasses.replace(p, downsample_ratio=r, vit_hidden_size=v.hidden_size, llm_hidden_size=t.hidden_size)
        self._set("vision", v)
        self._set("projector", p)
        if not 0 <= self.img_context_token_id < t.vocab_size:
            raise ModelSpecError("img_context_token_id", f"{self.img_context_token_id} is outside the vocabulary "
                                 f"[0, {_TEXT_PATH}.vocab_size={t.vocab_size})")
        vs, ts = pipeline_shape(v.pipeline_num_layers), pipeline_shape(t.pipeline_num_layers)
        if vs is not None and ts is not None and vs != ts:
            raise ModelSpecError(join(_VISION_PATH, "pipeline_num_layers"),
                                 f"{_plain(v.pipeline_num_layers)} has (pp, vpp) = {vs}, but "
                                 f"{_TEXT_PATH}.pipeline_num_layers {_plain(t.pipeline_num_layers)} has {ts}")

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one image tile becomes: (image_size//patch_size)^2 * downsample_ratio^2 (256 at 448/14/0.5)."""
        grid = self.vision.image_size // self.vision.patch_size
        return int(round(grid * self.downsample_ratio)) ** 2  # type: ignore[operator]


# --------------------------------------------------------------------------------------------------
# JSON (reference schema) -> spec
# --------------------------------------------------------------------------------------------------

def _any(_: Any) -> Optional[str]:
    return None


def _must_be(expected: Any, why: str = ""):
    def check(value: Any) -> Optional[str]:
        if value != expected or type(value) is not type(expected):
            return f"only {json.dumps(expected)} is supported, got {json.dumps(value)}" + (f" ({why})" if why else "")
        return None
    return check


def _bool(value: Any) -> Optional[str]:
    # a kernel-fusion switch: either value computes the same model
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _number(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {value!r}"
    return None


def _zero_dropout(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
        return f"dropout is not supported (InternVL3 trains without it); expected 0.0, got {value!r}"
    return None


# Keys the reference files (training and inference JSONs alike) carry that have no effect here: megatron or
# transformers implementation switches, accepted and reported in one warning. The checker returns an error
# message when the value would describe another model than the one we build.
_IGNORED_ANYWHERE = {"img_embedding_idx": _any, "add_rmsnorm_offset": _any, "use_text_processer": _any}
_IGNORED = {
    "": {},
    _TEXT_PATH: {
        # fusions are chosen by the runtime, not the spec: any value computes the same model
        "use_fused_rotary_pos_emb": _any,
        "bias_activation_fusion": _bool, "masked_softmax_fusion": _bool, "bias_dropout_fusion": _bool,
        "apply_rope_fusion": _bool, "memory_efficient_layer_norm": _bool,
        "initializer_factor": _number,  # initial values only; loaded weights replace them
        # The other values are other models, whose weights would load and compute something else.
        "layernorm_zero_centered_gamma": _must_be(False, "the LLM's RMSNorm scales by its weight, not "
                                                  "1 + weight: true describes another model"),
        "is_encoder_decoder": _must_be(False, "the LLM is decoder-only"),
        "parallel_output": _any,  # logits stay vocab-parallel for the loss
        "fp16_lm_cross_entropy": _must_be(False),
        "reset_attention_mask": _must_be(False),
        "hidden_dropout": _zero_dropout,
        "attention_dropout": _zero_dropout,
    },
    _VISION_PATH: {
        "pre_tockens": _any, "next_tockens": _any,  # NPU flash-attention window: the ViT is bidirectional
        "output_hidden_states": _any, "use_return_dict": _any,
        # The reference sets it false for the ViT while its flash attention softmaxes in fp32 regardless;
        # our ViT config always computes the softmax in fp32.
        "attention_softmax_in_fp32": _any,
        "hidden_dropout": _zero_dropout,
        "attention_dropout": _zero_dropout,
        "q_layernorm": _any, "k_layernorm": _any,  # checked against normalization below
    },
    _PROJECTOR_PATH: {},
}


def _section(cls: type, raw: Any, path: str, ignored: List[str], *,
             handled: Tuple[str, ...] = ()) -> Tuple[Section, Dict[str, Any]]:
    """One JSON object read into constructor kwargs (the dataclass checks their values); unknown keys are
    errors, dead keys are recorded in ``ignored``, ``handled`` keys are left to the caller."""
    dead = {**_IGNORED_ANYWHERE, **_IGNORED.get(path, {})}
    fields = [f for f in dataclasses.fields(cls) if f.name not in ("vision", "projector", "text")]
    s = Section(raw, path, known=[f.name for f in fields] + list(dead) + list(handled))
    kwargs = {f.name: s.get(f.name) for f in fields if f.name in s or f.default is dataclasses.MISSING}
    for key in (k for k in raw if k in dead):
        problem = dead[key](raw[key])
        if problem:
            raise ModelSpecError(s.key(key), problem)
        ignored.append(s.key(key))
    return s, kwargs


def _dtype_flags_check(s: Section, dtype: str) -> None:
    """``bf16``/``fp16`` duplicate ``params_dtype``: they must agree with it."""
    for flag in ("bf16", "fp16"):
        value = s.get(flag, bool, None)
        if value is not None and value != (dtype == flag):
            raise ModelSpecError(s.key(flag), f"{value!r} disagrees with params_dtype {dtype!r}")


def _vision_from_dict(raw: Any, ignored: List[str]) -> VisionEncoderSpec:
    s, kwargs = _section(VisionEncoderSpec, raw, _VISION_PATH, ignored, handled=("bf16", "fp16"))
    spec = VisionEncoderSpec(**kwargs)
    _dtype_flags_check(s, spec.params_dtype)
    for key in ("q_layernorm", "k_layernorm"):
        if key in s and raw[key] not in (False, None, spec.normalization):
            raise ModelSpecError(s.key(key), f"{raw[key]!r} must match normalization "
                                 f"{spec.normalization!r} (InternViT normalises Q and K with its layer-norm type)")
    return spec


def _text_from_dict(raw: Any, ignored: List[str]) -> TextDecoderSpec:
    s, kwargs = _section(TextDecoderSpec, raw, _TEXT_PATH, ignored,
                         handled=("bf16", "fp16", "num_key_value_heads", "group_query_attention"))
    kvh = s.get("num_key_value_heads", int, None)
    if kvh is not None:
        if "num_query_groups" in kwargs and kwargs["num_query_groups"] != kvh:
            raise ModelSpecError(s.key("num_key_value_heads"),
                                 f"{kvh} disagrees with num_query_groups {kwargs['num_query_groups']!r}")
        kwargs["num_query_groups"] = kvh
    gqa = s.get("group_query_attention", bool, None)
    groups = kwargs.get("num_query_groups")
    if gqa is False and groups is not None and groups != kwargs.get("num_attention_heads"):
        raise ModelSpecError(s.key("group_query_attention"),
                             f"false, but num_query_groups is {groups!r} (not num_attention_heads)")
    if gqa and groups is None:
        raise ModelSpecError(s.key("num_query_groups"), "missing while group_query_attention is true")
    rope = kwargs.get("rope_scaling")
    if rope is not None:
        if not isinstance(rope, Mapping):
            raise ModelSpecError(s.key("rope_scaling"), f"expected an object or null, got {describe(rope)}")
        kwargs["rope_scaling"] = _rope_scaling_from_dict(rope)
    spec = TextDecoderSpec(**kwargs)
    _dtype_flags_check(s, spec.params_dtype)
    return spec


def spec_from_dict(raw: Mapping[str, Any], *, source: str = "<dict>") -> InternVLSpec:
    """Build a spec from an already-parsed reference-schema dict (see :func:`load_model_spec`)."""
    ignored: List[str] = []
    s, top = _section(InternVLSpec, raw, "", ignored, handled=("text_decoder", "image_encoder", "add_text_encoder",
                                                               "text_encoder", "video_encoder"))
    s.get("add_text_encoder", bool, False, choices=(False,))
    for key in ("text_encoder", "video_encoder"):
        if raw.get(key) is not None:
            raise ModelSpecError(key, f"only null is supported, got {describe(raw[key])}")
    text = s.get("text_decoder")
    image = Section(s.get("image_encoder"), "image_encoder", known=("vision_encoder", "vision_projector"))
    spec = InternVLSpec(
        vision=_vision_from_dict(image.get("vision_encoder"), ignored),
        projector=ProjectorSpec(**_section(ProjectorSpec, image.get("vision_projector", dict, {}), _PROJECTOR_PATH,
                                           ignored)[1]),
        text=_text_from_dict(text, ignored),
        **top,
    )
    if ignored:
        logger.warning("model spec %s: ignored key(s) with no effect in mindspeed_mm: %s",
                       source, ", ".join(ignored))
    return spec


def load_model_spec(src: Union[str, Path, Mapping[str, Any]], source: str = "<dict>") -> InternVLSpec:
    """Parse and validate a reference-schema model spec from a JSON file path or a dict (read from `source`).

    Raises :class:`ModelSpecError` (naming the file and line/column for malformed JSON, else the key path).
    """
    if isinstance(src, Mapping):
        return spec_from_dict(src, source=source)
    raw = read_json(src)
    try:
        return spec_from_dict(raw, source=str(src))
    except ConfigError as e:
        raise e.in_file(src) from None


RUN_SETTINGS = tuple(sorted(join(cls._PATH, f.name) for cls in (InternVLSpec, VisionEncoderSpec, ProjectorSpec,
                                                                  TextDecoderSpec)
                             for f in dataclasses.fields(cls) if f.metadata.get("run")))


def architecture_differences(a: InternVLSpec, b: InternVLSpec) -> List[Tuple[str, Any, Any]]:
    """``(key path, value in a, value in b)`` for every architecture key where two specs differ, sorted by key
    path; run settings (:data:`RUN_SETTINGS`) are not compared. Empty: the same model, so the weights of one
    load into the other."""
    out = []
    for x, y in ((a, b), (a.vision, b.vision), (a.projector, b.projector), (a.text, b.text)):
        for f in dataclasses.fields(x):
            if not f.metadata.get("run") and f.name not in ("vision", "projector", "text"):
                if x is a.text and f.name == "model_id" and x.kind == y.kind:
                    continue  # two names of one LLM kind ("internllm", "Qwen2.5llm")
                if getattr(x, f.name) != getattr(y, f.name):
                    out.append((join(x._PATH, f.name), _plain(getattr(x, f.name)), _plain(getattr(y, f.name))))
    return sorted(out, key=lambda d: d[0])


# --------------------------------------------------------------------------------------------------
# spec -> JSON
# --------------------------------------------------------------------------------------------------

def _model_id_first(section: Dict[str, Any]) -> Dict[str, Any]:
    return {"model_id": section["model_id"], **{k: v for k, v in section.items() if k != "model_id"}}


_MOE_KEYS = (*MOE_FIELDS, "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "moe_aux_loss_coeff",
             "moe_z_loss_coeff")
_UNSET_UNLESS_USED = {"lora": None, "unfreeze_last_layers": 0, "unfreeze_output_layer": False}


def _with_training_choices(module: Any) -> Dict[str, Any]:
    """A module's keys with LoRA and the unfreeze switches only where they are on (so a model JSON without them
    reads as it did before they existed); ``freeze`` as given, the ViT's default written out as the reference
    files have it, the others' left out when not given (given false, LoRA would train the LLM's base weights
    too, and --freeze-mlp would contradict the projector's)."""
    out = {k: v for k, v in _plain(module).items() if k not in _UNSET_UNLESS_USED or v != _UNSET_UNLESS_USED[k]}
    if isinstance(module, TextDecoderSpec):
        out["mlp_only_layers"] = list(module.mlp_only_layers)
        if not module.moe:  # a dense LLM's JSON reads as it did before experts existed
            out = {k: v for k, v in out.items() if k not in _MOE_KEYS}
    if isinstance(module, VisionEncoderSpec):
        out["freeze"] = module.frozen
    elif out["freeze"] is None:
        del out["freeze"]
    return out


def to_dict(spec: InternVLSpec) -> Dict[str, Any]:
    """The spec in the reference schema (only keys with an effect), loadable by :func:`load_model_spec`."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name not in ("vision", "projector", "text"):
            out[f.name] = _plain(getattr(spec, f.name))
    out = _model_id_first(out)
    out["text_decoder"] = _model_id_first(_with_training_choices(spec.text))
    out["image_encoder"] = {"vision_encoder": _model_id_first(_with_training_choices(spec.vision)),
                            "vision_projector": _model_id_first(_with_training_choices(spec.projector))}
    return out


def to_json(spec: InternVLSpec, indent: int = 4) -> str:
    return json.dumps(to_dict(spec), indent=indent) + "\n"


def dump_model_spec(spec: InternVLSpec, path: Union[str, Path]) -> None:
    Path(path).write_text(to_json(spec), encoding="utf-8")
