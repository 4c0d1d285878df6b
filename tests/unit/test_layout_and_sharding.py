"""Layout validation (before any process group exists) and the per-rank slicing functions."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import torch

from mindspeed_mm.config.model_spec import load_model_spec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.parallel.layout import LayoutError, head_partition, plan_layout
from mindspeed_mm.models.internvl.sharding import (
    full_state_dict,
    local_state_dict,
    shard_slice,
    shard_tensor,
    slice_from_shards,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"


@pytest.fixture(scope="module")
def spec8b():
    return load_model_spec(EXAMPLES / "model_8B.json")


@pytest.fixture(scope="module")
def spec78b():
    return load_model_spec(EXAMPLES / "model_78B.json")


def test_head_partition_is_unaligned_without_padding():
    assert head_partition(25, 8) == [4, 3, 3, 3, 3, 3, 3, 3]
    assert head_partition(25, 4) == [7, 6, 6, 6]
    assert head_partition(5, 2) == [3, 2]


def test_reference_layout_stages(spec8b):
    plan = plan_layout(spec8b, ParallelSizes(tp=1, pp=4), 8, [[24, 0, 0, 0]], [[6, 8, 8, 6]])
    s0, s3 = plan.stages[0], plan.stages[3]
    assert s0.has_vit_embed and s0.has_projector and s0.has_llm_embed and list(s0.llm_layers) == list(range(6))
    assert s3.has_llm_head and list(s3.llm_layers) == list(range(22, 28)) and not s3.has_vit


def test_vpp_stage_order(spec8b):
    plan = plan_layout(spec8b, ParallelSizes(pp=2, vpp=2), 2, [[24, 0], [0, 0]], [[0, 10], [10, 8]])
    assert [s.stage for s in plan.stages] == [0, 1, 2, 3]
    assert plan.stage(pp_rank=0, vpp_rank=1).llm_layers == range(10, 20)
    assert plan.stage(pp_rank=1, vpp_rank=1).has_llm_head


def test_padded_vocab(spec8b):
    assert plan_layout(spec8b, ParallelSizes(tp=4, pp=4), 16, [[24, 0, 0, 0]], [[6, 8, 8, 6]]).padded_vocab_size == 151676


@pytest.mark.parametrize("kwargs, match", [
    (dict(parallel=ParallelSizes(pp=4), world=8, vit=[[24, 0, 0, 0]], llm=[[6, 8, 8, 5]]), "sums to 27"),
    (dict(parallel=ParallelSizes(pp=4), world=2, vit=[[24, 0, 0, 0]], llm=[[6, 8, 8, 6]]), "more stages than"),
    (dict(parallel=ParallelSizes(tp=2, pp=2), world=6, vit=[[24, 0]], llm=[[14, 14]]), "not a multiple"),
    (dict(parallel=ParallelSizes(tp=8), world=8, vit=None, llm=None), "num_query_groups=4"),
    (dict(parallel=ParallelSizes(pp=2), world=2, vit=[[12, 12]], llm=[[14, 14]]), "before the ViT's last stage"),
    (dict(parallel=ParallelSizes(pp=2), world=2, vit=[[0, 24]], llm=[[0, 28]]), "ViT must start"),
    (dict(parallel=ParallelSizes(pp=4), world=4, vit=[[24, 0, 0, 0]], llm=[[0, 0, 14, 14]]), "hold no layers"),
    (dict(parallel=ParallelSizes(pp=4), world=4, vit=[[24, 0, 0]], llm=[[6, 8, 8, 6]]), "has 3 entries"),
    (dict(parallel=ParallelSizes(pp=2, vpp=2), world=2, vit=[[24, 0]], llm=[[14, 14]]), "vpp=2"),
])
def test_bad_layouts_are_refused_naming_the_value(spec8b, kwargs, match):
    with pytest.raises(LayoutError, match=match):
        plan_layout(spec8b, kwargs["parallel"], kwargs["world"], kwargs["vit"], kwargs["llm"])


def _random_full_state(spec):
    """Random full-model tensors of a spec, named as the model names them."""
    from mindspeed_mm.models.internvl.hf.mapping import mapping_rules
    g = torch.Generator().manual_seed(0)
    return {r.mm: torch.randn(_shape(r.mm, spec), generator=g) for r in mapping_rules(spec, "native")}


def _shape(name, spec):
    v, t = spec.vision, spec.text
    if name.startswith("image_encoder.encoder.embeddings."):
        return {"class_embedding": (1, 1, v.hidden_size), "position_embedding": (1, 1 + v.num_patches, v.hidden_size),
                "patch_embedding.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
                "patch_embedding.bias": (v.hidden_size,)}[name.split("embeddings.")[1]]
    if name.startswith("image_encoder.encoder.encoder.layers."):
        leaf = name.split(".", 5)[5]
        h, f = v.hidden_size, v.ffn_hidden_size
        return {"self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
                "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
                "mlp.linear_fc1.weight": (f, h), "mlp.linear_fc1.bias": (f,), "mlp.linear_fc2.weight": (h, f),
                "mlp.linear_fc2.bias": (h,)}.get(leaf, (h,))
    if name.startswith("image_encoder.projector."):
        i, h = spec.projector.input_size, t.hidden_size
        return {"norm.weight": (i,), "norm.bias": (i,), "linear_fc1.weight": (h, i), "linear_fc1.bias": (h,),
                "linear_fc2.weight": (h, h), "linear_fc2.bias": (h,)}[name.split("projector.")[1]]
    h, f, d = t.hidden_size, t.ffn_hidden_size, t.kv_channels
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return (t.vocab_size, h)
    leaf = name.split(".", 4)[-1] if ".layers." in name else ""
    qkv = (t.num_attention_heads + 2 * t.num_query_groups) * d
    return {"self_attention.linear_qkv.weight": (qkv, h), "self_attention.linear_qkv.bias": (qkv,),
            "self_attention.linear_proj.weight": (h, t.num_attention_heads * d),
            "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}.get(leaf, (h,))


@pytest.fixture(scope="module")
def tiny_6b_spec(spec78b):
    """78B-shaped structure, shrunk: 25 ViT heads (unaligned at 2/4/8), odd vocab."""
    v = dataclasses.replace(spec78b.vision, num_layers=3, hidden_size=200, ffn_hidden_size=16, num_attention_heads=25,
                            pipeline_num_layers=None)
    p = dataclasses.replace(spec78b.projector, vit_hidden_size=200, llm_hidden_size=32)
    t = dataclasses.replace(spec78b.text, num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8,
                            num_query_groups=8, kv_channels=4, vocab_size=101, pipeline_num_layers=None)
    return dataclasses.replace(spec78b, vision=v, projector=p, text=t, img_context_token_id=100)


@pytest.mark.parametrize("style", ["mm", "mindspeed"])
@pytest.mark.parametrize("tp, pp, vpp, vit, llm", [
    (1, 1, None, [[3]], [[4]]),
    (2, 1, None, [[3]], [[4]]),
    (8, 1, None, [[3]], [[4]]),
    (4, 2, None, [[2, 1]], [[0, 4]]),
    (2, 2, 2, [[2, 1], [0, 0]], [[0, 1], [2, 1]]),
])
def test_slices_merge_back_bit_exact(tiny_6b_spec, tp, pp, vpp, vit, llm, style):
    spec = tiny_6b_spec
    full = _random_full_state(spec)
    plan = plan_layout(spec, ParallelSizes(tp=tp, pp=pp, vpp=vpp), tp * pp, vit, llm)
    shards = {(r, s.stage): local_state_dict(full, spec, plan, r, s, style) for r in range(tp) for s in plan.stages}
    back = full_state_dict(shards, spec, plan, style)
    assert back.keys() == full.keys()
    for k in full:
        assert torch.equal(back[k], full[k]), k


def test_mindspeed_style_keeps_the_projector_whole_and_splits_the_vocabulary_unevenly(tiny_6b_spec):
    spec = tiny_6b_spec  # vocab 101
    rows = torch.arange(101, dtype=torch.float32)[:, None]
    vocab = "text_decoder.output_layer.weight"
    parts = [shard_tensor(vocab, rows, spec, 8, r, 104, "mindspeed") for r in range(8)]
    assert [p.shape[0] for p in parts] == [13] * 5 + [12] * 3 and torch.equal(torch.cat(parts), rows)
    assert [shard_tensor(vocab, rows, spec, 8, r, 104).shape[0] for r in range(8)] == [13] * 8  # ours: padded
    fc1 = "image_encoder.projector.linear_fc1.weight"
    w = torch.randn(spec.text.hidden_size, spec.projector.input_size)
    assert all(torch.equal(shard_tensor(fc1, w, spec, 4, r, 104, "mindspeed"), w) for r in range(4))


def test_vit_qkv_slice_holds_this_ranks_heads_of_q_k_v(tiny_6b_spec):
    spec = tiny_6b_spec
    d = spec.vision.head_dim
    rows = torch.arange(3 * 25 * d, dtype=torch.float32)[:, None]  # row index as value
    name = "image_encoder.encoder.encoder.layers.0.self_attention.linear_qkv.weight"
    part = shard_tensor(name, rows, spec, tp=8, rank=1, padded_vocab=104)  # rank 1 holds heads 4..6
    expect = torch.cat([torch.arange(b * 25 * d + 4 * d, b * 25 * d + 7 * d) for b in range(3)]).float()
    assert torch.equal(part[:, 0], expect)


@pytest.mark.parametrize("style_a, style_b", [("mm", "mm"), ("mindspeed", "mm"), ("mm", "mindspeed"),
                                              ("mindspeed", "mindspeed")])
@pytest.mark.parametrize("tp_a, tp_b", [(2, 1), (1, 8), (8, 2), (4, 8), (2, 4), (8, 8)])
def test_slice_from_shards_is_the_other_layouts_shard_built_from_views(tiny_6b_spec, tp_a, tp_b, style_a, style_b):
    """Resplit's path: rank b's slice at tp_b, cut straight from the tp_a shards (no full tensor), equals
    slicing the full tensor; every piece but the vocabulary padding is a view of a shard. Either side may be
    in MindSpeed-MM's convention (replicated projector, unpadded uneven vocabulary rows)."""
    spec = tiny_6b_spec
    full = _random_full_state(spec)
    pad = {tp: plan_layout(spec, ParallelSizes(tp=tp), tp, [[3]], [[4]]).padded_vocab_size for tp in (tp_a, tp_b)}
    for name, t in full.items():
        shards = [shard_tensor(name, t, spec, tp_a, r, pad[tp_a], style_a) for r in range(tp_a)]
        for rb in range(tp_b):
            want = shard_slice(name, tuple(t.shape), spec, tp_b, rb, pad[tp_b], style_b)
            dim, pieces = slice_from_shards(name, tuple(t.shape), spec, shards, pad[tp_a], want, style_a)
            assert torch.equal(torch.cat(pieces, dim), shard_tensor(name, t, spec, tp_b, rb, pad[tp_b], style_b)), \
                (name, rb)
            views = pieces[:-1] if want.pad else pieces
            owners = {s.untyped_storage().data_ptr() for s in shards}
            assert all(p.untyped_storage().data_ptr() in owners for p in views), name
