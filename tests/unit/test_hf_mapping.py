"""HF (both formats) <-> ours: bit-exact both ways, every tensor used once, Megatron's merged layouts."""
from __future__ import annotations

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.hf.mapping import GroupInterleave, hf_to_mm, mapping_rules, mm_to_hf
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module", params=["vit300m", "vit6b"])
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    out = {}
    for fmt in ("native", "original"):
        config, detected, state = load_hf_checkpoint(
            write_tiny_checkpoint(root / fmt, fmt=fmt, preset=request.param, seed=3))
        assert detected == fmt
        out[fmt] = (spec_from_hf_config(config, img_context_token_id=config.get("img_context_token_id")), state)
    return out


def test_both_formats_give_identical_parameters(checkpoints):
    spec, native = checkpoints["native"]
    _, original = checkpoints["original"]
    a, b = hf_to_mm(native, spec, "native"), hf_to_mm(original, spec, "original")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["native", "original"])
def test_round_trip_is_bit_exact(checkpoints, fmt):
    spec, state = checkpoints[fmt]
    back = mm_to_hf(hf_to_mm(state, spec, fmt), spec, fmt)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


def test_every_hf_tensor_has_exactly_one_rule(checkpoints):
    spec, state = checkpoints["native"]
    used = [k for r in mapping_rules(spec, "native") for k in r.hf]
    assert len(used) == len(set(used)) == len(state)


def test_unknown_and_missing_keys_are_named(checkpoints):
    spec, state = checkpoints["native"]
    with pytest.raises(KeyError, match="vision_tower.extra.weight"):
        hf_to_mm({**state, "vision_tower.extra.weight": torch.zeros(1)}, spec, "native")
    missing = dict(state)
    del missing["language_model.lm_head.weight"]
    with pytest.raises(KeyError, match="language_model.lm_head.weight"):
        hf_to_mm(missing, spec, "native")


def test_llm_qkv_is_interleaved_per_query_group():
    # 4 query heads in 2 groups, head dim 1: rows q0 q1 | k0 | v0 || q2 q3 | k1 | v1
    q, k, v = torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    merged = GroupInterleave(groups=2, q_per_group=2, head_dim=1).merge([q, k, v])
    assert merged.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
