"""The two HuggingFace checkpoint formats of InternVL3, as pure functions.

* ``original``: OpenGVLab's ``InternVLChatModel`` (``trust_remote_code``) layout:
  ``vision_model.*`` (fused ``attn.qkv``), ``mlp1.{0,1,3}``, ``language_model.{model.*,lm_head.weight}``;
  ``config.json`` with ``llm_config`` / ``vision_config``.
* ``native``: transformers' ``InternVLForConditionalGeneration`` (``model_type: internvl``, the ``-hf`` repos):
  ``vision_tower.*`` (separate ``attention.{q,k,v}_proj``), ``multi_modal_projector.*``,
  ``language_model.{model.*,lm_head.weight}``; ``config.json`` with ``text_config`` / ``vision_config``.

On-disk native names are what transformers (5.x) ``save_pretrained`` writes; it reverses its load-time renaming,
so the files hold ``vision_tower.…``, ``multi_modal_projector.…``, ``language_model.model.…`` and
``language_model.lm_head.weight``. The in-memory module names (``model.vision_tower.…``,
``model.multi_modal_projector.…``, ``model.language_model.…``, ``lm_head.weight``) are accepted everywhere a
native name is read and are normalised to the on-disk names; :func:`native_key_to_module` goes the other way.

Nothing here imports transformers; tensors are only split/concatenated (never cast), so round trips are bit-exact.
Config files are read as JSON data, never as remote code.
"""
from __future__ import annotations

import copy
import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

import numpy as np

from mindspeed_mm.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ORIGINAL",
    "NATIVE",
    "detect_format",
    "normalize_native_key",
    "native_key_to_module",
    "original_key_to_native",
    "native_key_to_original",
    "split_qkv",
    "merge_qkv",
    "original_to_native_state_dict",
    "native_to_original_state_dict",
    "original_config_to_native",
    "native_config_to_original",
    "image_seq_length",
    "find_token_id",
    "load_hf_checkpoint",
    "read_safetensors",
    "CheckpointFormatError",
    "DEFAULT_IMAGE_TOKEN_ID",
    "IMG_CONTEXT_TOKEN",
]

ORIGINAL = "original"
NATIVE = "native"
HFFormat = Literal["original", "native"]

DEFAULT_IMAGE_TOKEN_ID = 151667  # <IMG_CONTEXT> in the Qwen2.5-based InternVL3 tokenizers
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


