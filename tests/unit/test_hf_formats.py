"""Pure tests of the two HF InternVL3 formats: key/state-dict/config mapping and checkpoint reading."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.config import (
    detect_format,
    find_token_id,
    native_config_to_original,
    original_config_to_native,
)
from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.keys import (
    native_key_to_module,
    native_key_to_original,
    native_to_original_state_dict,
    normalize_native_key,
    original_key_to_native,
    original_to_native_state_dict,
)

# An InternVL3-1B-style original config.json (values as published; only data).
ORIGINAL_CFG = {
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "hidden_size": 896,
    "llm_config": {
        "_name_or_path": "./pretrained/Qwen2.5-0.5B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "pad2square": False,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.1,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "use_flash_attn": True,
    },
}

# An InternVL3-1B-hf-style native config.json (as transformers 5 writes it).
NATIVE_CFG = {
    "architectures": ["InternVLForConditionalGeneration"],
    "downsample_ratio": 0.5,
    "dtype": "bfloat16",
    "image_seq_length": 256,
    "image_token_id": 151667,
    "model_type": "internvl",
    "projector_hidden_act": "gelu",
    "text_config": {
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "layer_types": ["full_attention"] * 24,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "dynamic", "factor": 2.0},
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "tie_word_embeddings": False,
    "vision_config": {
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": 1024,
        "image_size": [448, 448],
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "layer_scale_init_value": 0.1,
        "model_type": "internvl_vision",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": [14, 14],
        "projection_dropout": 0.0,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "use_qk_norm": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}


# ---------------------------------------------------------------------------------------------------------------
# synthetic state dicts


def _original_sd(style: str = "300m", layers: int = 2, dtype=torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    C, F, H, V, N = (32, 64, 48, 101, 16) if style == "300m" else (40, 64, 48, 101, 16)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {
        "vision_model.embeddings.class_embedding": r(1, 1, C),
        "vision_model.embeddings.position_embedding": r(1, N + 1, C),
        "vision_model.embeddings.patch_embedding.weight": r(C, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": r(C),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        sd[p + "attn.qkv.weight"] = r(3 * C, C)
        if style == "300m":
            sd[p + "attn.qkv.bias"] = r(3 * C)
            sd[p + "norm1.bias"] = r(C)
            sd[p + "norm2.bias"] = r(C)
        else:
            sd[p + "attn.q_norm.weight"] = r(C)
            sd[p + "attn.k_norm.weight"] = r(C)
        sd[p + "attn.proj.weight"] = r(C, C)
        sd[p + "attn.proj.bias"] = r(C)
        sd[p + "ls1"] = r(C)
        sd[p + "ls2"] = r(C)
        sd[p + "norm1.weight"] = r(C)
        sd[p + "norm2.weight"] = r(C)
        sd[p + "mlp.fc1.weight"] = r(F, C)
        sd[p + "mlp.fc1.bias"] = r(F)
        sd[p + "mlp.fc2.weight"] = r(C, F)
        sd[p + "mlp.fc2.bias"] = r(C)
    sd.update({
        "mlp1.0.weight": r(4 * C), "mlp1.0.bias": r(4 * C),
        "mlp1.1.weight": r(H, 4 * C), "mlp1.1.bias": r(H),
        "mlp1.3.weight": r(H, H), "mlp1.3.bias": r(H),
        "language_model.model.embed_tokens.weight": r(V, H),
        "language_model.model.norm.weight": r(H),
        "language_model.lm_head.weight": r(V, H),
    })
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (16, H)), ("self_attn.v_proj", (16, H))]:
            sd[p + n + ".weight"] = r(*shape)
            sd[p + n + ".bias"] = r(shape[0])
        sd[p + "self_attn.o_proj.weight"] = r(H, H)
        sd[p + "mlp.gate_proj.weight"] = r(F, H)
        sd[p + "mlp.up_proj.weight"] = r(F, H)
        sd[p + "mlp.down_proj.weight"] = r(H, F)
        sd[p + "input_layernorm.weight"] = r(H)
        sd[p + "post_attention_layernorm.weight"] = r(H)
    return sd


def _assert_sd_equal(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# detect_format


def test_detect_format():
    assert detect_format(ORIGINAL_CFG) == "original"
    assert detect_format(NATIVE_CFG) == "native"
    # original without architectures, recognised by llm_config + InternViT fields
    cfg = {"llm_config": {"model_type": "qwen2"}, "vision_config": {"qk_normalization": False}}
    assert detect_format(cfg) == "original"
    assert detect_format({"model_type": "internvl"}) == "native"
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        detect_format({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})
    with pytest.raises(ValueError, match="qwen2"):
        detect_format({"model_type": "qwen2"})


# ---------------------------------------------------------------------------------------------------------------
# keys

KEY_PAIRS = [
    ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embeddings.projection.weight"),
    ("vision_model.embeddings.patch_embedding.bias", "vision_tower.embeddings.patch_embeddings.projection.bias"),
    ("vision_model.encoder.layers.3.attn.proj.weight", "vision_tower.encoder.layer.3.attention.projection_layer.weight"),
    ("vision_model.encoder.layers.3.attn.proj.bias", "vision_tower.encoder.layer.3.attention.projection_layer.bias"),
    ("vision_model.encoder.layers.44.attn.q_norm.weight", "vision_tower.encoder.layer.44.attention.q_norm.weight"),
    ("vision_model.encoder.layers.44.attn.k_norm.weight", "vision_tower.encoder.layer.44.attention.k_norm.weight"),
    ("vision_model.encoder.layers.0.ls1", "vision_tower.encoder.layer.0.lambda_1"),
    ("vision_model.encoder.layers.0.ls2", "vision_tower.encoder.layer.0.lambda_2"),
    ("vision_model.encoder.layers.7.norm1.weight", "vision_tower.encoder.layer.7.layernorm_before.weight"),
    ("vision_model.encoder.layers.7.norm1.bias", "vision_tower.encoder.layer.7.layernorm_before.bias"),
    ("vision_model.encoder.layers.7.norm2.weight", "vision_tower.encoder.layer.7.layernorm_after.weight"),
    ("vision_model.encoder.layers.7.mlp.fc1.weight", "vision_tower.encoder.layer.7.mlp.fc1.weight"),
    ("vision_model.encoder.layers.7.mlp.fc2.bias", "vision_tower.encoder.layer.7.mlp.fc2.bias"),
    ("mlp1.0.weight", "multi_modal_projector.layer_norm.weight"),
    ("mlp1.0.bias", "multi_modal_projector.layer_norm.bias"),
    ("mlp1.1.weight", "multi_modal_projector.linear_1.weight"),
    ("mlp1.3.bias", "multi_modal_projector.linear_2.bias"),
    ("language_model.model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("language_model.model.layers.5.self_attn.k_proj.bias", "language_model.model.layers.5.self_attn.k_proj.bias"),
    ("language_model.model.layers.5.mlp.down_proj.weight", "language_model.model.layers.5.mlp.down_proj.weight"),
    ("language_model.model.norm.weight", "language_model.model.norm.weight"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),
]


@pytest.mark.parametrize("orig,native", KEY_PAIRS)
def test_key_renames_round_trip(orig, native):
    assert original_key_to_native(orig) == native
    assert native_key_to_original(native) == orig
    # in-memory module names are accepted and normalised
    module = native_key_to_module(native)
    assert normalize_native_key(module) == native
    assert native_key_to_original(module) == orig


def test_in_memory_names():
    assert native_key_to_module("language_model.lm_head.weight") == "lm_head.weight"
    assert native_key_to_module("language_model.model.norm.weight") == "model.language_model.norm.weight"
    assert native_key_to_module("vision_tower.embeddings.cls_token") == "model.vision_tower.embeddings.cls_token"
    assert normalize_native_key("model.multi_modal_projector.linear_1.bias") == "multi_modal_projector.linear_1.bias"
    assert native_key_to_original("lm_head.weight") == "language_model.lm_head.weight"


def test_qkv_key_mapping():
    names = original_key_to_native("vision_model.encoder.layers.2.attn.qkv.weight")
    assert names == tuple(f"vision_tower.encoder.layer.2.attention.{p}_proj.weight" for p in "qkv")
    for n in names:
        assert native_key_to_original(n) == "vision_model.encoder.layers.2.attn.qkv.weight"
    assert native_key_to_original("model.vision_tower.encoder.layer.2.attention.v_proj.bias") == (
        "vision_model.encoder.layers.2.attn.qkv.bias"
    )


@pytest.mark.parametrize(
    "key",
    [
        "vision_model.encoder.layers.0.attn.foo.weight",
        "language_model.model.layers.0.attention.wqkv.weight",  # InternLM-style LLM
        "mlp1.2.weight",  # GELU has no weights
        "something_else.weight",
    ],
)
def test_unknown_original_key_raises(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        original_key_to_native(key)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        original_to_native_state_dict({key: torch.zeros(1)})


@pytest.mark.parametrize(
    "key", ["vision_tower.encoder.layer.0.attention.qkv.weight", "model.multi_modal_projector.linear_3.weight"]
)
def test_unknown_native_key_raises(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        native_key_to_original(key)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        native_to_original_state_dict({key: torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# state dicts


@pytest.mark.parametrize("style", ["300m", "6b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_bit_exact(style, dtype):
    orig = _original_sd(style, dtype=dtype)
    native = original_to_native_state_dict(orig)
    assert not any("qkv" in k for k in native)
    C = orig["vision_model.embeddings.class_embedding"].shape[-1]
    qkv = orig["vision_model.encoder.layers.1.attn.qkv.weight"]
    for i, p in enumerate("qkv"):
        t = native[f"vision_tower.encoder.layer.1.attention.{p}_proj.weight"]
        assert t.shape == (C, C) and t.is_contiguous()
        assert torch.equal(t, qkv[i * C:(i + 1) * C])
    assert ("vision_tower.encoder.layer.0.attention.q_proj.bias" in native) == (style == "300m")
    fused = sum(1 for k in orig if ".attn.qkv." in k)
    assert fused == (4 if style == "300m" else 2)
    assert len(native) == len(orig) + 2 * fused  # each fused qkv becomes 3 tensors
    back = native_to_original_state_dict(native)
    _assert_sd_equal(back, orig)
    # native -> original -> native, also from in-memory names
    in_memory = {native_key_to_module(k): v for k, v in native.items()}
    assert "lm_head.weight" in in_memory and "model.language_model.norm.weight" in in_memory
    _assert_sd_equal(native_to_original_state_dict(in_memory), orig)
    _assert_sd_equal(original_to_native_state_dict(native_to_original_state_dict(native)), native)


def test_missing_qkv_member_raises():
    native = original_to_native_state_dict(_original_sd())
    del native["vision_tower.encoder.layer.1.attention.k_proj.weight"]
    with pytest.raises(KeyError, match=r"layer\.1\.attention\.k_proj\.weight"):
        native_to_original_state_dict(native)


def test_duplicate_targets_raise():
    native = original_to_native_state_dict(_original_sd())
    native["lm_head.weight"] = native["language_model.lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head"):
        native_to_original_state_dict(native)


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_original_config_to_native():
    n = original_config_to_native(ORIGINAL_CFG)
    assert detect_format(n) == "native"
    assert n["tie_word_embeddings"] is False and n["text_config"]["tie_word_embeddings"] is False
    assert n["image_token_id"] == 151667 and n["image_seq_length"] == 256
    assert n["vision_feature_layer"] == -1 and n["downsample_ratio"] == 0.5
    v = n["vision_config"]
    assert v["use_qk_norm"] is False and v["attention_bias"] is True and v["layer_scale_init_value"] == 1.0
    assert v["norm_type"] == "layer_norm" and v["image_size"] == [448, 448] and v["patch_size"] == [14, 14]
    assert n["text_config"]["rope_theta"] == 1e6 and n["text_config"]["vocab_size"] == 151674
    assert n["template"] == "internvl2_5" and n["ps_version"] == "v2" and n["max_dynamic_patch"] == 12
    assert original_config_to_native(ORIGINAL_CFG, image_token_id=7)["image_token_id"] == 7
    assert ORIGINAL_CFG["vision_config"]["qkv_bias"] is True  # input untouched


def test_original_config_round_trip_lossless():
    back = native_config_to_original(original_config_to_native(ORIGINAL_CFG))
    not_carried_top = {"auto_map"}  # remote-code pointers: never written (we never run remote code)
    for k, v in ORIGINAL_CFG.items():
        if k in not_carried_top or k in ("llm_config", "vision_config"):
            continue
        assert back[k] == v, k
    for k, v in ORIGINAL_CFG["llm_config"].items():
        if k == "_name_or_path":
            continue
        assert back["llm_config"][k] == v, k
    for k, v in ORIGINAL_CFG["vision_config"].items():
        if k == "use_flash_attn":  # a kernel switch of the remote code
            continue
        assert back["vision_config"][k] == v, k


def test_native_config_round_trip_lossless():
    orig = native_config_to_original(NATIVE_CFG)
    assert detect_format(orig) == "original"
    assert orig["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert orig["llm_config"]["rope_theta"] == 1e6
    assert orig["llm_config"]["rope_scaling"] == {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}
    assert orig["vision_config"]["qkv_bias"] is True and orig["vision_config"]["image_size"] == 448
    assert orig["template"] == "internvl2_5" and orig["force_image_size"] == 448
    assert orig["img_context_token_id"] == 151667 and orig["torch_dtype"] == "bfloat16"
    back = original_config_to_native(orig)
    # exactly the input, plus what the original format adds: its top-level preprocessing fields, the ViT
    # drop-path rate and the LLM architectures (both harmless extra attributes for transformers)
    carried = ("template", "ps_version", "dynamic_image_size", "use_thumbnail", "max_dynamic_patch",
               "min_dynamic_patch", "force_image_size")
    expected = NATIVE_CFG | {k: orig[k] for k in carried} | {
        "vision_config": NATIVE_CFG["vision_config"] | {"drop_path_rate": 0.0},
        "text_config": NATIVE_CFG["text_config"] | {"architectures": ["Qwen2ForCausalLM"]},
    }
    assert back == expected


def test_native_configs_build_in_transformers():
    from transformers import InternVLConfig

    for cfg in (original_config_to_native(ORIGINAL_CFG), NATIVE_CFG):
        c = InternVLConfig.from_dict(copy.deepcopy(cfg))
        assert c.tie_word_embeddings is False
        assert c.vision_config.use_qk_norm is False and c.vision_config.attention_bias is True
        assert c.text_config.rope_parameters["rope_theta"] == 1e6
        assert c.image_token_id == 151667


def test_config_errors():
    bad = copy.deepcopy(ORIGINAL_CFG)
    bad["ps_version"] = "v1"
    with pytest.raises(ValueError, match="ps_version"):
        original_config_to_native(bad)
    bad = copy.deepcopy(ORIGINAL_CFG)
    del bad["vision_config"]["qk_normalization"]
    with pytest.raises(ValueError, match="qk_normalization"):
        original_config_to_native(bad)
    with pytest.raises(ValueError):
        original_config_to_native(NATIVE_CFG)
    with pytest.raises(ValueError):
        native_config_to_original(ORIGINAL_CFG)


# ---------------------------------------------------------------------------------------------------------------
# reading a directory


def _write_dir(path, cfg, sd, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = list(sd)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_load_hf_checkpoint(tmp_path, shards):
    sd = _original_sd()
    _write_dir(tmp_path / "ck", ORIGINAL_CFG, sd, shards)
    cfg, fmt, loaded = load_hf_checkpoint(tmp_path / "ck")
    assert fmt == "original" and cfg == ORIGINAL_CFG
    _assert_sd_equal(loaded, sd)


def test_load_hf_checkpoint_errors(tmp_path):
    sd = _original_sd(layers=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(NATIVE_CFG))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)

    _write_dir(tmp_path / "single", NATIVE_CFG, original_to_native_state_dict(sd))
    f = tmp_path / "single" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointFormatError, match=str(f)):
        load_hf_checkpoint(tmp_path / "single")
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointFormatError, match=str(f)):
        load_hf_checkpoint(tmp_path / "single")

    _write_dir(tmp_path / "sharded", ORIGINAL_CFG, sd, shards=2)
    shard = tmp_path / "sharded" / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        load_hf_checkpoint(tmp_path / "sharded")


def test_find_token_id(tmp_path):
    assert find_token_id(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": 151667, "content": "<IMG_CONTEXT>"}], "model": {"vocab": {"a": 0}}})
    )
    assert find_token_id(tmp_path) == 151667
    assert find_token_id(tmp_path, "a") == 0
