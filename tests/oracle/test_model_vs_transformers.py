"""Our InternVL3 against transformers' InternVLForConditionalGeneration on the same tiny random weights.

transformers' implementation is the oracle: we did not write it. Tolerances are the issue's: logits and
loss within 1e-5 (fp32), gradients within 1e-5 relative on every parameter.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm.checkpoint.hf_formats import load_hf_checkpoint, normalize_native_key
from mindspeed_mm.config.model_spec import spec_from_hf_config
from mindspeed_mm.models.internvl.hf_mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import ImageTokenMismatch, InternVLModel, load_full_state_dict, mean_loss
from mindspeed_mm.testing.tiny_checkpoint import load_native_model, write_tiny_checkpoint

TOL = 1e-5


def _unfrozen(spec):
    return dataclasses.replace(
        spec,
        vision=dataclasses.replace(spec.vision, freeze=False),
        projector=dataclasses.replace(spec.projector, freeze=False),
        text=dataclasses.replace(spec.text, freeze=False),
    )


@pytest.fixture(scope="module")
def megatron_world():
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    yield
    destroy_distributed()


@pytest.fixture(scope="module", params=["vit300m", "vit6b"])
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
    return load_native_model(hf_dir), ours, spec


def _sample(spec, tiles_per_image: list[int], text_len: int = 7, seed: int = 0) -> torch.Tensor:
    """Token ids: text, then per image <IMG_CONTEXT> x tokens_per_tile x tiles, then text."""
    g = torch.Generator().manual_seed(seed)
    img = spec.img_context_token_id

    def text(n):
        ids = torch.randint(0, spec.text.vocab_size, (n,), generator=g)
        return torch.where(ids == img, ids - 1, ids)

    parts = [text(text_len)]
    for tiles in tiles_per_image:
        parts += [torch.full((spec.tokens_per_tile * tiles,), img), text(3)]
    return torch.cat(parts)


def _pixels(spec, tiles: int, seed: int = 0) -> torch.Tensor | None:
    if tiles == 0:
        return None
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(tiles, 3, spec.vision.image_size, spec.vision.image_size, generator=g)


def _batch(spec, samples: list[list[int]]):
    """Right-padded batch of samples (each a list of tiles per image) + attention mask + labels."""
    seqs = [_sample(spec, s, text_len=5 + 4 * i, seed=i) for i, s in enumerate(samples)]
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    labels = torch.where((mask == 1) & (ids != spec.img_context_token_id), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100  # a prompt prefix without targets
    tiles = sum(sum(s) for s in samples)
    return ids, mask, labels, _pixels(spec, tiles)


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
    hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()
    mean_loss(ours(ids, pixels, labels=labels), labels).backward()

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