class CheckpointFormatError(UserError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""


# ----------------------------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------------------------

_ORIGINAL_ARCHS = {"InternVLChatModel"}
_NATIVE_ARCHS = {"InternVLForConditionalGeneration", "InternVLModel"}
# vision_config fields only the original InternViT config has
_ORIGINAL_VISION_FIELDS = {"qk_normalization", "qkv_bias", "initializer_factor", "drop_path_rate"}


def detect_format(config: Mapping) -> HFFormat:
    """Say which of the two HF InternVL layouts a parsed ``config.json`` describes.

    ``original``: ``architectures`` contains ``InternVLChatModel``, or ``model_type == "internvl_chat"``, or an
    ``llm_config`` next to a ``vision_config`` with InternViT fields. ``native``: ``model_type == "internvl"`` or
    ``architectures`` contains ``InternVLForConditionalGeneration``. Anything else raises CheckpointFormatError
    naming what was found.
    """
    if not isinstance(config, Mapping):
        raise CheckpointFormatError(f"InternVL config must be a JSON object, found {type(config).__name__}")
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    vision = config.get("vision_config")
    is_original = (
        bool(_ORIGINAL_ARCHS.intersection(archs))
        or model_type == "internvl_chat"
        or (
            isinstance(config.get("llm_config"), Mapping)
            and isinstance(vision, Mapping)
            and bool(_ORIGINAL_VISION_FIELDS.intersection(vision))
        )
    )
    is_native = bool(_NATIVE_ARCHS.intersection(archs)) or model_type == "internvl"
    if is_original and is_native:
        raise CheckpointFormatError(
            f"config is ambiguous: it looks both original and native "
            f"(architectures={archs!r}, model_type={model_type!r}, keys={sorted(config)!r})"
        )
    if is_original:
        return ORIGINAL
    if is_native:
        return NATIVE
    raise CheckpointFormatError(
        "not an InternVL config: expected architectures InternVLChatModel (original) or "
        f"InternVLForConditionalGeneration / model_type 'internvl' (native); found architectures={archs!r}, "
        f"model_type={model_type!r}, top-level keys={sorted(config)!r}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Key renames
# ----------------------------------------------------------------------------------------------------------------

_LAYER = r"(\d+)"
_WB = r"(weight|bias)"

# LLM (Qwen2; q/k-norm accepted for Qwen3-style LLMs): identical names in both formats (on disk).
_LLM_PATTERNS = [
    re.compile(r"^language_model\.lm_head\.weight$"),
    re.compile(r"^language_model\.model\.embed_tokens\.weight$"),
    re.compile(r"^language_model\.model\.norm\.weight$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.o_proj\.weight$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.[qk]_norm\.weight$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$"),
]

# (original regex, native template, native regex, original template): 1:1 renames outside the LLM.
_RENAMES: list[tuple[str, str, str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "vision_tower.embeddings.cls_token",
     r"vision_tower\.embeddings\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"vision_model\.embeddings\.position_embedding", "vision_tower.embeddings.position_embeddings",
     r"vision_tower\.embeddings\.position_embeddings", "vision_model.embeddings.position_embedding"),
    (rf"vision_model\.embeddings\.patch_embedding\.{_WB}",
     "vision_tower.embeddings.patch_embeddings.projection.{0}",
     rf"vision_tower\.embeddings\.patch_embeddings\.projection\.{_WB}",
     "vision_model.embeddings.patch_embedding.{0}"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.attn\.proj\.{_WB}",
     "vision_tower.encoder.layer.{0}.attention.projection_layer.{1}",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.attention\.projection_layer\.{_WB}",
     "vision_model.encoder.layers.{0}.attn.proj.{1}"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.attn\.(q_norm|k_norm)\.weight",
     "vision_tower.encoder.layer.{0}.attention.{1}.weight",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.attention\.(q_norm|k_norm)\.weight",
     "vision_model.encoder.layers.{0}.attn.{1}.weight"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.ls1", "vision_tower.encoder.layer.{0}.lambda_1",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.lambda_1", "vision_model.encoder.layers.{0}.ls1"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.ls2", "vision_tower.encoder.layer.{0}.lambda_2",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.lambda_2", "vision_model.encoder.layers.{0}.ls2"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.norm1\.{_WB}",
     "vision_tower.encoder.layer.{0}.layernorm_before.{1}",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.layernorm_before\.{_WB}",
     "vision_model.encoder.layers.{0}.norm1.{1}"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.norm2\.{_WB}",
     "vision_tower.encoder.layer.{0}.layernorm_after.{1}",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.layernorm_after\.{_WB}",
     "vision_model.encoder.layers.{0}.norm2.{1}"),
    (rf"vision_model\.encoder\.layers\.{_LAYER}\.mlp\.(fc1|fc2)\.{_WB}",
     "vision_tower.encoder.layer.{0}.mlp.{1}.{2}",
     rf"vision_tower\.encoder\.layer\.{_LAYER}\.mlp\.(fc1|fc2)\.{_WB}",
     "vision_model.encoder.layers.{0}.mlp.{1}.{2}"),
    (rf"mlp1\.0\.{_WB}", "multi_modal_projector.layer_norm.{0}",
     rf"multi_modal_projector\.layer_norm\.{_WB}", "mlp1.0.{0}"),
    (rf"mlp1\.1\.{_WB}", "multi_modal_projector.linear_1.{0}",
     rf"multi_modal_projector\.linear_1\.{_WB}", "mlp1.1.{0}"),
    (rf"mlp1\.3\.{_WB}", "multi_modal_projector.linear_2.{0}",
     rf"multi_modal_projector\.linear_2\.{_WB}", "mlp1.3.{0}"),
]
_O2N = [(re.compile(f"^{o}$"), n) for o, n, _, _ in _RENAMES]
_N2O = [(re.compile(f"^{n}$"), o) for _, _, n, o in _RENAMES]

_ORIG_QKV = re.compile(rf"^vision_model\.encoder\.layers\.{_LAYER}\.attn\.qkv\.{_WB}$")
_NATIVE_QKV = re.compile(rf"^vision_tower\.encoder\.layer\.{_LAYER}\.attention\.(q|k|v)_proj\.{_WB}$")
_QKV_NATIVE_TMPL = "vision_tower.encoder.layer.{0}.attention.{1}_proj.{2}"
_QKV_ORIG_TMPL = "vision_model.encoder.layers.{0}.attn.qkv.{1}"

# in-memory (module) prefix -> on-disk prefix, for InternVLForConditionalGeneration
_MODULE_TO_DISK = [
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
]


def _is_llm_key(name: str) -> bool:
    return any(p.match(name) for p in _LLM_PATTERNS)


def normalize_native_key(name: str) -> str:
    """Map an in-memory native name (``model.vision_tower…``, ``model.language_model.…``, ``lm_head.weight``)
    to the on-disk name transformers writes; on-disk names are returned unchanged. No validation."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for src, dst in _MODULE_TO_DISK:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def native_key_to_module(name: str) -> str:
    """On-disk native name -> the parameter name inside ``InternVLForConditionalGeneration`` (in-memory names
    are returned unchanged)."""
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    for dst, src in _MODULE_TO_DISK:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def original_key_to_native(name: str) -> str | tuple[str, str, str]:
    """Rename one original-format key to its on-disk native name.

    The fused ``vision_model.encoder.layers.N.attn.qkv.{weight,bias}`` maps to three native keys: a tuple
    ``(q_proj, k_proj, v_proj)`` names is returned for it (rows ``[Q; K; V]``, see :func:`split_qkv`).
    Unknown keys raise KeyError naming the key.
    """
    m = _ORIG_QKV.match(name)
    if m:
        layer, kind = m.groups()
        return tuple(_QKV_NATIVE_TMPL.format(layer, p, kind) for p in "qkv")  # type: ignore[return-value]
    for pat, tmpl in _O2N:
        m = pat.match(name)
        if m:
            return tmpl.format(*m.groups())
    if _is_llm_key(name):
        return name
    raise KeyError(f"unknown original-format InternVL key: {name!r}")


def native_key_to_original(name: str) -> str:
    """Rename one native key (on-disk or in-memory) to its original-format name.

    ``attention.{q,k,v}_proj.*`` all map to the fused ``attn.qkv.*`` name (see :func:`merge_qkv`). Unknown keys
    raise KeyError naming the key.
    """
    disk = normalize_native_key(name)
    m = _NATIVE_QKV.match(disk)
    if m:
        layer, _, kind = m.groups()
        return _QKV_ORIG_TMPL.format(layer, kind)
    for pat, tmpl in _N2O:
        m = pat.match(disk)
        if m:
            return tmpl.format(*m.groups())
    if _is_llm_key(disk):
        return disk
    raise KeyError(f"unknown native-format InternVL key: {name!r}")


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused InternViT ``attn.qkv`` weight [3C, C] or bias [3C] into contiguous (q, k, v) copies.

    The rows are three equal blocks ``[Q; K; V]``, each head-major, so no per-head reordering is needed."""
    import torch

    if qkv.dim() == 0 or qkv.shape[0] % 3:
        raise ValueError(f"fused qkv tensor must have a leading dim divisible by 3, got shape {tuple(qkv.shape)}")
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in qkv.chunk(3, dim=0))  # type: ignore


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: concatenate rows ``[Q; K; V]``."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q/k/v must share shape and dtype to fuse, got {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} "
            f"{q.dtype}/{k.dtype}/{v.dtype}"
        )
    import torch

    return torch.cat([q, k, v], dim=0)


