"""Model spec (model_*.json / HF config.json) parsing, validation and TransformerConfig building."""
import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mindspeed_mm.models.internvl.hf.config import detect_format
from mindspeed_mm.config.model_spec import (
    InternVLSpec,
    ModelSpecError,
    RopeScaling,
    dump_model_spec,
    load_model_spec,
    to_dict,
)
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.config.transformer_configs import text_transformer_config, vision_transformer_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"


def _raw(name):
    return json.loads((EXAMPLES / name).read_text())


# ------------------------------------------------------------------------------------------------ examples

def test_8b_example_sizes():
    s = load_model_spec(EXAMPLES / "model_8B.json")
    v, p, t = s.vision, s.projector, s.text
    assert (v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert v.add_qkv_bias and not v.qk_layernorm and v.normalization == "LayerNorm"
    assert v.pipeline_num_layers == (24, 0, 0, 0) and v.freeze
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups) == (28, 3584, 28, 4)
    assert (t.ffn_hidden_size, t.vocab_size, t.kv_channels, t.rotary_base) == (18944, 151674, 128, 1e6)
    assert t.pipeline_num_layers == (6, 8, 8, 6)
    assert t.rope_scaling == RopeScaling("dynamic", 2.0)
    assert (p.vit_hidden_size, p.llm_hidden_size, p.input_size) == (1024, 3584, 4096)
    assert s.img_context_token_id == 151667 and s.tokens_per_tile == 256


def test_78b_example_sizes():
    s = load_model_spec(EXAMPLES / "model_78B.json")
    v, p, t = s.vision, s.projector, s.text
    assert (v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size) == (45, 3200, 25, 12800)
    assert not v.add_qkv_bias and v.qk_layernorm and v.normalization == "RMSNorm"
    assert v.pipeline_num_layers == (45, 0) and v.sequence_parallel is False
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups) == (80, 8192, 64, 8)
    assert t.ffn_hidden_size == 29568 and t.pipeline_num_layers == (40, 40)
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "uniform", 1)
    assert (p.vit_hidden_size, p.llm_hidden_size) == (3200, 8192)
    assert s.tokens_per_tile == 256


def test_tiny_example_is_the_tiny_checkpoint(tmp_path):
    """model_tiny.json describes the tiny checkpoint the demo and the tests write (preset vit300m)."""
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

    s = load_model_spec(EXAMPLES / "model_tiny.json")
    hf = spec_from_hf_dir(write_tiny_checkpoint(tmp_path / "hf", preset="vit300m"), params_dtype="fp32")
    assert s.tokens_per_tile == hf.tokens_per_tile == 4
    assert s.img_context_token_id == hf.img_context_token_id
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "add_qkv_bias",
                 "qk_layernorm", "normalization", "image_size", "patch_size"):
        assert getattr(s.vision, name) == getattr(hf.vision, name), name
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "rotary_base", "max_position_embeddings", "layernorm_epsilon"):
        assert getattr(s.text, name) == getattr(hf.text, name), name


@pytest.mark.parametrize("name", ["model_8B.json", "model_78B.json"])
def test_round_trip(name, tmp_path, caplog):
    s = load_model_spec(EXAMPLES / name)
    assert load_model_spec(to_dict(s)) == s
    dump_model_spec(s, tmp_path / "spec.json")
    with caplog.at_level(logging.WARNING):
        assert load_model_spec(tmp_path / "spec.json") == s
    assert not caplog.records  # our own output carries no dead keys


def test_reference_json_as_written_loads_with_one_warning(caplog):
    """The reference's files carry dead and duplicated keys: accepted, dead ones named in one warning."""
    raw = _raw("model_78B.json")
    raw.update(img_embedding_idx=1, add_rmsnorm_offset=False, add_text_encoder=False,
               text_encoder=None, video_encoder=None)
    raw["text_decoder"].update(
        num_key_value_heads=8, group_query_attention=True, bf16=True, use_fused_rotary_pos_emb=False,
        fp16_lm_cross_entropy=False, parallel_output=True, hidden_dropout=0.0, attention_dropout=0.0,
        reset_attention_mask=False)
    raw["image_encoder"]["vision_encoder"].update(
        q_layernorm="RMSNorm", k_layernorm="RMSNorm", pre_tockens=2147483647, next_tockens=2147483647,
        output_hidden_states=False, use_return_dict=False, fp16=False, bf16=True, hidden_dropout=0.0,
        attention_dropout=0.0, attention_softmax_in_fp32=False, select_layer=-1, ps_version="v2",
        downsample_ratio=0.5)
    with caplog.at_level(logging.WARNING, logger="mindspeed_mm.config.model_spec"):
        s = load_model_spec(raw)
    assert s == load_model_spec(EXAMPLES / "model_78B.json")
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    for key in ("img_embedding_idx", "text_decoder.parallel_output", "image_encoder.vision_encoder.pre_tockens",
                "image_encoder.vision_encoder.q_layernorm", "image_encoder.vision_encoder.attention_softmax_in_fp32"):
        assert key in msg


