"""Tiny random InternVL3 checkpoints: both formats, tokenizer, sharding, transformers as the oracle."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.keys import native_to_original_state_dict, original_to_native_state_dict
from mindspeed_mm.testing.tiny_checkpoint import (
    SPECIAL_TOKENS,
    TINY_PRESETS,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_vocab_size,
    write_tiny_checkpoint,
)
from tests.helpers.oracle import load_native_model

PRESETS = sorted(TINY_PRESETS)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{(preset, fmt): dir} for seed 0; original written sharded."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for preset in PRESETS:
        out[preset, "native"] = write_tiny_checkpoint(root / f"{preset}-native", "native", preset, seed=0)
        out[preset, "original"] = write_tiny_checkpoint(
            root / f"{preset}-original", "original", preset, seed=0, max_shard_bytes=40_000
        )
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _inputs(tokenizer, n_tiles: int = 2, seed: int = 1):
    prompt = (
        "<|im_start|>system\n你是书生·万象<|im_end|>\n<|im_start|>user\n<img>"
        + "<IMG_CONTEXT>" * (4 * n_tiles)
        + "</img>\nDescribe the image. 请描述图片。<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    pixels = torch.randn(n_tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    return ids, pixels


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    n = 319
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    assert len(tokenizer) == 332 and tiny_vocab_size(len(tokenizer)) == 333
    build_tiny_tokenizer(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(reloaded) == len(tokenizer)
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == "<|endoftext|>"
    assert reloaded("<IMG_CONTEXT>")["input_ids"] == [324]
    assert reloaded("<img><IMG_CONTEXT><IMG_CONTEXT></img>")["input_ids"] == [322, 324, 324, 323]
    # named extra tokens transformers' InternVL processor reads
    assert reloaded.start_image_token == "<img>" and reloaded.end_image_token == "</img>"
    assert reloaded.context_image_token == "<IMG_CONTEXT>" and reloaded.context_image_token_id == 324
    assert reloaded.video_token == "<video>"
    text = "<|im_start|>system\n你是书生·万象，英文名是InternVL。<|im_end|>\nHello world 123"
    ids = reloaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] and reloaded.decode(ids) == text
    assert max(tokenizer("The quick brown fox")["input_ids"]) >= 256  # merges are used
    # deterministic training
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_presets(tokenizer):
    a, b = TINY_PRESETS["vit300m"], TINY_PRESETS["vit6b"]
    assert (a.vit_hidden, a.vit_heads, a.vit_norm, a.vit_qkv_bias, a.vit_qk_norm) == (32, 4, "layer_norm", True, False)
    assert (b.vit_hidden, b.vit_heads, b.vit_norm, b.vit_qkv_bias, b.vit_qk_norm) == (40, 5, "rms_norm", False, True)
    assert b.vit_heads % 2 == 1 and b.vit_hidden // b.vit_heads == 8
    m = build_tiny_model("vit6b", tokenizer=tokenizer)
    assert m.config.text_config.vocab_size == 333 and m.config.text_config.vocab_size % 2 == 1
    assert m.config.image_token_id == 324 and m.config.image_seq_length == 4
    names = dict(m.named_parameters())
    assert "model.vision_tower.encoder.layer.0.attention.q_norm.weight" in names
    assert "model.vision_tower.encoder.layer.0.attention.q_proj.bias" not in names
    assert "model.vision_tower.encoder.layer.0.layernorm_before.bias" not in names  # RMSNorm


@pytest.mark.parametrize("preset", PRESETS)
def test_original_and_native_identical(ckpts, tokenizer, preset):
    native_dir, original_dir = ckpts[preset, "native"], ckpts[preset, "original"]
    assert (original_dir / "model.safetensors.index.json").is_file()
    cfg = json.loads((original_dir / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["template"] == "internvl2_5"
    p = TINY_PRESETS[preset]
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "internlm3": "InternLM3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}[p.llm]
    assert cfg["llm_config"]["architectures"] == [arch]
    assert cfg["llm_config"]["tie_word_embeddings"] is p.tied
    assert "auto_map" not in cfg and cfg["ps_version"] == "v2"

    mn, mo = load_native_model(native_dir), load_native_model(original_dir)
    head_dim = p.llm_head_dim or p.llm_hidden // p.llm_heads
    expected_inv_freq = 1.0 / (p.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    for m in (mn, mo):
        assert torch.equal(m.model.language_model.rotary_emb.inv_freq, expected_inv_freq)
    sn, so = mn.state_dict(), mo.state_dict()
    assert sn.keys() == so.keys()
    for k in sn:
        assert torch.equal(sn[k], so[k]), k
    ids, pixels = _inputs(tokenizer)
    ln, lo = _logits(mn, ids, pixels), _logits(mo, ids, pixels)
    assert ln.shape == (1, ids.shape[1], 333)
    assert torch.equal(ln, lo)
    # logits O(1), softmax not saturated
    assert 0.3 < ln.std().item() < 5 and torch.softmax(ln, -1).max().item() < 0.9


def test_weights_on_disk_agree(ckpts):
    for preset in PRESETS:
        cn, fn, sdn = load_hf_checkpoint(ckpts[preset, "native"])
        co, fo, sdo = load_hf_checkpoint(ckpts[preset, "original"])
        assert (fn, fo) == ("native", "original")
        converted = original_to_native_state_dict(sdo)
        assert converted.keys() == sdn.keys()
        assert all(torch.equal(converted[k], sdn[k]) for k in sdn)
        back = native_to_original_state_dict(sdn)
        assert back.keys() == sdo.keys() and all(torch.equal(back[k], sdo[k]) for k in sdo)


def test_native_on_disk_names_and_untied(ckpts):
    from safetensors import safe_open
    from transformers import InternVLForConditionalGeneration

    d = ckpts["vit300m", "native"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert "vision_tower.encoder.layer.0.attention.q_proj.bias" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    assert not any(k.startswith("model.") or k == "lm_head.weight" for k in keys)

    m = InternVLForConditionalGeneration.from_pretrained(str(d))
    head, emb = m.lm_head.weight, m.model.language_model.embed_tokens.weight
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert torch.equal(head, f.get_tensor("language_model.lm_head.weight"))


def test_every_parameter_randomized(tokenizer):
    m = build_tiny_model("vit300m", seed=0, tokenizer=tokenizer)
    for name, p in m.named_parameters():
        flat = p.detach().flatten()
        assert flat.numel() == 1 or flat.std() > 0, name  # no constant init left
        assert not torch.all(flat == 0), name
    lam = m.model.vision_tower.encoder.layer[0].lambda_1
    assert not torch.allclose(lam, torch.full_like(lam, 0.1))


def test_mapping_mistakes_change_logits(tokenizer):
    """The random weights are informative: typical mapping bugs change the logits."""
    m = build_tiny_model("vit6b", seed=0, tokenizer=tokenizer)
    ids, pixels = _inputs(tokenizer, n_tiles=1)
    ref = _logits(m, ids, pixels)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    p = "model.vision_tower.encoder.layer.1."
    mistakes = [
        (p + "attention.q_proj.weight", p + "attention.k_proj.weight"),  # q/k block order
        # (swapping q_norm and k_norm weights of one layer is NOT a detectable mistake: the full-width qk RMSNorm
        # makes each score sum_d wq[d] q^[d] * wk[d] k^[d], symmetric in wq and wk. A layer mix-up is.)
        (p + "attention.q_norm.weight", "model.vision_tower.encoder.layer.0.attention.q_norm.weight"),
        (p + "layernorm_before.weight", p + "layernorm_after.weight"),
        (p + "lambda_1", p + "lambda_2"),
        ("model.language_model.layers.0.self_attn.k_proj.bias", "model.language_model.layers.0.self_attn.v_proj.bias"),
    ]
    for a, b in mistakes:
        bad = dict(sd)
        bad[a], bad[b] = sd[b], sd[a]
        m.load_state_dict(bad)
        assert not torch.allclose(_logits(m, ids, pixels), ref, atol=1e-3), (a, b)
    m.load_state_dict(sd)
    assert torch.equal(_logits(m, ids, pixels), ref)


def test_seed_changes_weights(tokenizer):
    a = build_tiny_model("vit300m", seed=0, tokenizer=tokenizer).state_dict()
    b = build_tiny_model("vit300m", seed=0, tokenizer=tokenizer).state_dict()
    c = build_tiny_model("vit300m", seed=1, tokenizer=tokenizer).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_sharded_native_and_bf16(tmp_path, tokenizer):
    d = write_tiny_checkpoint(tmp_path / "n", "native", "vit6b", seed=3, dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, fmt, sd = load_hf_checkpoint(d)
    assert fmt == "native" and all(t.dtype == torch.bfloat16 for t in sd.values())
    o = write_tiny_checkpoint(tmp_path / "o", "original", "vit6b", seed=3, dtype=torch.bfloat16)
    assert (o / "model.safetensors").is_file() and not (o / "model.safetensors.index.json").exists()
    assert json.loads((o / "config.json").read_text())["torch_dtype"] == "bfloat16"
    mn, mo = load_native_model(d), load_native_model(o)
    ids, pixels = _inputs(tokenizer, n_tiles=1)
    assert torch.equal(_logits(mn, ids, pixels), _logits(mo, ids, pixels))


def test_truncated_file_names_it(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "t", "original", "vit300m", max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointFormatError, match=shard.name):
        load_hf_checkpoint(d)
    with pytest.raises(CheckpointFormatError, match=shard.name):
        load_native_model(d)


def test_atomic_write_and_existing_dir(tmp_path):
    out = tmp_path / "ck"
    write_tiny_checkpoint(out, "native")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp dir left beside it
    with pytest.raises(FileExistsError):
        write_tiny_checkpoint(out, "original")
    write_tiny_checkpoint(out, "original", overwrite=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLChatModel"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    with pytest.raises(ValueError, match="preset"):
        write_tiny_checkpoint(tmp_path / "bad", "native", preset="nope")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_cli(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "convert" / "make_tiny_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cli"
    assert mod.main(["--out", str(out), "--format", "original", "--preset", "vit6b", "--seed", "2",
                     "--max-shard-bytes", "30000"]) == 0
    cfg, fmt, sd = load_hf_checkpoint(out)
    assert fmt == "original" and cfg["vision_config"]["num_attention_heads"] == 5
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()


def test_original_without_token_id_uses_tokenizer(tmp_path):
    """Real original configs do not record the <IMG_CONTEXT> id: it is then read from the tokenizer files."""
    d = write_tiny_checkpoint(tmp_path / "o", "original", "vit300m")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("img_context_token_id") == 324
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_native_model(d).config.image_token_id == 324