def _put(out: dict, key: str, value, source: str) -> None:
    if key in out:
        raise ValueError(f"two source keys map to {key!r} (second one: {source!r})")
    out[key] = value


def original_to_native_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-format state dict -> on-disk native names; splits each fused ``attn.qkv``. Tensors other than
    the split ones are passed through as the same objects (no copies, no casts)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        target = original_key_to_native(name)
        if isinstance(target, tuple):
            for tname, part in zip(target, split_qkv(tensor)):
                _put(out, tname, part, name)
        else:
            _put(out, target, tensor, name)
    return out


def native_to_original_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native state dict (on-disk or in-memory names) -> original-format names; fuses q/k/v into ``attn.qkv``.
    A q/k/v triple with a missing member raises KeyError naming the missing key."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    pending_src: dict[str, str] = {}
    for name, tensor in sd.items():
        target = native_key_to_original(name)
        m = _NATIVE_QKV.match(normalize_native_key(name))
        if m:
            if target in out:
                raise ValueError(f"two source keys map to {target!r} (second one: {name!r})")
            part = m.group(2)
            group = pending.setdefault(target, {})
            if part in group:
                raise ValueError(f"two source keys map to the {part}-block of {target!r} (second one: {name!r})")
            group[part] = tensor
            pending_src[target] = name
            if len(group) == 3:
                out[target] = merge_qkv(group["q"], group["k"], group["v"])
                del pending[target]
        else:
            _put(out, target, tensor, name)
    for target, group in pending.items():
        layer, kind = _ORIG_QKV.match(target).groups()  # type: ignore[union-attr]
        missing = [_QKV_NATIVE_TMPL.format(layer, p, kind) for p in "qkv" if p not in group]
        raise KeyError(f"cannot fuse {target!r}: missing {missing} (have {pending_src[target]!r})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------

# original top-level fields without a native counterpart, carried verbatim in the native config (transformers
# keeps unknown config attributes and writes them back) so that original -> native -> original is lossless.
CARRIED_TOP_LEVEL = (
    "template",
    "ps_version",
    "dynamic_image_size",
    "use_thumbnail",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "force_image_size",
)
# defaults written into an original config when the native one does not carry them (InternVL3 values)
ORIGINAL_TOP_LEVEL_DEFAULTS = {
    "template": "internvl2_5",
    "ps_version": "v2",
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
}
# vision fields with the same name in both formats
_VISION_SAME = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "norm_type",
    "num_channels",
    "initializer_range",
    "attention_dropout",
)
# original vision name -> native vision name
_VISION_RENAMED = {
    "qk_normalization": "use_qk_norm",
    "qkv_bias": "attention_bias",
    "initializer_factor": "layer_scale_init_value",
    "dropout": "projection_dropout",
}
_VISION_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "image_size", "patch_size", "norm_type", "qkv_bias", "qk_normalization")
_LLM_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "internlm3": "InternLM3ForCausalLM",
}


