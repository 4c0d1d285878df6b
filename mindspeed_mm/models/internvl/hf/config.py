"""The two HF InternVL3 config.json schemas: which one a file is, each into the other, and into our spec.

* ``original``: OpenGVLab's ``InternVLChatModel`` (``trust_remote_code``): ``llm_config`` / ``vision_config``.
* ``native``: transformers' ``InternVLForConditionalGeneration`` (``model_type: internvl``, the ``-hf`` repos):
  ``text_config`` / ``vision_config``.

Config files are read as JSON data, never as remote code; nothing here imports transformers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from mindspeed_mm.config.model_spec import (
    DEFAULT_IMG_CONTEXT_TOKEN_ID,
    IMG_CONTEXT_TOKEN,
    InternVLSpec,
    ModelSpecError,
    ProjectorSpec,
    TextDecoderSpec,
    VisionEncoderSpec,
    _rope_scaling_from_dict,
)
from mindspeed_mm.config.validate import ConfigError, parse_json
from mindspeed_mm.errors import CheckpointFormatError

ORIGINAL = "original"
NATIVE = "native"
HFFormat = Literal["original", "native"]



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
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "internlm3": "InternLM3ForCausalLM",
}


# LLM kinds (config.model_spec.LLM_KINDS) by the HF config's model_type
_KIND_MODEL_ID = {"qwen2": "internllm", "qwen3": "qwen3", "internlm3": "internlm3", "qwen3_moe": "qwen3_moe"}


def native_tied(cfg: Mapping) -> bool:
    """Whether transformers ties a native checkpoint's lm_head to its embeddings: only the TOP-LEVEL flag of
    ``InternVLConfig`` decides (``text_config``'s is ignored), and absent it is true."""
    return bool(cfg.get("tie_word_embeddings", True))


def original_tied(cfg: Mapping) -> bool:
    """Whether an original checkpoint's LLM ties lm_head: ``InternVLChatModel`` builds its LLM from
    ``llm_config``, whose flag decides (absent: false, the Qwen2, Qwen3 and InternLM3 configs' default)."""
    llm = cfg.get("llm_config")
    return bool(llm.get("tie_word_embeddings", False)) if isinstance(llm, Mapping) else False


def llm_model_type(llm: Mapping[str, Any], path: str) -> str:
    """The LLM's ``model_type``, from ``model_type`` or (original configs written without it) from
    ``architectures[0]``; the two must agree."""
    archs = llm.get("architectures") or []
    arch = archs[0] if isinstance(archs, (list, tuple)) and archs else None
    by_arch = {v: k for k, v in _LLM_ARCH.items()}.get(arch) if arch is not None else None
    model_type = llm.get("model_type")
    if model_type is None:
        if arch is not None and by_arch is None:
            raise ModelSpecError(f"{path}.architectures", f"{arch!r} is not a known LLM; expected one of "
                                 f"{sorted(_LLM_ARCH[k] for k in _KIND_MODEL_ID)}")
        model_type = by_arch or "qwen2"
    elif by_arch is not None and by_arch != model_type:
        raise ModelSpecError(f"{path}.architectures", f"{arch!r} disagrees with model_type {model_type!r}")
    return model_type


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
    :func:`find_token_id`), else :data:`DEFAULT_IMG_CONTEXT_TOKEN_ID`. ``llm_config`` becomes ``text_config`` with its
    fields unchanged (transformers reads legacy ``rope_theta``/``rope_scaling`` itself). The output says
    ``tie_word_embeddings`` explicitly at the top level and in ``text_config``: the LLM's flag (:func:`original_tied`).
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
        raise CheckpointFormatError(f"ps_version {ps_version!r} is not supported (InternVL3 and the native model use 'v2')")
    image_size = _square("vision_config.image_size", ov["image_size"])
    patch_size = _square("vision_config.patch_size", ov["patch_size"])
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
    tied = original_tied(ocfg)
    text["tie_word_embeddings"] = tied
    if "model_type" not in text:  # transformers builds the LLM by it
        text["model_type"] = llm_model_type(text, "llm_config")

    if image_token_id is None:
        image_token_id = ocfg.get("img_context_token_id", ocfg.get("image_token_id"))
    if image_token_id is None:
        image_token_id = DEFAULT_IMG_CONTEXT_TOKEN_ID
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
        "tie_word_embeddings": tied,  # the flag transformers' InternVLConfig ties by (see native_tied)
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
    [InternVLChatModel]``, ``llm_config`` with its kind's ``architectures`` (``Qwen2ForCausalLM``, ...) and the
    tie flag of the native config's top level (:func:`native_tied`), InternViT
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
        raise CheckpointFormatError("vision_config.use_mean_pooling=false adds a final ViT LayerNorm the original lacks")
    image_size = _square("vision_config.image_size", nv.get("image_size", 448))
    patch_size = _square("vision_config.patch_size", nv.get("patch_size", 14))

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
    tied = native_tied(ncfg)
    llm["tie_word_embeddings"] = tied
    if "dtype" in llm and "torch_dtype" not in llm:  # what the original (transformers 4.x) code reads
        llm["torch_dtype"] = llm.pop("dtype")
    if "architectures" not in llm:
        mt = llm.get("model_type", "qwen2")
        if mt not in _LLM_ARCH:
            raise CheckpointFormatError(f"no original LLM architecture known for text_config.model_type {mt!r}")
        llm["architectures"] = [_LLM_ARCH[mt]]
    if "model_type" not in llm:
        llm["model_type"] = llm_model_type(llm, "text_config")
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
        "tie_word_embeddings": tied,
        "img_context_token_id": ncfg.get("image_token_id", DEFAULT_IMG_CONTEXT_TOKEN_ID),
    }
    for k, v in ORIGINAL_TOP_LEVEL_DEFAULTS.items():
        original[k] = ncfg.get(k, v)
    if "force_image_size" in ncfg:
        original["force_image_size"] = ncfg["force_image_size"]
    dtype = ncfg.get("dtype", ncfg.get("torch_dtype"))
    if dtype is not None:
        original["torch_dtype"] = dtype
    return original


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, index), parsed as every JSON file is (`config.validate.parse_json`);
    a malformed one is a CheckpointFormatError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file is missing: {path}")
    try:
        return parse_json(path.read_text(encoding="utf-8"), str(path))
    except ConfigError as e:
        raise CheckpointFormatError(str(e)) from None


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


