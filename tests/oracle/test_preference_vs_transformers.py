"""Preference training's numbers on one rank against code we did not write: each pair's sequence
log-probabilities against transformers' (the sum of its label tokens' log-probabilities, from the same
micro-batch of the tiny MMPR pairs with their images), and the micro-batch's MPO loss, as the training loss
function computes it from our model's output, against TRL's DPOTrainer loss on transformers' log-probabilities
(loss types sigmoid + bco_pair + sft, weights 0.8, 0.2, 1.0: InternVL3's MPO), with its gradient."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict
from tests.helpers.oracle import load_native_model

trl_oracle = pytest.importorskip("tests.unit.test_preference_loss")

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_world):
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.data.collate import collate_internvl
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.tokenizer import load_tokenizer
    from mindspeed_mm.testing.tiny_run import prepare_tiny_preference_run

    run = prepare_tiny_preference_run(tmp_path_factory.mktemp("pref_oracle"), preset="vit6b", seed=2)
    config, fmt, state = load_hf_checkpoint(run.hf_dir)
    spec = spec_from_hf_config(config)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, hf_to_mm(state, spec, fmt))
    ours.eval()
    data_spec = load_data_spec(run.data_json)
    tokenizer = load_tokenizer(data_spec.tokenizer_config, spec.img_context_token_id)
    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=512, tokens_per_tile=spec.tokens_per_tile)
    # three pairs: one image, two images, and text only
    picks = [0, 9, len(dataset) - 1]
    batch = collate_internvl([dataset[i] for i in picks], pad_id=0)
    return SimpleNamespace(hf=load_native_model(run.hf_dir), ours=ours, spec=spec, batch=batch)


def hf_token_logps(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' log-probability of each next token [2P, S-1] (0 off target), and the target mask [2P, S]."""
    b = setup.batch
    out = setup.hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                   pixel_values=b["pixel_values"])
    logps = torch.log_softmax(out.logits.float(), -1)[:, :-1]
    targets = b["labels"][:, 1:]
    mask = targets != -100
    per_token = torch.gather(logps, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    completion = torch.zeros_like(b["labels"])
    completion[:, 1:] = mask.long()
    return per_token, completion


def test_sequence_logps_equal_transformers(setup):
    from mindspeed_mm.training.preference import sequence_logps

    b = setup.batch
    assert b["num_pairs"] == 3 and b["input_ids"].shape[0] == 6
    with torch.no_grad():
        theirs = hf_token_logps(setup)[0].sum(1)
        ours = sequence_logps(setup.ours(b["input_ids"], b["pixel_values"], labels=b["labels"],
                                         image_flags=b["image_flags"]))
    torch.testing.assert_close(ours, theirs.double().float(), rtol=TOL, atol=TOL)
    assert (theirs[:3] != theirs[3:]).all()


@pytest.mark.parametrize("loss_type,weights,rpo", [("sigmoid", None, None), ("sigmoid,bco_pair", "0.8,0.2", 1.0)])
def test_mpo_loss_and_gradient_equal_trl(setup, loss_type, weights, rpo):
    from mindspeed_mm.training.preference import preference_loss
    from mindspeed_mm.training.preference_loss import PreferenceConfig

    b, p = setup.batch, 3
    cfg = PreferenceConfig.from_flags(loss_type, weights, 0.1, 0.0, rpo)
    hf_per_token, completion = hf_token_logps(setup)
    ref = hf_per_token.detach().sum(1) + torch.tensor([1.5, -0.5, 2.0, -1.0, 0.7, 0.3])  # a reference elsewhere
    types = loss_type.split(",") + (["sft"] if rpo else [])
    wts = [float(w) for w in weights.split(",")] + [rpo] if weights else None
    theirs, _ = trl_oracle.trl_loss(SimpleNamespace(completion=completion, per_token=hf_per_token,
                                                    policy=hf_per_token.sum(1), ref=ref, p=p), types, 0.1, wts)
    chosen_tokens = float(completion[:p].sum())
    setup.ours.zero_grad()
    out = setup.ours(b["input_ids"], b["pixel_values"], labels=b["labels"], image_flags=b["image_flags"])
    loss, reported = preference_loss(cfg, {"pairs": p, "chosen_tokens": chosen_tokens, "scale": 1.0}, ref,
                                     b["labels"], out)
    assert abs(loss.item() - theirs.item()) <= TOL * max(1.0, abs(theirs.item())), (loss.item(), theirs.item())
    assert reported["lm loss"][0].item() == pytest.approx(theirs.item(), rel=TOL)
    # the gradient of TRL's loss through transformers' model, against ours through our model
    loss.backward()
    setup.hf.zero_grad()
    hf_per_token, _ = hf_token_logps(setup)
    theirs, _ = trl_oracle.trl_loss(SimpleNamespace(completion=completion, per_token=hf_per_token,
                                                    policy=hf_per_token.sum(1), ref=ref, p=p), types, 0.1, wts)
    theirs.backward()
    from mindspeed_mm.models.internvl.hf.keys import normalize_native_key

    ref_grads = hf_to_mm({normalize_native_key(n): q.grad for n, q in setup.hf.named_parameters()
                          if q.grad is not None}, setup.spec, "native")
    checked = 0
    for name, q in setup.ours.named_parameters():
        if name in ref_grads and q.grad is not None:
            scale = ref_grads[name].abs().max().item()
            err = (q.grad - ref_grads[name]).abs().max().item()
            assert err <= 1e-4 * max(scale, 1e-3), f"{name}: {err:.3g} vs {scale:.3g}"
            checked += 1
    assert checked > 20


def test_reference_fingerprint_sees_one_flipped_bit(setup):
    """The end-of-run check that the frozen reference copy is bit-identical to what it was."""
    from mindspeed_mm.training.preference import _fingerprint

    before = _fingerprint([setup.ours])
    name, weight = next((n, p) for n, p in setup.ours.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        bits = weight.view(-1).view(torch.int32)
        bits[7] ^= 1 << 3
        assert _fingerprint([setup.ours]) != before, name
        bits[7] ^= 1 << 3
    assert _fingerprint([setup.ours]) == before