def _square(value, what: str) -> int:
    """int or [n, n] -> n."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointFormatError(f"{what} must be square, got {value!r}")
        value = value[0]
    return int(value)


def image_seq_length(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Tokens per tile after pixel shuffle: (image_size / patch)^2 * ratio^2 (256 at 448/14/0.5)."""
    grid = image_size // patch_size
    n = grid * grid * downsample_ratio * downsample_ratio
    if abs(n - round(n)) > 1e-6:
        raise CheckpointFormatError(f"grid {grid}x{grid} is not divisible by downsample ratio {downsample_ratio}")
    return int(round(n))


def original_config_to_native(cfg: Mapping, image_token_id: int | None = None) -> dict:
    """Original ``InternVLChatConfig`` dict -> native ``InternVLConfig`` dict (as transformers writes it).

    The image token id comes from ``cfg["img_context_token_id"]`` / ``cfg["image_token_id"]`` when present
    (original configs normally lack it: it lives in the tokenizer; pass ``image_token_id`` or use
    :func:`find_token_id`), else :data:`DEFAULT_IMAGE_TOKEN_ID`. ``llm_config`` becomes ``text_config`` with its
    fields unchanged (transformers reads legacy ``rope_theta``/``rope_scaling`` itself). The output always has
    ``tie_word_embeddings: false`` at the top level and in ``text_config``.
    """
    if detect_format(cfg) != ORIGINAL:
        raise ValueError("original_config_to_native() needs an original (InternVLChatModel) config")
    if "llm_config" not in cfg or "vision_config" not in cfg:
        raise CheckpointFormatError(f"original config lacks llm_config/vision_config (keys: {sorted(cfg)})")
    ocfg = copy.deepcopy(dict(cfg))
    ov = ocfg["vision_config"]
    missing = [k for k in _VISION_REQUIRED if k not in ov]
    if missing:
        raise CheckpointFormatError(f"original vision_config lacks {missing}")
    ps_version = ocfg.get("ps_version", "v2")
    if ps_version != "v2":
        raise CheckpointFormatError(f"ps_version {ps_version!r} is not supported (InternVL3 and the native model "
                                    "use 'v2')")
    image_size = _square(ov["image_size"], "vision_config.image_size")
    patch_size = _square(ov["patch_size"], "vision_config.patch_size")
    force = ocfg.get("force_image_size")
    if force is not None and int(force) != image_size:
        raise CheckpointFormatError(
            f"force_image_size {force} differs from vision_config.image_size {image_size}; the position "
            "embeddings would need resampling, which this converter does not do"
        )

    vision: dict = {"model_type": "internvl_vision"}
    for k in _VISION_SAME:
        if k in ov:
            vision[k] = ov[k]
    for ok, nk in _VISION_RENAMED.items():
        if ok in ov:
            vision[nk] = ov[ok]
    vision["image_size"] = [image_size, image_size]
    vision["patch_size"] = [patch_size, patch_size]
    if "drop_path_rate" in ov:  # no native counterpart (training only): carried for the way back
        vision["drop_path_rate"] = ov["drop_path_rate"]
    vision.setdefault("hidden_dropout_prob", 0.0)
    vision.update(use_mean_pooling=True, use_mask_token=False, use_absolute_position_embeddings=True)

    text = copy.deepcopy(ocfg["llm_config"])
    for k in ("auto_map", "_name_or_path", "_commit_hash"):
        text.pop(k, None)
    if isinstance(text.get("rope_parameters"), Mapping):
        # came from a native config via native_config_to_original, which derived these two from it
        text.pop("rope_theta", None)
        text.pop("rope_scaling", None)
    if "torch_dtype" in text and "dtype" not in text:  # transformers >= 5 spells it dtype
        text["dtype"] = text.pop("torch_dtype")
    text["tie_word_embeddings"] = False

    if image_token_id is None:
        image_token_id = ocfg.get("img_context_token_id", ocfg.get("image_token_id"))
    if image_token_id is None:
        image_token_id = DEFAULT_IMAGE_TOKEN_ID
    ratio = float(ocfg.get("downsample_ratio", 0.5))

    native: dict = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision,
        "text_config": text,
        "image_token_id": int(image_token_id),
        "image_seq_length": image_seq_length(image_size, patch_size, ratio),
        "downsample_ratio": ocfg.get("downsample_ratio", 0.5),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": ocfg.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    }
    dtype = ocfg.get("torch_dtype", ocfg.get("dtype"))
    if dtype is not None:
        native["dtype"] = dtype
    for k in CARRIED_TOP_LEVEL:
        if k in ocfg:
            native[k] = ocfg[k]
    return native