# ------------------------------------------------------------------------------------------------ errors

def _mutate(fn, name="model_8B.json"):
    raw = _raw(name)
    fn(raw)
    return raw


MALFORMED = {
    "unknown_key": (lambda r: r["text_decoder"].update(num_layer=28), "text_decoder.num_layer"),
    "unknown_nested_key": (lambda r: r["image_encoder"]["vision_encoder"].update(foo=1),
                           "image_encoder.vision_encoder.foo"),
    "wrong_type": (lambda r: r["text_decoder"].update(num_layers="28"), "text_decoder.num_layers"),
    "bool_is_not_int": (lambda r: r["image_encoder"]["vision_encoder"].update(num_layers=True),
                        "image_encoder.vision_encoder.num_layers"),
    # without kv_channels the head size is hidden / heads, which must divide (with it, any head count is legal)
    "hidden_mod_heads": (lambda r: (r["text_decoder"].pop("kv_channels", None),
                                    r["text_decoder"].update(num_attention_heads=27)),
                         "text_decoder.num_attention_heads"),
    "vit_hidden_mod_heads": (lambda r: r["image_encoder"]["vision_encoder"].update(num_attention_heads=15),
                             "image_encoder.vision_encoder.num_attention_heads"),
    "heads_mod_groups": (lambda r: r["text_decoder"].update(num_query_groups=3), "text_decoder.num_query_groups"),
    "kv_heads_alias_disagrees": (lambda r: r["text_decoder"].update(num_key_value_heads=7),
                                 "text_decoder.num_key_value_heads"),
    "projector_vit_size": (lambda r: r["image_encoder"]["vision_projector"].update(vit_hidden_size=3200),
                           "image_encoder.vision_projector.vit_hidden_size"),
    "projector_llm_size": (lambda r: r["image_encoder"]["vision_projector"].update(llm_hidden_size=4096),
                           "image_encoder.vision_projector.llm_hidden_size"),
    "projector_downsample": (lambda r: r["image_encoder"]["vision_projector"].update(downsample_ratio=0.25),
                             "image_encoder.vision_projector.downsample_ratio"),
    "image_not_multiple_of_patch": (lambda r: r["image_encoder"]["vision_encoder"].update(image_size=450),
                                    "image_encoder.vision_encoder.image_size"),
    "pipeline_sum": (lambda r: r["text_decoder"].update(pipeline_num_layers=[6, 8, 8, 5]),
                     "text_decoder.pipeline_num_layers"),
    "vit_pipeline_sum": (lambda r: r["image_encoder"]["vision_encoder"].update(pipeline_num_layers=[23, 0, 0, 0]),
                         "image_encoder.vision_encoder.pipeline_num_layers"),
    "pipeline_shapes_differ": (lambda r: r["image_encoder"]["vision_encoder"].update(pipeline_num_layers=[24, 0]),
                               "image_encoder.vision_encoder.pipeline_num_layers"),
    "post_layer_norm": (lambda r: r["image_encoder"]["vision_encoder"].update(post_layer_norm=True),
                        "image_encoder.vision_encoder.post_layer_norm"),
    "ps_version_v1": (lambda r: r.update(ps_version="v1"), "ps_version"),
    "vit_ps_version_v1": (lambda r: r["image_encoder"]["vision_encoder"].update(ps_version="v1"),
                          "image_encoder.vision_encoder.ps_version"),
    "select_layer": (lambda r: r.update(select_layer=-2), "select_layer"),
    "dropout": (lambda r: r["text_decoder"].update(hidden_dropout=0.1), "text_decoder.hidden_dropout"),
    "bf16_flag_disagrees": (lambda r: r["text_decoder"].update(bf16=False), "text_decoder.bf16"),
    "missing_required": (lambda r: r["text_decoder"].pop("vocab_size"), "text_decoder.vocab_size"),
    "token_outside_vocab": (lambda r: r.update(img_context_token_id=151674), "img_context_token_id"),
    "rope_scaling_type": (lambda r: r["text_decoder"].update(rope_scaling={"type": "linear", "factor": 2.0}),
                          "text_decoder.rope_scaling.type"),
    "rope_scaling_yarn": (lambda r: r["text_decoder"].update(rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), "text_decoder.rope_scaling.type"),
    "recompute_incomplete": (lambda r: r["text_decoder"].update(recompute_granularity="full"),
                             "text_decoder.recompute_method"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed(case):
    fn, key_path = MALFORMED[case]
    with pytest.raises(ModelSpecError) as exc:
        load_model_spec(_mutate(fn))
    assert key_path in str(exc.value)
    assert exc.value.key_path == key_path


def test_bad_json_syntax_names_file_and_position(tmp_path):
    bad = tmp_path / "model_bad.json"
    bad.write_text('{\n    "model_id": "InternVL3",\n    "select_layer": -1,\n}\n')
    with pytest.raises(ModelSpecError) as exc:
        load_model_spec(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "line 4" in msg and "column 1" in msg


def test_duplicate_key_rejected(tmp_path):
    bad = tmp_path / "dup.json"
    bad.write_text('{"model_id": "InternVL3", "model_id": "InternVL3"}')
    with pytest.raises(ModelSpecError, match="duplicate key 'model_id'"):
        load_model_spec(bad)


def test_error_from_file_names_file(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(_mutate(lambda r: r["image_encoder"]["vision_encoder"].update(post_layer_norm=True))))
    with pytest.raises(ModelSpecError, match=r"post_layer_norm: true .*\(in .*m\.json\)"):
        load_model_spec(f)


# ------------------------------------------------------------------------------------------------ HF configs

QWEN2_8B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=151674,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
    rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, tie_word_embeddings=False,
    initializer_range=0.02, torch_dtype="bfloat16")

ORIGINAL_8B = dict(
    architectures=["InternVLChatModel"], model_type="internvl_chat", torch_dtype="bfloat16",
    downsample_ratio=0.5, ps_version="v2", select_layer=-1, template="internvl2_5", dynamic_image_size=True,
    use_thumbnail=True, max_dynamic_patch=12, min_dynamic_patch=1, force_image_size=448,
    llm_config=QWEN2_8B,
    vision_config=dict(
        model_type="intern_vit_6b", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
        layer_norm_eps=1e-6, initializer_factor=0.1, drop_path_rate=0.0, image_size=448, patch_size=14,
        num_channels=3, hidden_act="gelu", initializer_range=0.02))

NATIVE_8B = dict(
    architectures=["InternVLForConditionalGeneration"], model_type="internvl", torch_dtype="bfloat16",
    image_token_id=151667, downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
    vision_feature_select_strategy="default", tie_word_embeddings=False,
    text_config={**QWEN2_8B, "architectures": ["Qwen2ForCausalLM"]},
    vision_config=dict(
        model_type="internvl_vision", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
        layer_norm_eps=1e-6, layer_scale_init_value=0.1, image_size=[448, 448], patch_size=[14, 14],
        num_channels=3, hidden_act="gelu", initializer_range=0.02))


def test_hf_formats_agree():
    assert detect_format(ORIGINAL_8B) == "original" and detect_format(NATIVE_8B) == "native"
    a, b = spec_from_hf_config(ORIGINAL_8B), spec_from_hf_config(NATIVE_8B)
    assert a == b
    ref = load_model_spec(EXAMPLES / "model_8B.json")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "add_qkv_bias",
                 "qk_layernorm", "normalization", "image_size", "patch_size"):
        assert getattr(a.vision, name) == getattr(ref.vision, name), name
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "vocab_size", "rotary_base", "rope_scaling", "max_position_embeddings"):
        assert getattr(a.text, name) == getattr(ref.text, name), name
    assert a.img_context_token_id == 151667 and a.tokens_per_tile == 256 and a.text.params_dtype == "bf16"


