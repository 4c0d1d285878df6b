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
* size inconsistencies are errors. Every error is a :class:`ModelSpecError` (a ``ValueError``) whose
  message starts with the key path and quotes the bad value.

``num_layers`` is always the module's GLOBAL layer count; ``pipeline_num_layers`` says how the layers are
spread over pipeline stages (``[pp]``, or ``[vpp][pp]`` under virtual pipelining) and must sum to it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from mindspeed_mm.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "ModelSpecError",
    "RopeScaling",
    "VisionEncoderSpec",
    "ProjectorSpec",
    "TextDecoderSpec",
    "InternVLSpec",
    "load_model_spec",
    "to_dict",
    "to_json",
    "dump_model_spec",
    "DEFAULT_IMG_CONTEXT_TOKEN_ID",
    "IMG_CONTEXT_TOKEN",
    "IGNORE_INDEX",
    "PARAMS_DTYPES",
]

DEFAULT_IMG_CONTEXT_TOKEN_ID = 151667  # <IMG_CONTEXT> in the Qwen2.5-based InternVL3 tokenizers
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IGNORE_INDEX = -100  # label of a position that is not a target (the data marks them, the loss skips them)
PARAMS_DTYPES = ("fp32", "bf16", "fp16")

# Pipeline layout as stored: (n_stage0, n_stage1, ...) or ((vp0 stages...), (vp1 stages...), ...).
PipelineNumLayers = Optional[Tuple[Any, ...]]

_VISION_PATH = "image_encoder.vision_encoder"
_PROJECTOR_PATH = "image_encoder.vision_projector"
_TEXT_PATH = "text_decoder"


class ModelSpecError(UserError):
    """A model spec is malformed or inconsistent. ``key_path`` names the offending key."""

    def __init__(self, key_path: str, message: str):
        self.key_path = key_path
        self.detail = message
        super().__init__(f"{key_path}: {message}" if key_path else message)


