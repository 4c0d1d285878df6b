"""Our InternVL3 against transformers' InternVLForConditionalGeneration on the same tiny random weights.

transformers' implementation is the oracle: we did not write it. Tolerances are the issue's: logits and
loss within 1e-5 (fp32), gradients within 1e-5 relative on every parameter. Every LLM kind (Qwen2, Qwen3 with
its q/k norms and a head_dim apart from hidden/heads, InternLM3) with both ViT kinds, and tied embeddings.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.keys import normalize_native_key
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config, spec_from_hf_dir
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import ImageTokenMismatch, InternVLModel, load_full_state_dict, mean_loss
from tests.helpers.batches import make_batch
from tests.helpers.device import on_test_device
from tests.helpers.oracle import hf_losses, load_native_model, use_dynamic_ntk_rope
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

TOL = 1e-5


def _unfrozen(spec):
    return dataclasses.replace(
        spec,
        vision=dataclasses.replace(spec.vision, freeze=False),
        projector=dataclasses.replace(spec.projector, freeze=False),
        text=dataclasses.replace(spec.text, freeze=False),
    )


# each LLM kind with each ViT kind, and tied embeddings
PRESETS = ["vit300m", "vit6b", "qwen3_vit300m", "qwen3_vit6b", "internlm3_vit300m", "internlm3_vit6b", "qwen3_tied",
           "qwen3_moe_vit300m", "qwen3_moe_vit6b"]


@pytest.fixture(scope="module", params=PRESETS)
def pair(request, tmp_path_factory, megatron_world):
    """(hf_model, our_model, spec) loaded from one tiny native checkpoint."""
    hf_dir = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", fmt="native",
                                   preset=request.param, seed=1)
    config, fmt, hf_state = load_hf_checkpoint(hf_dir)
    spec = _unfrozen(spec_from_hf_config(config))
    torch.manual_seed(0)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, hf_to_mm(hf_state, spec, fmt))
    ours.eval()
    return on_test_device(load_native_model(hf_dir), ours) + (spec,)


def hf_loss(hf, spec, ids, mask, pixels, labels):
    """transformers' loss; of a sparse LLM with its load-balancing loss as Qwen3MoeForCausalLM adds it
    (`load_balancing_loss_func` over every sparse layer's router logits, padding masked, times the coefficient)."""
    if not spec.text.moe:
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss, aux = hf_losses(hf, spec, ids, mask, pixels, labels)
    return loss + spec.text.moe_aux_loss_coeff * aux


def _batch(spec, samples):
    b = make_batch(spec, samples)
    return on_test_device(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])


CASES = {
    "one_tile": [[1]],
    "several_tiles": [[3]],
    "two_images": [[2, 1]],
    "batch_of_two_lengths": [[1], [2, 1]],
    "text_only": [[]],
    "mixed_text_and_image": [[], [2]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_match_transformers(pair, case):
    hf, ours, spec = pair
    ids, mask, labels, pixels = _batch(spec, CASES[case])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        logits = ours(ids, pixels)
        loss = mean_loss(ours(ids, pixels, labels=labels), labels)
    valid = mask.bool()
    diff = (logits[valid] - ref.logits[valid]).abs().max().item()
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"
    assert abs(loss.item() - ref.loss.item()) <= TOL, (loss.item(), ref.loss.item())


def test_gradients_match_transformers(pair):
    hf, ours, spec = pair
    ids, mask, labels, pixels = _batch(spec, CASES["batch_of_two_lengths"])
    hf.zero_grad()
    ours.zero_grad()
    hf_loss(hf, spec, ids, mask, pixels, labels).backward()
    mean_loss(ours(ids, pixels, labels=labels, attention_mask=mask), labels).backward()

    hf_grads = {normalize_native_key(n): p.grad for n, p in hf.named_parameters()}
    ref = hf_to_mm(hf_grads, spec, "native")
    checked = 0
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        scale = ref[name].abs().max().item()
        err = (p.grad - ref[name]).abs().max().item()
        assert err <= TOL * max(scale, 1e-3), f"{name}: max |grad diff| {err:.3g} vs max |grad| {scale:.3g}"
        checked += 1
    assert checked == len(ref)


def test_image_token_count_mismatch_is_an_error(pair):
    _, ours, spec = pair
    ids, _, _, pixels = _batch(spec, [[2]])
    with pytest.raises(ImageTokenMismatch, match="3 tiles"):
        ours(ids, torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ImageTokenMismatch, match="no pixel_values"):
        ours(ids, None)


def test_freeze_flags(pair):
    _, _, spec = pair
    frozen = InternVLModel(dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, freeze=True)))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("image_encoder.encoder.") for n in trainable)
    assert any(n.startswith("image_encoder.projector.") for n in trainable)