def test_hf_6b_vit_and_transformers5_rope():
    orig = copy.deepcopy(ORIGINAL_8B)
    orig["vision_config"].update(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                                 intermediate_size=12800, qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
    orig["llm_config"] = {k: v for k, v in QWEN2_8B.items() if k not in ("rope_theta", "rope_scaling")}
    orig["llm_config"]["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "dynamic", "factor": 2.0}
    s = spec_from_hf_config(orig, img_context_token_id=151667)
    assert s.vision.qk_layernorm and not s.vision.add_qkv_bias and s.vision.normalization == "RMSNorm"
    assert s.projector.vit_hidden_size == 3200 and s.text.rotary_base == 1e6
    assert s.text.rope_scaling == RopeScaling("dynamic", 2.0)


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_theta": 1e6, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
])
def test_hf_rope_scaling_we_do_not_implement_is_an_error(key, value):
    orig = copy.deepcopy(ORIGINAL_8B)
    orig["llm_config"] = {k: v for k, v in QWEN2_8B.items() if k not in ("rope_theta", "rope_scaling")}
    orig["llm_config"][key] = value
    with pytest.raises(ModelSpecError, match=r"^text_decoder\.rope_scaling\.type: '[a-z0-9]+' is not implemented"):
        spec_from_hf_config(orig, img_context_token_id=151667)