# --------------------------------------------------------------------------------------------------
# Generic, annotation-driven value checking (shared by every spec dataclass)
# --------------------------------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _check_value(path: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a simple annotation and return it normalised (int -> float)."""
    if get_origin(hint) is Union:
        args = get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ModelSpecError(path, f"expected {_type_name(hint)}, got null")
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, hint
        return _check_value(path, inner[0], value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ModelSpecError(path, f"expected bool, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelSpecError(path, f"expected int, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelSpecError(path, f"expected number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ModelSpecError(path, f"expected a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ModelSpecError(path, f"expected string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ModelSpecError(path, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {hint!r} for {path}")  # programming error


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
        rows = tuple(tuple(_pipeline_int(f"{path}[{i}][{j}]", n) for j, n in enumerate(row))
                     for i, row in enumerate(value))
        total = sum(sum(r) for r in rows)
        result: Tuple[Any, ...] = rows
    else:
        result = tuple(_pipeline_int(f"{path}[{i}]", n) for i, n in enumerate(value))
        total = sum(result)
    if total != num_layers:
        raise ModelSpecError(path, f"{list(_plain(result))} sums to {total}, but num_layers is {num_layers}")
    return result


def _pipeline_int(path: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ModelSpecError(path, f"expected a non-negative int, got {n!r}")
    return n


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
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "pipeline_num_layers":
                continue  # checked by the subclass once num_layers is known
            path = _join(self._PATH, f.name)
            value = _check_value(path, hints[f.name], getattr(self, f.name))
            choices = self._CHOICES.get(f.name)
            if choices is not None and value is not None and value not in choices:
                raise ModelSpecError(path, f"{json.dumps(value)} is not supported; expected "
                                     f"{' or '.join(json.dumps(c) for c in choices)}")
            object.__setattr__(self, f.name, value)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _err(self, name: str, message: str) -> ModelSpecError:
        return ModelSpecError(_join(self._PATH, name), message)

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
    drop_path_rate: float = 0.0
    initializer_factor: float = 1.0
    init_method_std: float = 0.02
    post_layer_norm: bool = False
    downsample_ratio: Optional[float] = None
    select_layer: Optional[int] = None
    ps_version: Optional[str] = None
    freeze: bool = True
    params_dtype: str = "fp32"
    pipeline_num_layers: PipelineNumLayers = None
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    sequence_parallel: Optional[bool] = None
    context_parallel_size: int = 1

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
            _join(self._PATH, "pipeline_num_layers"), self.pipeline_num_layers, self.num_layers))
        self._check_recompute()

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
    freeze: bool = False
    activation_func: str = "gelu"
    layernorm_epsilon: float = 1e-5

    _PATH = _PROJECTOR_PATH
    _CHOICES = {"model_id": ("InternVLMLP",), "activation_func": ("gelu",)}

    def __post_init__(self) -> None:
        self._check_fields()
        self._positive("downsample_ratio", "vit_hidden_size", "llm_hidden_size", "layernorm_epsilon")

    @property
    def input_size(self) -> int:
        """Width of the projector input: the ViT width times the pixel-shuffle factor (1/r)^2."""
        assert self.vit_hidden_size is not None and self.downsample_ratio is not None
        return int(round(self.vit_hidden_size / self.downsample_ratio ** 2))


@dataclass(frozen=True)
class RopeScaling:
    """``text_decoder.rope_scaling``: dynamic-NTK RoPE. It only changes anything for sequences longer than
    ``max_position_embeddings`` (base' = base * (factor*L/max_pos - (factor-1))^(d/(d-2)) for L > max_pos);
    within 32k positions InternVL3 runs plain RoPE."""

    type: str
    factor: float

    def __post_init__(self) -> None:
        path = _join(_TEXT_PATH, "rope_scaling")
        object.__setattr__(self, "type", _check_value(f"{path}.type", str, self.type))
        object.__setattr__(self, "factor", _check_value(f"{path}.factor", float, self.factor))
        if self.type != "dynamic":
            raise ModelSpecError(f"{path}.type", f"{self.type!r} is not supported; expected 'dynamic' or null")
        if self.factor < 1.0:
            raise ModelSpecError(f"{path}.factor", f"must be >= 1, got {self.factor!r}")


@dataclass(frozen=True)
class TextDecoderSpec(_SpecBase):
    """The Qwen2-style LLM (``text_decoder``). ``model_id`` "internllm" is the reference's name for it.

    ``num_query_groups`` (alias ``num_key_value_heads``) null means no GQA; ``kv_channels`` null means
    hidden_size // num_attention_heads. The output layer is never tied to the embedding.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    model_id: str = "internllm"
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 32768
    rotary_base: float = 1000000.0
    rotary_percent: float = 1.0
    position_embedding_type: str = "rope"
    rope_scaling: Optional[RopeScaling] = None
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    activation_func: str = "silu"
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    init_method_std: float = 0.02
    attention_softmax_in_fp32: bool = True
    params_dtype: str = "fp32"
    pipeline_num_layers: PipelineNumLayers = None
    freeze: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    variable_seq_lengths: bool = False
    untie_embeddings_and_output_weights: bool = True

    _PATH = _TEXT_PATH
    _CHOICES = {
        "model_id": ("internllm",),
        "position_embedding_type": ("rope",),
        "normalization": ("RMSNorm",),
        "activation_func": ("silu",),
        "gated_linear_unit": (True,),
        "add_bias_linear": (False,),
        "params_dtype": PARAMS_DTYPES,
        "untie_embeddings_and_output_weights": (True,),
        **_RECOMPUTE_CHOICES,
    }

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            self._set("rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        self._check_fields()
        self._positive("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                       "num_query_groups", "kv_channels", "max_position_embeddings", "rotary_base",
                       "layernorm_epsilon")
        if self.hidden_size % self.num_attention_heads:
            raise self._err("num_attention_heads", f"{self.num_attention_heads} does not divide "
                            f"hidden_size {self.hidden_size}")
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
            _join(self._PATH, "pipeline_num_layers"), self.pipeline_num_layers, self.num_layers))
        self._check_recompute()

    @property
    def head_dim(self) -> int:
        return self.kv_channels  # type: ignore[return-value]


def _rope_scaling_from_dict(raw: Mapping[str, Any]) -> RopeScaling:
    path = _join(_TEXT_PATH, "rope_scaling")
    raw = dict(raw)
    # HF writes "rope_type" (and sometimes both); the reference JSON writes "type".
    if "rope_type" in raw:
        rt = raw.pop("rope_type")
        if "type" in raw and raw["type"] != rt:
            raise ModelSpecError(f"{path}.rope_type", f"{rt!r} disagrees with type {raw['type']!r}")
        raw["type"] = rt
    unknown = sorted(set(raw) - {"type", "factor"})
    if unknown:
        raise ModelSpecError(f"{path}.{unknown[0]}", f"unknown key (value {raw[unknown[0]]!r})")
    for k in ("type", "factor"):
        if k not in raw:
            raise ModelSpecError(f"{path}.{k}", "missing required key")
    return RopeScaling(type=raw["type"], factor=raw["factor"])


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
    pre_process: bool = True
    post_process: bool = True

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
        for path, value in ((_join(_VISION_PATH, "downsample_ratio"), v.downsample_ratio),
                            (_join(_PROJECTOR_PATH, "downsample_ratio"), p.downsample_ratio)):
            if value is not None and value != r:
                raise ModelSpecError(path, f"{value!r} disagrees with the top-level downsample_ratio {r!r}")
        for name in ("select_layer", "ps_version"):
            value = getattr(v, name)
            if value is not None and value != getattr(self, name):
                raise ModelSpecError(_join(_VISION_PATH, name),
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
            raise ModelSpecError(_join(_PROJECTOR_PATH, "vit_hidden_size"),
                                 f"{p.vit_hidden_size} != {_VISION_PATH}.hidden_size {v.hidden_size}")
        if p.llm_hidden_size is not None and p.llm_hidden_size != t.hidden_size:
            raise ModelSpecError(_join(_PROJECTOR_PATH, "llm_hidden_size"),
                                 f"{p.llm_hidden_size} != {_TEXT_PATH}.hidden_size {t.hidden_size}")
        p = dataclasses.replace(p, downsample_ratio=r, vit_hidden_size=v.hidden_size, llm_hidden_size=t.hidden_size)
        self._set("vision", v)
        self._set("projector", p)
        if not 0 <= self.img_context_token_id < t.vocab_size:
            raise ModelSpecError("img_context_token_id", f"{self.img_context_token_id} is outside the vocabulary "
                                 f"[0, {_TEXT_PATH}.vocab_size={t.vocab_size})")
        vs, ts = pipeline_shape(v.pipeline_num_layers), pipeline_shape(t.pipeline_num_layers)
        if vs is not None and ts is not None and vs != ts:
            raise ModelSpecError(_join(_VISION_PATH, "pipeline_num_layers"),
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


def _must_be(expected: Any):
    def check(value: Any) -> Optional[str]:
        if value != expected or type(value) is not type(expected):
            return f"only {json.dumps(expected)} is supported, got {value!r}"
        return None
    return check


def _zero_dropout(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
        return f"dropout is not supported (InternVL3 trains without it); expected 0.0, got {value!r}"
    return None


# Keys the reference files carry that have no effect here: accepted, reported in one warning.
# The checker returns an error message when the value would matter.
_IGNORED_ANYWHERE = {"img_embedding_idx": _any, "add_rmsnorm_offset": _any, "use_text_processer": _any}
_IGNORED = {
    "": {},
    _TEXT_PATH: {
        "use_fused_rotary_pos_emb": _any,  # fusions are chosen by the runtime, not the spec
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


def _dtype_flags_check(path: str, raw: Mapping[str, Any], dtype: str) -> None:
    """``bf16``/``fp16`` duplicate ``params_dtype``: they must agree with it."""
    for flag in ("bf16", "fp16"):
        if flag in raw:
            value = _check_value(_join(path, flag), bool, raw[flag])
            if value != (dtype == flag):
                raise ModelSpecError(_join(path, flag), f"{value!r} disagrees with params_dtype {dtype!r}")


def _section_kwargs(cls: type, raw: Any, path: str, ignored: List[str], *,
                    handled: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Split one JSON object into constructor kwargs; unknown keys are errors, dead keys are recorded."""
    if not isinstance(raw, Mapping):
        raise ModelSpecError(path or "<root>", f"expected a JSON object, got {type(raw).__name__} {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    dead = {**_IGNORED_ANYWHERE, **_IGNORED.get(path, {})}
    kwargs: Dict[str, Any] = {}
    for key, value in raw.items():
        key_path = _join(path, key)
        if key in handled:
            continue
        if key in names and key not in ("vision", "projector", "text"):
            kwargs[key] = value
        elif key in dead:
            problem = dead[key](value)
            if problem:
                raise ModelSpecError(key_path, problem)
            ignored.append(key_path)
        else:
            raise ModelSpecError(key_path, f"unknown key (value {_short(value)})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore
                and f.name not in ("vision", "projector", "text")]
    for name in required:
        if name not in kwargs:
            raise ModelSpecError(_join(path, name), "missing required key")
    return kwargs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _vision_from_dict(raw: Any, ignored: List[str]) -> VisionEncoderSpec:
    path = _VISION_PATH
    kwargs = _section_kwargs(VisionEncoderSpec, raw, path, ignored, handled=("bf16", "fp16"))
    spec = VisionEncoderSpec(**kwargs)
    _dtype_flags_check(path, raw, spec.params_dtype)
    for key in ("q_layernorm", "k_layernorm"):
        if key in raw and raw[key] not in (False, None, spec.normalization):
            raise ModelSpecError(_join(path, key), f"{raw[key]!r} must match normalization "
                                 f"{spec.normalization!r} (InternViT normalises Q and K with its layer-norm type)")
    return spec


def _projector_from_dict(raw: Any, ignored: List[str]) -> ProjectorSpec:
    return ProjectorSpec(**_section_kwargs(ProjectorSpec, raw, _PROJECTOR_PATH, ignored))


def _text_from_dict(raw: Any, ignored: List[str]) -> TextDecoderSpec:
    path = _TEXT_PATH
    kwargs = _section_kwargs(TextDecoderSpec, raw, path, ignored,
                             handled=("bf16", "fp16", "num_key_value_heads", "group_query_attention"))
    if "num_key_value_heads" in raw:
        kvh = _check_value(_join(path, "num_key_value_heads"), int, raw["num_key_value_heads"])
        if "num_query_groups" in kwargs and kwargs["num_query_groups"] != kvh:
            raise ModelSpecError(_join(path, "num_key_value_heads"),
                                 f"{kvh} disagrees with num_query_groups {kwargs['num_query_groups']!r}")
        kwargs["num_query_groups"] = kvh
    if "group_query_attention" in raw:
        gqa = _check_value(_join(path, "group_query_attention"), bool, raw["group_query_attention"])
        groups = kwargs.get("num_query_groups")
        if not gqa and groups is not None and groups != kwargs.get("num_attention_heads"):
            raise ModelSpecError(_join(path, "group_query_attention"),
                                 f"false, but num_query_groups is {groups!r} (not num_attention_heads)")
        if gqa and groups is None:
            raise ModelSpecError(_join(path, "num_query_groups"), "missing while group_query_attention is true")
    rope = kwargs.get("rope_scaling")
    if rope is not None:
        if not isinstance(rope, Mapping):
            raise ModelSpecError(_join(path, "rope_scaling"), f"expected an object or null, got {rope!r}")
        kwargs["rope_scaling"] = _rope_scaling_from_dict(rope)
    spec = TextDecoderSpec(**kwargs)
    _dtype_flags_check(path, raw, spec.params_dtype)
    return spec


def spec_from_dict(raw: Mapping[str, Any], *, source: str = "<dict>") -> InternVLSpec:
    """Build a spec from an already-parsed reference-schema dict (see :func:`load_model_spec`)."""
    ignored: List[str] = []
    top = _section_kwargs(InternVLSpec, raw, "", ignored,
                          handled=("text_decoder", "image_encoder", "add_text_encoder", "text_encoder",
                                   "video_encoder"))
    if "add_text_encoder" in raw and raw["add_text_encoder"] is not False:
        raise ModelSpecError("add_text_encoder", f"only false is supported, got {raw['add_text_encoder']!r}")
    for key in ("text_encoder", "video_encoder"):
        if raw.get(key) is not None:
            raise ModelSpecError(key, f"only null is supported, got {_short(raw[key])}")
    if "text_decoder" not in raw:
        raise ModelSpecError("text_decoder", "missing required key")
    if "image_encoder" not in raw:
        raise ModelSpecError("image_encoder", "missing required key")
    image = raw["image_encoder"]
    if not isinstance(image, Mapping):
        raise ModelSpecError("image_encoder", f"expected a JSON object, got {_short(image)}")
    for key in image:
        if key not in ("vision_encoder", "vision_projector"):
            raise ModelSpecError(f"image_encoder.{key}", f"unknown key (value {_short(image[key])})")
    if "vision_encoder" not in image:
        raise ModelSpecError(_VISION_PATH, "missing required key")
    spec = InternVLSpec(
        vision=_vision_from_dict(image["vision_encoder"], ignored),
        projector=_projector_from_dict(image.get("vision_projector", {}), ignored),
        text=_text_from_dict(raw["text_decoder"], ignored),
        **top,
    )
    if ignored:
        logger.warning("model spec %s: ignored key(s) with no effect in mindspeed_mm: %s",
                       source, ", ".join(ignored))
    return spec


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_model_spec(src: Union[str, Path, Mapping[str, Any]]) -> InternVLSpec:
    """Parse and validate a reference-schema model spec from a JSON file path or a dict.

    Raises :class:`ModelSpecError` (naming the file and line/column for malformed JSON, else the key path).
    """
    if isinstance(src, Mapping):
        return spec_from_dict(src)
    path = Path(src)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelSpecError("", f"{path}: cannot read the model spec: {e.strerror or e}") from None
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ModelSpecError("", f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:  # duplicate key
        raise ModelSpecError("", f"{path}: {e}") from None
    try:
        return spec_from_dict(raw, source=str(path))
    except ModelSpecError as e:
        raise ModelSpecError(e.key_path, f"{e.detail} (in {path})") from None


# --------------------------------------------------------------------------------------------------
# spec -> JSON
# --------------------------------------------------------------------------------------------------

def _model_id_first(section: Dict[str, Any]) -> Dict[str, Any]:
    return {"model_id": section["model_id"], **{k: v for k, v in section.items() if k != "model_id"}}


def to_dict(spec: InternVLSpec) -> Dict[str, Any]:
    """The spec in the reference schema (only keys with an effect), loadable by :func:`load_model_spec`."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name not in ("vision", "projector", "text"):
            out[f.name] = _plain(getattr(spec, f.name))
    out = _model_id_first(out)
    out["text_decoder"] = _model_id_first(_plain(spec.text))
    out["image_encoder"] = {"vision_encoder": _model_id_first(_plain(spec.vision)),
                            "vision_projector": _model_id_first(_plain(spec.projector))}
    return out


def to_json(spec: InternVLSpec, indent: int = 4) -> str:
    return json.dumps(to_dict(spec), indent=indent) + "\n"


def dump_model_spec(spec: InternVLSpec, path: Union[str, Path]) -> None:
    Path(path).write_text(to_json(spec), encoding="utf-8")
