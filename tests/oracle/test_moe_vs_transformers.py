"""Qwen3-MoE's router figures against transformers': the load-balancing loss (transformers' load_balancing_loss_func
over every sparse layer's router logits, padding masked) and each layer's expert load (a recount of the top-k
choices of transformers' routers), on the tiny 8-expert top-2 presets (one with norm_topk_prob, one without).
Logits, the LM loss, gradients with the aux loss and greedy tokens are in test_model_vs_transformers.py and
test_generate_vs_transformers.py, parametrized by the same presets."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.config.model_spec import load_model_spec, to_dict
from mindspeed_mm.config.validate import ConfigError
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict, mean_loss
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from tests.helpers.batches import make_batch
from tests.helpers.oracle import hf_losses, hf_router_logits, load_native_model

TOL = 1e-5


@pytest.fixture(scope="module", params=["qwen3_moe_vit300m", "qwen3_moe_vit6b"])
def pair(request, tmp_path_factory, megatron_world):
    hf_dir = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", preset=request.param, seed=3)
    config, fmt, state = load_hf_checkpoint(hf_dir)
    spec = spec_from_hf_config(config)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, hf_to_mm(state, spec, fmt))
    return load_native_model(hf_dir), ours.eval(), spec


def _ours(ours, spec, samples):
    b = make_batch(spec, samples)
    ids, mask, labels, pixels = b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"]
    ours.moe_recorder.reset(1.0)
    loss = mean_loss(ours(ids, pixels, labels=labels, attention_mask=mask), labels)  # grad on: recorded
    return b, loss, ours.moe_recorder.last_report()


# two lengths in a batch: the shorter row's padding is masked, as transformers' attention mask masks it
@pytest.mark.parametrize("samples", [[[1]], [[2, 1], []], [[1], [3]]])
def test_load_balancing_loss_and_expert_load_match_transformers(pair, samples):
    hf, ours, spec = pair
    b, loss, report = _ours(ours, spec, samples)
    ids, mask, labels, pixels = b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"]
    with torch.no_grad():
        ref_loss, ref_aux = hf_losses(hf, spec, ids, mask, pixels, labels)
        _, logits = hf_router_logits(hf, ids, mask, pixels)
    assert abs(loss.item() - ref_loss.item()) <= TOL
    assert abs(float(report["aux"]) - ref_aux.item()) <= TOL * ref_aux.item(), (float(report["aux"]), ref_aux)
    t = spec.text
    valid = mask.reshape(-1).bool()
    for row, layer_logits in enumerate(logits):
        chosen = layer_logits.topk(t.moe_router_topk, dim=-1).indices[valid]
        recount = torch.bincount(chosen.reshape(-1), minlength=t.num_experts)
        assert report["load"][row].long().tolist() == recount.tolist(), (t.moe_layers[row], report["load"][row])
    assert report["load"].sum().item() == t.moe_router_topk * int(valid.sum()) * len(t.moe_layers)


def test_moe_fields_in_the_model_json(pair):
    _, _, spec = pair
    raw = to_dict(spec)
    assert load_model_spec(raw).text == spec.text
    t = raw["text_decoder"]
    assert (t["num_experts"], t["moe_router_topk"], t["mlp_only_layers"]) == (8, 2, [0])
    for key, value, words in (("moe_router_topk", 9, "moe_router_topk: 9 > num_experts 8"),
                              ("mlp_only_layers", [3], "mlp_only_layers: expected a list of layer indices in [0, 3)"),
                              ("num_experts", None, "num_experts: missing")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_model_spec({**raw, "text_decoder": {**t, key: value}})
    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['down_proj'\]: LoRA on the experts' MLPs"):
        load_model_spec({**raw, "text_decoder": {**t, "lora": lora}})
    dense = {**t, "model_id": "qwen3"}
    with pytest.raises(ConfigError, match="num_experts: is set, but model_id 'qwen3' is a dense LLM"):
        load_model_spec({**raw, "text_decoder": dense})
    assert dataclasses.replace(spec.text, mlp_only_layers=(0, 1, 2)).moe_layers == ()