# --------------------------------------------------------------------------------------------------
# HF config.json (either format) -> spec
# --------------------------------------------------------------------------------------------------

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_NORMS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}


def _hf_get(cfg: Mapping[str, Any], path: str, key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise ModelSpecError(f"{path}.{key}", "missing in the HF config")
    return default


def _square(path: str, value: Any) -> int:
    """int or [n, n] -> n."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ModelSpecError(path, f"only square sizes are supported, got {value!r}")
        value = value[0]
    return value


def _hf_text(llm: Mapping[str, Any], path: str, params_dtype: str, tied: bool) -> TextDecoderSpec:
    """The LLM's spec from its HF config (transformers' Qwen2Config / Qwen3Config / InternLM3Config fields);
    ``tied``: whether the checkpoint's format ties lm_head (:func:`native_tied` / :func:`original_tied`)."""
    model_type = llm_model_type(llm, path)
    if model_type not in _KIND_MODEL_ID:
        raise ModelSpecError(f"{path}.model_type", f"{model_type!r} is not supported; expected one of "
                             f"{sorted(_KIND_MODEL_ID)} (Qwen2, Qwen3, Qwen3-MoE or InternLM3 LLMs)")
    act = _hf_get(llm, path, "hidden_act", "silu")
    if act != "silu":
        raise ModelSpecError(f"{path}.hidden_act", f"{act!r} is not supported; expected 'silu'")
    # Qwen3 and InternLM3 (transformers' Llama) put attention_bias on q, k, v AND o_proj, and InternLM3's
    # mlp_bias on the MLP: the kinds we build have none of these, so a true flag is another model.
    for key in ("attention_bias", "qkv_bias", "mlp_bias", "bias") if model_type != "qwen2" else ():
        if llm.get(key):
            raise ModelSpecError(f"{path}.{key}", f"true is not supported (a {model_type} LLM without biases)")
    if model_type in ("qwen3", "qwen3_moe") and llm.get("use_sliding_window"):
        raise ModelSpecError(f"{path}.use_sliding_window", "true is not supported (full causal attention only)")
    # rope: transformers 4 writes rope_theta / rope_scaling; transformers 5 writes rope_parameters.
    rope_params = llm.get("rope_parameters") or {}
    theta = llm.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_params.items() if k in ("rope_type", "type", "factor")}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    moe = {}
    if model_type == "qwen3_moe":
        # Qwen3MoeConfig's num_experts, written by transformers 5 under its attribute_map name
        experts = "num_experts" if "num_experts" in llm else "num_local_experts"
        moe = dict(num_experts=_hf_get(llm, path, experts), moe_router_topk=_hf_get(llm, path, "num_experts_per_tok"),
                   moe_ffn_hidden_size=_hf_get(llm, path, "moe_intermediate_size"),
                   norm_topk_prob=_hf_get(llm, path, "norm_topk_prob", False),
                   decoder_sparse_step=_hf_get(llm, path, "decoder_sparse_step", 1),
                   mlp_only_layers=_hf_get(llm, path, "mlp_only_layers", None) or (),
                   moe_aux_loss_coeff=_hf_get(llm, path, "router_aux_loss_coef", 0.001))
    return TextDecoderSpec(
        **moe,
        model_id=_KIND_MODEL_ID[model_type],
        num_layers=_hf_get(llm, path, "num_hidden_layers"),
        hidden_size=_hf_get(llm, path, "hidden_size"),
        ffn_hidden_size=_hf_get(llm, path, "intermediate_size"),
        num_attention_heads=_hf_get(llm, path, "num_attention_heads"),
        num_query_groups=_hf_get(llm, path, "num_key_value_heads", None),
        kv_channels=_hf_get(llm, path, "head_dim", None),
        vocab_size=_hf_get(llm, path, "vocab_size"),
        max_position_embeddings=_hf_get(llm, path, "max_position_embeddings"),
        rotary_base=theta,
        rope_scaling=_rope_scaling_from_dict(scaling) if scaling is not None else None,
        layernorm_epsilon=_hf_get(llm, path, "rms_norm_eps", 1e-6),
        init_method_std=_hf_get(llm, path, "initializer_range", 0.02),
        untie_embeddings_and_output_weights=not tied,
        params_dtype=params_dtype,
    )


