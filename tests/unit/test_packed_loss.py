"""Packed micro-batches at one rank: per-token loss of a global batch packed and unpacked, InternVL's square
weighting against its formula, per-sample losses against transformers' model on each sample alone."""
from __future__ import annotations

import math

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import InternVLModel, PackError, load_full_state_dict, pack_positions
from mindspeed_mm.runtime.chunks import build_model_chunks, load_full_weights
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from mindspeed_mm.training.loss import LossMode, loss_func, sample_segments, sample_target_counts
from mindspeed_mm.training.pipeline import forward_backward, local_tensors, wrap_ddp
from tests.helpers.batches import make_packed_microbatches, unpacked_like
from tests.helpers.layout_check import layout_plan, LayoutArgs, trainable_spec

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, megatron_world):
    hf_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("packed") / "hf", fmt="native", preset="vit300m", seed=3)
    spec = trainable_spec(hf_dir)
    _, fmt, state = load_hf_checkpoint(hf_dir)
    return hf_dir, spec, hf_to_mm(state, spec, fmt)


def _model(tiny, mode: LossMode):
    hf_dir, spec, full = tiny
    _, plan = layout_plan(hf_dir, LayoutArgs(), 1)
    chunks = build_model_chunks(spec, plan)
    load_full_weights(chunks, full)
    return wrap_ddp(chunks, loss_mode=mode)


def _run(tiny, mode: LossMode, microbatches):
    model = _model(tiny, mode)
    reports = forward_backward(model, microbatches, loss_mode=mode)
    loss = float(sum(r[0] for r in reports) / sum(r[1] for r in reports))
    return loss, local_tensors(model, "grad")[0]


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-3)).item() for k in b)


def test_per_token_loss_of_a_global_batch_packed_and_unpacked(tiny):
    packed, alone = make_packed_microbatches(tiny[1], 4)
    unpacked = [unpacked_like(p, alone[3 * i:3 * i + 3]) for i, p in enumerate(packed)]
    lp, gp = _run(tiny, LossMode.PER_TOKEN, packed)
    lu, gu = _run(tiny, LossMode.PER_TOKEN, unpacked)
    print(f"per-token loss packed {lp:.7f} unpacked {lu:.7f}; grads worst relative diff {_max_rel(gp, gu):.1e}")
    assert abs(lp - lu) <= TOL
    assert _max_rel(gp, gu) <= TOL


def _alone_token_losses(model, alone):
    """Each sample's per-target-token losses, run alone (the model's own masked per-token loss)."""
    out = []
    for a in alone:
        per_token = model(a["input_ids"], a["pixel_values"], labels=a["labels"])
        out.append(per_token[0][_targets(a)])
    return out


def _targets(a):
    labels = a["labels"][0]
    t = torch.zeros_like(labels, dtype=torch.bool)
    t[:-1] = labels[1:] != -100
    return t


def test_square_weighting_is_internvls_formula(tiny):
    """InternVL's `loss_reduction square`: loss = sum_i sum_t ce_it / sqrt(n_i) / sum_i sqrt(n_i), n_i the target
    tokens of sample i (its labels that are not ignored, the first token's never being a target), over the
    micro-batch; the same packed, unpacked and from the samples alone."""
    hf_dir, spec, full = tiny
    model = InternVLModel(spec)
    load_full_state_dict(model, full)
    packed, alone = make_packed_microbatches(spec, 2)
    for i, p in enumerate(packed):
        samples = alone[3 * i:3 * i + 3]
        with torch.no_grad():
            ce = _alone_token_losses(model, samples)
            want = sum(c.sum() / math.sqrt(len(c)) for c in ce) / sum(math.sqrt(len(c)) for c in ce)
            got_packed = loss_func(LossMode.SQUARE, p["labels"], model(p["input_ids"], p["pixel_values"],
                                   labels=p["labels"], sample_ids=p["sample_ids"]), p["sample_ids"])[0]
            u = unpacked_like(p, samples)
            got_unpacked = loss_func(LossMode.SQUARE, u["labels"],
                                     model(u["input_ids"], u["pixel_values"], labels=u["labels"]))[0]
        counts = sample_target_counts(p["labels"], p["sample_ids"])
        assert sorted(counts[counts > 0].tolist()) == sorted(float(len(c)) for c in ce)
        print(f"square: formula {want:.7f} packed {got_packed:.7f} unpacked {got_unpacked:.7f}")
        assert abs(got_packed - want) <= TOL and abs(got_unpacked - want) <= TOL


def test_packed_sample_losses_match_transformers_on_each_sample_alone(tiny):
    from tests.helpers.oracle import load_native_model

    hf_dir, spec, full = tiny
    hf = load_native_model(hf_dir)
    model = InternVLModel(spec)
    load_full_state_dict(model, full)
    model.eval()
    packed, alone = make_packed_microbatches(spec, 4)
    worst = 0.0
    for i, p in enumerate(packed):
        with torch.no_grad():
            per_token = model(p["input_ids"], p["pixel_values"], labels=p["labels"], sample_ids=p["sample_ids"])
            no_ids = model(p["input_ids"], p["pixel_values"], labels=p["labels"])
        counts = sample_target_counts(p["labels"], p["sample_ids"])
        _, seg, n = sample_segments(p["labels"], p["sample_ids"])
        sums = torch.zeros(n).index_add(0, seg.reshape(-1), per_token.reshape(-1))
        got = (sums / counts.clamp(min=1))[counts > 0]
        with torch.no_grad():
            want = torch.stack([hf(input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                                   pixel_values=a["pixel_values"], labels=a["labels"]).loss
                                for a in alone[3 * i:3 * i + 3]])
        worst = max(worst, (got - want).abs().max().item())
        assert (got - want).abs().max() <= TOL, (got, want)
        # the same rows without sample ids (attention across samples, positions running on) are other numbers
        sums_no = torch.zeros(n).index_add(0, seg.reshape(-1), no_ids.reshape(-1))
        assert ((sums_no / counts.clamp(min=1))[counts > 0] - want).abs().max() > 100 * TOL
    print(f"packed per-sample losses vs transformers alone: worst diff {worst:.1e}")


def test_pack_positions_and_bad_sample_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    pos, lengths = pack_positions(ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert lengths.tolist() == [[3, 3, 3, 2, 2, 1, 2, 2], [8] * 8]
    for bad in ([[0, 1, 0, -1]], [[1, 1, -1, -1]], [[0, -1, 1, 1]], [[0, 2, 2, -1]]):
        with pytest.raises(PackError):
            pack_positions(torch.tensor(bad))