def test_hf_errors():
    with pytest.raises(ModelSpecError, match="image_token_id"):
        spec_from_hf_config(NATIVE_8B, img_context_token_id=5)
    with pytest.raises(ModelSpecError, match=r"^text_config\.model_type: 'llama' is not supported"):
        spec_from_hf_config({**ORIGINAL_8B, "llm_config": {**QWEN2_8B, "model_type": "llama",
                                                           "architectures": ["LlamaForCausalLM"]}})
    with pytest.raises(ModelSpecError, match=r"^text_config\.architectures: 'Qwen3ForCausalLM' disagrees"):
        spec_from_hf_config({**ORIGINAL_8B, "llm_config": {**QWEN2_8B, "architectures": ["Qwen3ForCausalLM"]}})
    with pytest.raises(ModelSpecError, match=r"^text_config\.attention_bias: true"):
        spec_from_hf_config({**NATIVE_8B, "text_config": {**NATIVE_8B["text_config"], "model_type": "qwen3",
                                                          "architectures": ["Qwen3ForCausalLM"],
                                                          "attention_bias": True}})


def test_hf_llm_kinds_and_tying():
    """The kind from either format's LLM config; tying from the flag each format's loader reads: the native
    top level (absent: tied, as transformers' InternVLConfig), the original llm_config."""
    assert not spec_from_hf_config(NATIVE_8B).text.tied
    assert spec_from_hf_config({**NATIVE_8B, "tie_word_embeddings": True}).text.tied
    assert spec_from_hf_config({k: v for k, v in NATIVE_8B.items() if k != "tie_word_embeddings"}).text.tied
    # text_config's flag is not what transformers reads
    assert not spec_from_hf_config({**NATIVE_8B, "text_config": {**NATIVE_8B["text_config"],
                                                                 "tie_word_embeddings": True}}).text.tied
    assert spec_from_hf_config({**ORIGINAL_8B, "llm_config": {**QWEN2_8B, "tie_word_embeddings": True}},
                               img_context_token_id=151667).text.tied
    qwen3 = {k: v for k, v in QWEN2_8B.items() if k != "model_type"}
    qwen3.update(architectures=["Qwen3ForCausalLM"], head_dim=128, hidden_size=1024, num_attention_heads=16)
    t = spec_from_hf_config({**ORIGINAL_8B, "llm_config": qwen3}, img_context_token_id=151667).text
    assert (t.model_id, t.kind, t.qk_layernorm, t.add_qkv_bias, t.kv_channels) == ("qwen3", "qwen3", True, False, 128)
    lm3 = {**QWEN2_8B, "architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "qkv_bias": False,
           "bias": False, "rms_norm_eps": 1e-5, "rope_theta": 5e7}
    t = spec_from_hf_config({**ORIGINAL_8B, "llm_config": lm3}, img_context_token_id=151667).text
    assert (t.kind, t.qk_layernorm, t.add_qkv_bias, t.layernorm_epsilon, t.rotary_base) == \
        ("internlm3", False, False, 1e-5, 5e7)


@pytest.mark.parametrize("model_id,key,value", [
    ("internllm", "qk_layernorm", True), ("qwen3", "qk_layernorm", False), ("internlm3", "add_qkv_bias", True),
    ("Qwen2.5llm", "add_qkv_bias", False), ("qwen3", "add_qkv_bias", True)])
def test_llm_kind_consistency(model_id, key, value):
    raw = json.loads((EXAMPLES / "model_8B.json").read_text())
    raw["text_decoder"].pop("add_qkv_bias")  # the 8B's true, left to the kind
    raw["text_decoder"].update(model_id=model_id, **{key: value})
    with pytest.raises(ModelSpecError, match=rf"^text_decoder\.{key}: {str(value).lower()} does not fit model_id"):
        load_model_spec(raw)