def native_config_to_original(cfg: Mapping) -> dict:
    """Native ``InternVLConfig`` dict -> original ``InternVLChatConfig`` dict (``architectures
    [InternVLChatModel]``, ``llm_config`` with ``architectures [Qwen2ForCausalLM]``, InternViT
    ``vision_config``, template/ps_version/... with InternVL3 defaults unless carried). The image token id is
    kept as ``img_context_token_id`` (an extra field the remote code ignores). No ``auto_map`` is written."""
    if detect_format(cfg) != NATIVE:
        raise ValueError("native_config_to_original() needs a native (InternVLForConditionalGeneration) config")
    ncfg = copy.deepcopy(dict(cfg))
    nv = ncfg.get("vision_config") or {}
    text = ncfg.get("text_config")
    if not isinstance(text, Mapping):
        raise CheckpointFormatError("native config lacks text_config")
    if ncfg.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointFormatError(f"projector_hidden_act {ncfg['projector_hidden_act']!r} has no original equivalent")
    if ncfg.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointFormatError(
            f"vision_feature_select_strategy {ncfg['vision_feature_select_strategy']!r} has no original "
            "equivalent (the original always drops CLS)"
        )
    if nv.get("use_mean_pooling") is False:
        raise CheckpointFormatError("vision_config.use_mean_pooling=false adds a final ViT LayerNorm the original "
                                    "lacks")
    image_size = _square(nv.get("image_size", 448), "vision_config.image_size")
    patch_size = _square(nv.get("patch_size", 14), "vision_config.patch_size")

    vision: dict = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"}
    for k in _VISION_SAME:
        if k in nv:
            vision[k] = nv[k]
    # native class defaults for fields a sparse native config may omit
    vision.setdefault("hidden_size", 1024)
    vision.setdefault("num_hidden_layers", 24)
    vision.setdefault("num_attention_heads", 16)
    vision.setdefault("intermediate_size", 4096)
    vision.setdefault("norm_type", "layer_norm")
    vision.setdefault("layer_norm_eps", 1e-6)
    vision.setdefault("hidden_act", "gelu")
    vision.setdefault("num_channels", 3)
    native_defaults = {"use_qk_norm": False, "attention_bias": False, "layer_scale_init_value": 0.1,
                       "projection_dropout": 0.0}
    for ok, nk in _VISION_RENAMED.items():
        vision[ok] = nv.get(nk, native_defaults[nk])
    vision["drop_path_rate"] = nv.get("drop_path_rate", 0.0)
    vision["image_size"] = image_size
    vision["patch_size"] = patch_size
    vision["use_flash_attn"] = False

    llm = copy.deepcopy(dict(text))
    llm["tie_word_embeddings"] = False
    if "dtype" in llm and "torch_dtype" not in llm:  # what the original (transformers 4.x) code reads
        llm["torch_dtype"] = llm.pop("dtype")
    if "architectures" not in llm:
        mt = llm.get("model_type", "qwen2")
        if mt not in _LLM_ARCH:
            raise CheckpointFormatError(f"no original LLM architecture known for text_config.model_type {mt!r}")
        llm["architectures"] = [_LLM_ARCH[mt]]
    rope = llm.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" not in llm and "rope_theta" in rope:
        # transformers >= 5 writes rope_parameters; the original remote code (transformers 4.x) reads these:
        llm["rope_theta"] = rope["rope_theta"]
        rtype = rope.get("rope_type", "default")
        if rtype != "default" and "rope_scaling" not in llm:
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            scaling["type"] = rtype
            llm["rope_scaling"] = scaling
        llm.setdefault("rope_scaling", None)

    original: dict = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "llm_config": llm,
        "vision_config": vision,
        "downsample_ratio": ncfg.get("downsample_ratio", 0.5),
        "select_layer": ncfg.get("vision_feature_layer", -1),
        "force_image_size": image_size,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "hidden_size": llm.get("hidden_size"),
        "tie_word_embeddings": False,
        "img_context_token_id": ncfg.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID),
    }
    for k, v in ORIGINAL_TOP_LEVEL_DEFAULTS.items():
        original[k] = ncfg.get(k, v)
    if "force_image_size" in ncfg:
        original["force_image_size"] = ncfg["force_image_size"]
    dtype = ncfg.get("dtype", ncfg.get("torch_dtype"))
    if dtype is not None:
        original["torch_dtype"] = dtype
    return original


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# ----------------------------------------------------------------------------------------------------------------

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The validated header of a .safetensors file and the offset where its data starts, naming the file on
    any problem (missing, truncated, corrupt)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file is missing: {path}") from None
    if size < 8:
        raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > size - 8:
            raise CheckpointFormatError(
                f"{path}: truncated safetensors file (header claims {hlen} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header: {e}") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header entry {name!r}") from None
    if 8 + hlen + end != size:
        raise CheckpointFormatError(
            f"{path}: truncated or corrupt safetensors file (tensor data needs {8 + hlen + end} bytes, file has "
            f"{size})"
        )
    return header, 8 + hlen


