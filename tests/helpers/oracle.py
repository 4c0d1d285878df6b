"""Transformers' InternVLForConditionalGeneration loaded from either HF format: the oracle the tests (and the
benchmarks' baselines) compare against."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.config import NATIVE, find_token_id, native_tied, original_config_to_native
from mindspeed_mm.models.internvl.hf.keys import fuse_experts, native_key_to_module, original_to_native_state_dict
from mindspeed_mm.testing.tiny_checkpoint import check_tying, refresh_rope_buffers


def load_native_model(hf_dir: str | os.PathLike):
    """Load either HF format into transformers' ``InternVLForConditionalGeneration`` (fp32, eval, eager
    attention). Original checkpoints are converted in memory with the hf.keys functions; the image token id
    comes from the config or, failing that, from the tokenizer files in ``hf_dir``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf_dir = Path(hf_dir)
    config, fmt, state = load_hf_checkpoint(hf_dir)
    if fmt == NATIVE:
        model, info = InternVLForConditionalGeneration.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise RuntimeError(f"{hf_dir}: transformers could not load every weight: {bad}")
    else:
        token_id = config.get("img_context_token_id", config.get("image_token_id"))
        if token_id is None:
            token_id = find_token_id(hf_dir)
        native_cfg = original_config_to_native(config, image_token_id=token_id)
        cfg = InternVLConfig.from_dict(native_cfg)
        model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        native_sd = {native_key_to_module(k): v.float()
                     for k, v in fuse_experts(original_to_native_state_dict(state)).items()}
        missing, unexpected = model.load_state_dict(native_sd, strict=False)
        # tied: lm_head.weight is the embedding's second name, filled with it
        if unexpected or missing != (["lm_head.weight"] if cfg.tie_word_embeddings else []):
            raise RuntimeError(f"{hf_dir}: missing {missing}, unexpected {unexpected}")
    refresh_rope_buffers(model)
    check_tying(model, native_tied(native_cfg if fmt != NATIVE else config))
    return model.float().eval()


def use_dynamic_ntk_rope(hf_dir: str | os.PathLike, max_position_embeddings: int, factor: float) -> Path:
    """Rewrite a native tiny checkpoint's config in place: the LLM's ``max_position_embeddings`` and
    dynamic-NTK ``rope_parameters`` (same ``rope_theta``, same weights). Returns ``hf_dir``."""
    path = Path(hf_dir) / "config.json"
    config = json.loads(path.read_text())
    text = config["text_config"]
    text["max_position_embeddings"] = max_position_embeddings
    text["rope_parameters"] = {"rope_type": "dynamic", "factor": factor,
                               "rope_theta": text["rope_parameters"]["rope_theta"]}
    path.write_text(json.dumps(config))
    return Path(hf_dir)


def hf_losses(hf, spec, ids, mask, pixels, labels):
    """transformers' LM loss and load-balancing loss (InternVL's model output has no router logits: they are
    taken from each router, Qwen3MoeTopKRouter, as transformers' own output recorder takes them)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    loss, logits = hf_router_logits(hf, ids, mask, pixels, labels)
    t = spec.text
    assert len(logits) == len(t.moe_layers)
    return loss, load_balancing_loss_func(tuple(logits), t.num_experts, t.moe_router_topk, mask)


def hf_router_logits(hf, ids, mask, pixels, labels=None):
    """transformers' loss and every sparse layer's router logits [b*s, E], in layer order."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    logits = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: logits.append(out[0])) for m in hf.modules()
             if isinstance(m, Qwen3MoeTopKRouter)]
    try:
        loss = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    finally:
        for h in hooks:
            h.remove()
    return loss, logits