def test_kv_channels_need_not_divide_hidden():
    raw = json.loads((EXAMPLES / "model_8B.json").read_text())
    for key in ("add_qkv_bias", "qk_layernorm"):  # Qwen2's values; the qwen3 kind's defaults apply instead
        raw["text_decoder"].pop(key)
    raw["text_decoder"].update(model_id="qwen3", hidden_size=3584, num_attention_heads=24, num_query_groups=4,
                               kv_channels=128)
    t = load_model_spec(raw).text
    assert (t.kv_channels, t.qk_layernorm, t.add_qkv_bias, t.tied) == (128, True, False, False)
    raw["text_decoder"].pop("kv_channels")
    with pytest.raises(ModelSpecError, match=r"^text_decoder\.num_attention_heads: 24 does not divide"):
        load_model_spec(raw)


# ------------------------------------------------------------------------------------------------ TransformerConfigs

def test_transformer_configs_8b():
    s = load_model_spec(EXAMPLES / "model_8B.json")
    par = ParallelSizes(tp=2, pp=4, cp=2, sp=True, dp=1)
    assert par.world_size == 16
    vc, tc = vision_transformer_config(s, par), text_transformer_config(s, par)
    for c in (vc, tc):
        assert c.use_cpu_initialization and c.attention_softmax_in_fp32
        assert not (c.bias_activation_fusion or c.bias_dropout_fusion or c.masked_softmax_fusion
                    or c.apply_rope_fusion or c.gradient_accumulation_fusion or c.persist_layer_norm)
        assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
        assert c.tensor_model_parallel_size == 2 and c.pipeline_model_parallel_size == 4 and c.sequence_parallel
        assert c.params_dtype == torch.bfloat16 and c.bf16 and not c.qk_layernorm
    assert vc.num_layers == 24 and vc.context_parallel_size == 1 and vc.activation_func is F.gelu
    assert vc.add_bias_linear and vc.add_qkv_bias and not vc.gated_linear_unit
    assert vc.normalization == "LayerNorm" and vc.kv_channels == 64 and vc.num_query_groups == 16
    assert tc.num_layers == 28 and tc.context_parallel_size == 2 and tc.activation_func is F.silu
    assert tc.gated_linear_unit and not tc.add_bias_linear and tc.add_qkv_bias
    assert (tc.num_query_groups, tc.kv_channels, tc.layernorm_epsilon, tc.init_method_std) == (4, 128, 1e-6, 0.01)


def test_transformer_configs_78b_unaligned_vit():
    s = load_model_spec(EXAMPLES / "model_78B.json")
    par = ParallelSizes(tp=8, pp=2, sp=True, dp=2)
    vc = vision_transformer_config(s, par)
    assert vc.tensor_model_parallel_size == 8 and vc.num_attention_heads == 25  # unaligned TP
    assert not vc.sequence_parallel  # the spec keeps the ViT out of SP
    assert not vc.qk_layernorm  # the model applies InternViT's full-width qk-norm itself
    assert vc.normalization == "RMSNorm" and not vc.add_qkv_bias
    tc = text_transformer_config(s, par)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    assert tc.num_layers == 80 and tc.variable_seq_lengths and tc.sequence_parallel


def test_transformer_config_defaults_and_checks():
    s = load_model_spec(EXAMPLES / "model_8B.json")
    tc = text_transformer_config(s)  # parallel None: pp/vpp from the spec's layout
    assert tc.pipeline_model_parallel_size == 4 and tc.tensor_model_parallel_size == 1
    assert text_transformer_config(s, ParallelSizes(pp=4), bias_dropout_fusion=True).bias_dropout_fusion
    with pytest.raises(ModelSpecError, match="text_decoder.pipeline_num_layers"):
        text_transformer_config(s, ParallelSizes(pp=2))
    vpp = _mutate(lambda r: (r["text_decoder"].update(pipeline_num_layers=[[3, 4, 4, 3], [3, 4, 4, 3]]),
                             r["image_encoder"]["vision_encoder"].update(pipeline_num_layers=[[12, 0, 0, 0],
                                                                                              [12, 0, 0, 0]])))
    sv = load_model_spec(vpp)
    tc = text_transformer_config(sv, ParallelSizes(pp=4, vpp=2))
    assert tc.virtual_pipeline_model_parallel_size == 2
    assert text_transformer_config(sv).virtual_pipeline_model_parallel_size == 2


def test_parallel_sizes():
    assert ParallelSizes.from_world_size(16, tp=2, pp=2).dp == 4
    with pytest.raises(ValueError):
        ParallelSizes(tp=1, sp=True)
    with pytest.raises(ValueError):
        ParallelSizes.from_world_size(6, tp=4)
    assert isinstance(load_model_spec(EXAMPLES / "model_8B.json"), InternVLSpec)