# safetensors dtype code -> torch dtype name (the numpy dtype of the same bytes is torch_file.NUMPY_DTYPES[name])
ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_dtype_name(code: str) -> str:
    """"BF16" -> "bfloat16"; an unknown code is returned as it is."""
    return ST_DTYPES.get(code, code)


def safetensors_array(mapped, entry: dict, data_start: int, start: int | None = None,
                      end: int | None = None) -> np.ndarray:
    """Rows [start, end) of one tensor (all rows by default) of a safetensors file mapped with `mmap`
    (`ACCESS_COPY`), as a numpy array over exactly those bytes of the mapping (bfloat16 as uint16): nothing
    is copied, and only the pages touched are read."""
    from mindspeed_mm.checkpoint.torch_file import NUMPY_DTYPES

    shape, dtype = list(entry["shape"]), NUMPY_DTYPES[ST_DTYPES[entry["dtype"]]]
    begin = data_start + int(entry["data_offsets"][0])
    if not shape:
        start, end = 0, 1
    start, end = (0 if start is None else start), (shape[0] if end is None and shape else end)
    row = 1
    for n in shape[1:]:
        row *= n
    out_shape = [end - start] + shape[1:]
    if (end - start) * row == 0:
        return np.empty(out_shape, dtype=dtype)
    t = np.frombuffer(mapped, dtype=dtype, count=(end - start) * row, offset=begin + start * row * dtype.itemsize)
    return t.reshape(out_shape if shape else [])