def test_converted_checkpoint_reproduces_transformers(megatron_world, tmp_path):
    """original-format HF -> mm-convert -> our model at TP1: transformers' logits (other layouts:
    tests/multirank/test_layouts.py loads converted shards at TP2 x PP2)."""
    from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm
    from mindspeed_mm.runtime.chunks import load_converted_weights

    hf_dir = write_tiny_checkpoint(tmp_path / "hf", fmt="original", preset="vit6b", seed=5)
    hf_to_mm(HFToMMConfig(mm_dir=str(tmp_path / "mm"), hf_config=HFConfig(hf_dir=str(hf_dir)), progress=False,
                          parallel_config=ParallelConfig(vit_pp_layers=[[2]], llm_pp_layers=[[2]])))
    spec = _unfrozen(spec_from_hf_dir(hf_dir))
    ours = InternVLModel(spec)
    load_converted_weights([ours], tmp_path / "mm")
    ours = on_test_device(ours)
    ids, mask, _, pixels = _batch(spec, CASES["batch_of_two_lengths"])
    with torch.no_grad():
        ref = on_test_device(load_native_model(hf_dir))(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        diff = (ours.eval()(ids, pixels)[mask.bool()] - ref[mask.bool()]).abs().max().item()
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"


# ------------------------------------------------------------------------------------------------------------
# rope_scaling: dynamic NTK (the reference JSON's and every InternVL3 config's {"type": "dynamic", "factor": 2.0})

ROPE_MAX_POS = 16


@pytest.fixture(scope="module")
def dynamic_rope_pair(tmp_path_factory, megatron_world):
    """(hf_dir, ours, ours_plain, spec) with max_position_embeddings 16 and dynamic NTK factor 2."""
    hf_dir = use_dynamic_ntk_rope(write_tiny_checkpoint(tmp_path_factory.mktemp("rope") / "hf", fmt="native",
                                                        preset="vit300m", seed=2), ROPE_MAX_POS, 2.0)
    config, fmt, hf_state = load_hf_checkpoint(hf_dir)
    spec = _unfrozen(spec_from_hf_config(config))
    assert spec.text.rope_scaling is not None and spec.text.rope_scaling.factor == 2.0
    models = []
    for s in (spec, dataclasses.replace(spec, text=dataclasses.replace(spec.text, rope_scaling=None))):
        m = InternVLModel(s)
        load_full_state_dict(m, hf_to_mm(hf_state, s, fmt))
        models.append(on_test_device(m.eval()))
    return hf_dir, models[0], models[1], spec


@pytest.mark.parametrize("case", ["long_text", "long_with_image", "short_text"])
def test_dynamic_ntk_rope_matches_transformers(dynamic_rope_pair, case):
    """Longer than max_position_embeddings: transformers' dynamic-NTK logits (and not plain RoPE's);
    shorter: plain RoPE's."""
    hf_dir, ours, plain, spec = dynamic_rope_pair
    # a fresh model per case: transformers' rotary module keeps the longest length's frequencies for later
    # shorter sequences still above max_position_embeddings (models/internvl/rope.py)
    hf = on_test_device(load_native_model(hf_dir))
    assert hf.config.text_config.rope_parameters["rope_type"] == "dynamic"
    g = torch.Generator().manual_seed(3)
    if case == "long_with_image":  # two lengths: the dynamic base follows the padded batch's length
        ids, mask, _, pixels = _batch(spec, [[3], [2, 1]])
    else:
        n = 40 if case == "long_text" else 10
        ids = torch.randint(0, spec.img_context_token_id, (2, n), generator=g)
        ids = on_test_device(ids)
        mask, pixels = torch.ones_like(ids), None
    assert (ids.shape[1] > ROPE_MAX_POS) == (case != "short_text")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got, got_plain = ours(ids, pixels), plain(ids, pixels)
    valid = mask.bool()
    diff = (got[valid] - ref[valid]).abs().max().item()
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"
    plain_diff = (got_plain[valid] - ref[valid]).abs().max().item()
    if case == "short_text":
        assert plain_diff <= TOL
    else:
        assert plain_diff > 100 * TOL, "the sequence is too short to tell dynamic NTK from plain RoPE"