def _hf_dtype(config: Mapping[str, Any], *subs: Mapping[str, Any]) -> str:
    for cfg in (config, *subs):
        for key in ("torch_dtype", "dtype"):
            if isinstance(cfg.get(key), str) and cfg[key] in _HF_DTYPES:
                return _HF_DTYPES[cfg[key]]
    return "bf16"


def spec_from_hf_config(config: Mapping[str, Any], *, img_context_token_id: Optional[int] = None,
                        params_dtype: Optional[str] = None) -> InternVLSpec:
    """Build a spec from an HF InternVL3 ``config.json`` dict in either format.

    An original-format config is first normalised to the native schema (``original_config_to_native``), so one parser
    reads both. The original format usually does not record the ``<IMG_CONTEXT>`` id (it lives in the
    tokenizer): pass ``img_context_token_id``, or use :func:`spec_from_hf_dir`. ``params_dtype`` defaults to
    the config's ``torch_dtype``/``dtype`` (else bf16). Training-only settings (pipeline layout, recompute,
    freeze) keep their defaults; change them with ``dataclasses.replace``.
    """
    if detect_format(config) == "original":
        config = original_config_to_native(config, image_token_id=img_context_token_id)  # keeps the LLM's tying
    llm, vpath, lpath = config["text_config"], "vision_config", "text_config"
    vc = config["vision_config"]
    dtype = params_dtype or _hf_dtype(config, llm)
    token = _hf_get(config, "", "image_token_id", DEFAULT_IMG_CONTEXT_TOKEN_ID)
    if img_context_token_id is not None and img_context_token_id != token:
        raise ModelSpecError("image_token_id", f"config says {token}, argument says {img_context_token_id}")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ModelSpecError("projector_hidden_act", f"{act!r} is not supported; expected 'gelu'")
    image_size = _square(f"{vpath}.image_size", _hf_get(vc, vpath, "image_size"))
    select_layer = config.get("vision_feature_layer", -1)
    ps_version = config.get("ps_version", "v2")
    # Absent keys take InternVLVisionConfig's defaults.
    qkv_bias = _hf_get(vc, vpath, "attention_bias", False)
    qk_norm = _hf_get(vc, vpath, "use_qk_norm", False)
    norm_type = _hf_get(vc, vpath, "norm_type", "layer_norm")
    ls_init = _hf_get(vc, vpath, "layer_scale_init_value", 0.1)
    drop_path = _hf_get(vc, vpath, "drop_path_rate", 0.0)
    if norm_type not in _HF_NORMS:
        raise ModelSpecError(f"{vpath}.norm_type", f"{norm_type!r} is not supported; expected {list(_HF_NORMS)}")
    act = _hf_get(vc, vpath, "hidden_act", "gelu")
    if act != "gelu":
        raise ModelSpecError(f"{vpath}.hidden_act", f"{act!r} is not supported; expected 'gelu'")
    vision = VisionEncoderSpec(
        num_layers=_hf_get(vc, vpath, "num_hidden_layers"),
        hidden_size=_hf_get(vc, vpath, "hidden_size"),
        ffn_hidden_size=_hf_get(vc, vpath, "intermediate_size"),
        num_attention_heads=_hf_get(vc, vpath, "num_attention_heads"),
        patch_size=_square(f"{vpath}.patch_size", _hf_get(vc, vpath, "patch_size")),
        image_size=image_size,
        num_channels=_hf_get(vc, vpath, "num_channels", 3),
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        normalization=_HF_NORMS[norm_type],
        layernorm_epsilon=_hf_get(vc, vpath, "layer_norm_eps", 1e-6),
        drop_path_rate=drop_path,
        initializer_factor=ls_init,
        init_method_std=_hf_get(vc, vpath, "initializer_range", 0.02),
        params_dtype=dtype,
    )
    text = _hf_text(llm, lpath, dtype, native_tied(config))
    return InternVLSpec(
        img_context_token_id=token,
        downsample_ratio=_hf_get(config, "", "downsample_ratio", 0.5),
        select_layer=select_layer,
        ps_version=ps_version,
        vision=vision,
        projector=ProjectorSpec(),
        text=text,
    )


def spec_from_hf_dir(hf_dir: Union[str, Path], config: Optional[Mapping[str, Any]] = None,
                     **kwargs: Any) -> InternVLSpec:
    """The spec of an HF checkpoint directory (either format); config.json is read as data (or given, when the
    caller has read it), and the original format's <IMG_CONTEXT> id is looked up in the directory's tokenizer
    files."""
    config = read_hf_config(hf_dir) if config is None else config
    if detect_format(config) == "original" and "img_context_token_id" not in kwargs:
        kwargs["img_context_token_id"] = config.get("img_context_token_id") or find_token_id(hf_dir)
    return spec_from_hf_config(config, **kwargs)