def read_safetensors(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys``) from one safetensors file; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    read_safetensors_header(path)  # validates: names the file if missing, truncated or corrupt
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else keys
            present = set(f.keys())
            for k in names:
                if k not in present:
                    raise CheckpointFormatError(f"{path}: tensor {k!r} (listed in the index) is not in this file")
                out[k] = f.get_tensor(k)
    except CheckpointFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointFormatError(f"{path}: cannot read safetensors file: {e}") from e
    return out


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file is missing: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: invalid JSON: {e}") from None


def find_token_id(hf_dir: str | os.PathLike, token: str = IMG_CONTEXT_TOKEN) -> int | None:
    """Look a (special) token's id up in the tokenizer files of a checkpoint dir, as data; None if not found."""
    hf_dir = Path(hf_dir)
    tok_json = hf_dir / "tokenizer.json"
    if tok_json.is_file():
        with open(tok_json, encoding="utf-8") as f:
            data = json.load(f)
        for entry in data.get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    tok_cfg = hf_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        with open(tok_cfg, encoding="utf-8") as f:
            data = json.load(f)
        for idx, entry in (data.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, Mapping) and entry.get("content") == token:
                return int(idx)
    added = hf_dir / "added_tokens.json"
    if added.is_file():
        with open(added, encoding="utf-8") as f:
            data = json.load(f)
        if token in data:
            return int(data[token])
    return None


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, read as data (no remote code is ever executed)."""
    return read_json(Path(hf_dir) / "config.json")


def load_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[dict, HFFormat, dict[str, torch.Tensor]]:
    """Read ``config.json`` (as data) and all safetensors weights of an HF InternVL3 checkpoint directory.

    Returns ``(config, format, state_dict)`` with the config and tensor names exactly as stored (the
    caller converts with the functions above). Single-file (``model.safetensors``) and sharded
    (``model.safetensors.index.json``) layouts are supported; a missing or truncated file raises an error
    naming it.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory does not exist: {hf_dir}")
    config = read_hf_config(hf_dir)
    fmt = detect_format(config)
    index_path = hf_dir / SAFE_INDEX
    single = hf_dir / SAFE_SINGLE
    state: dict[str, torch.Tensor] = {}
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointFormatError(f"{index_path}: no weight_map")
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        for fname in sorted(by_file):
            state.update(read_safetensors(hf_dir / fname, by_file[fname]))
    elif single.is_file() or single.exists():
        state = read_safetensors(single)
    else:
        others = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
        raise FileNotFoundError(f"checkpoint file is missing: {single} (and no {index_path.name}){hint}")
    return config, fmt, state
