"""The mixture-of-experts members of InternVL3.5 (30B-A3B, 241B-A28B): their model JSONs parse as qwen3_moe specs
with the published config.json numbers and parameter counts, and their finetune wrappers' layouts agree with the
JSONs' pipeline splits, satisfy expert parallelism's divisibility and fit 80 GB GPUs by estimate.

Expected values are published ones (docs/model_family.md, "Mixture of experts", lists the sources), never our own
output: `count_from_config` below turns the config.json numbers into parameter counts independently of
tools/memory_estimate.py, whose counts must equal it; both must be within 2% of the published totals (given to
3-4 significant digits, the active counts to 2).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from mindspeed_mm.config.model_spec import load_model_spec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.parallel.layout import plan_layout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "internvl3_5"

_spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "tools" / "memory_estimate.py")
memory_estimate = importlib.util.module_from_spec(_spec)
sys.modules["memory_estimate"] = memory_estimate  # its dataclasses look their module up
_spec.loader.exec_module(memory_estimate)  # type: ignore[union-attr]

# ViT (hidden, layers, ffn, qkv bias, qk norm, norm type): InternViT-300M / -6B-448px-V2_5, as the dense recipes
VIT_300M = (1024, 24, 4096, True, False, "layer_norm")
VIT_6B = (3200, 45, 12800, False, True, "rms_norm")
# Qwen3-MoE config.json: hidden, layers, heads, kv heads, head_dim, intermediate_size, moe_intermediate_size,
# num_experts, num_experts_per_tok, decoder_sparse_step, mlp_only_layers, vocab, tied
QWEN3_30B_A3B = (2048, 48, 32, 4, 128, 6144, 768, 128, 8, 1, (), 151936, False)
QWEN3_235B_A22B = (4096, 94, 64, 4, 128, 12288, 1536, 128, 8, 1, (), 151936, False)
HF_SHAPES = {"30B_A3B": (VIT_300M, QWEN3_30B_A3B), "241B_A28B": (VIT_6B, QWEN3_235B_A22B)}
# billions: InternVL docs' quick_start.md of InternVL 3.5 (#Language, #Total Param) and the Qwen3 model cards
# ("30.5B in total and 3.3B activated", "235B in total and 22B activated"). The ViT's one-digit #Vision Param
# (0.3B, 5.5B) leaves out the projector and is too coarse for 2%; the totals cover it.
PUBLISHED = {"30B_A3B": {"llm": 30.5, "total": 30.8, "llm_active": 3.3},
             "241B_A28B": {"llm": 235.1, "total": 240.7, "llm_active": 22.0}}
MODELS = sorted(HF_SHAPES)


def count_from_config(vit, llm) -> dict[str, int]:
    """Parameters of InternVLChatModel with a Qwen3-MoE LLM from config.json numbers: the ViT with the projector,
    the LLM, and the LLM's parameters one token uses (attention, norms, embeddings, router, top-k experts)."""
    c, n_vit, f_vit, qkv_bias, qk_norm, norm = vit
    h, n, heads, kv, d, f, moe_f, experts, topk, step, mlp_only, vocab, tied = llm
    norm_params = 2 * c if norm == "layer_norm" else c
    vit_layer = (3 * c * c + (3 * c if qkv_bias else 0) + c * c + c + (2 * c if qk_norm else 0) + 2 * c
                 + 2 * norm_params + 2 * c * f_vit + f_vit + c)
    vit_embed = c + (1 + (448 // 14) ** 2) * c + c * 3 * 14 * 14 + c
    projector = 2 * 4 * c + 4 * c * h + h + h * h + h
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d + 2 * h  # q/k norms, two RMSNorms
    sparse = [i for i in range(n) if i not in mlp_only and (i + 1) % step == 0]
    outside = vocab * h * (1 if tied else 2) + h + n * attention + (n - len(sparse)) * 3 * h * f
    router, expert = experts * h, 3 * h * moe_f
    return {"vit": vit_embed + n_vit * vit_layer + projector,
            "llm": outside + len(sparse) * (router + experts * expert),
            "llm_active": outside + len(sparse) * (router + topk * expert)}


def _recipe(size: str) -> tuple[memory_estimate.Recipe, str]:
    """The wrapper script's defaults as a Recipe, and its text."""
    src = (EXAMPLES / f"finetune_internvl3_5_{size}.sh").read_text()
    env = {m.group(1): m.group(2) for m in re.finditer(r"\b(\w+)=\$\{\w+:-([^}]*)\}", src)}
    extra = re.search(r'^export EXTRA_ARGS="(.*)"$', src, re.M)
    assert extra, "the wrapper sets EXTRA_ARGS on one line"
    assert "--expert-model-parallel-size $EP --expert-tensor-parallel-size $ETP" in extra.group(1)
    r = memory_estimate.Recipe(int(env["TP"]), int(env["PP"]), 8 * int(env["NNODES"]), int(env["GRAD_ACC_STEP"]),
                               sequence_parallel="--sequence-parallel" in extra.group(1),
                               ep=int(env["EP"]), etp=int(env["ETP"]))
    return r, src


def test_the_independent_count_agrees_with_the_published_totals():
    for size in MODELS:
        c = count_from_config(*HF_SHAPES[size])
        c["total"] = c["vit"] + c["llm"]
        for part, published in PUBLISHED[size].items():
            assert abs(c[part] / 1e9 / published - 1) <= 0.02, (size, part, c[part])


@pytest.mark.parametrize("size", MODELS)
def test_model_json_has_the_config_numbers(size):
    t = load_model_spec(EXAMPLES / f"model_{size}.json").text
    h, n, heads, kv, d, f, moe_f, experts, topk, step, mlp_only, vocab, tied = HF_SHAPES[size][1]
    assert (t.model_id, t.kind, t.moe, t.qk_layernorm, t.add_qkv_bias) == ("qwen3_moe", "qwen3_moe", True, True, False)
    assert (t.hidden_size, t.num_layers, t.num_attention_heads, t.num_query_groups, t.kv_channels) \
        == (h, n, heads, kv, d)
    assert (t.ffn_hidden_size, t.moe_ffn_hidden_size, t.num_experts, t.moe_router_topk) == (f, moe_f, experts, topk)
    assert (t.decoder_sparse_step, t.mlp_only_layers, t.vocab_size, t.tied) == (step, mlp_only, vocab, tied)
    assert t.norm_topk_prob and len(t.moe_layers) == n


@pytest.mark.parametrize("size", MODELS)
def test_estimate_counts_match_the_config_and_the_published_totals(size):
    spec = load_model_spec(EXAMPLES / f"model_{size}.json")
    got = memory_estimate.param_counts(spec)
    want = count_from_config(*HF_SHAPES[size])
    assert (got.vit, got.llm, got.llm_active) == (want["vit"], want["llm"], want["llm_active"])
    assert got.llm_experts == len(spec.text.moe_layers) * spec.text.num_experts * 3 * spec.text.hidden_size \
        * spec.text.moe_ffn_hidden_size
    assert abs(got.total / 1e9 / PUBLISHED[size]["total"] - 1) <= 0.02


@pytest.mark.parametrize("size", MODELS)
def test_recipe_layout_agrees_with_the_json_and_fits_80gb_by_estimate(size):
    spec = load_model_spec(EXAMPLES / f"model_{size}.json")
    r, src = _recipe(size)
    t, v = spec.text, spec.vision
    assert len(t.pipeline_num_layers) == len(v.pipeline_num_layers) == r.pp
    assert sum(t.pipeline_num_layers) == t.num_layers and sum(v.pipeline_num_layers) == v.num_layers
    assert r.world % (r.tp * r.pp) == 0 and (r.tp * r.dp) % (r.etp * r.ep) == 0
    assert t.num_experts % r.ep == 0 and t.moe_ffn_hidden_size % r.etp == 0
    # the conversion command in the header converts to this layout
    compact = lambda xs: "[[" + ",".join(map(str, xs)) + "]]"  # noqa: E731
    assert f"--cfg.parallel_config.llm_pp_layers {compact(t.pipeline_num_layers)}" in src
    assert f"--cfg.parallel_config.vit_pp_layers {compact(v.pipeline_num_layers)}" in src
    assert f"--cfg.parallel_config.tp_size {r.tp} --cfg.parallel_config.ep_size {r.ep}" in src
    plan_layout(spec, ParallelSizes.from_world_size(r.world, tp=r.tp, pp=r.pp, sp=r.sequence_parallel, ep=r.ep,
                                                    etp=r.etp), r.world)
    ranks = memory_estimate.estimate(spec, memory_estimate.plan_for(spec, r), r)
    assert memory_estimate.fits(ranks), memory_estimate.report(spec, r)
    assert all(m.experts for m in ranks)


@pytest.mark.parametrize("size, smaller", [
    ("30B_A3B", memory_estimate.Recipe(1, 2, 8, 64, ep=4)),  # one node, the JSON's PP2: EDP1
    ("241B_A28B", memory_estimate.Recipe(4, 8, 64, 64, sequence_parallel=True, ep=8)),  # 8 nodes: EDP1
])
def test_half_the_gpus_do_not_fit_by_estimate(size, smaller):
    """Why the recipes take 2 and 16 nodes (docs/model_family.md): with expert-DP 1 every expert's Adam state
    sits on one rank."""
    spec = load_model_spec(EXAMPLES / f"model_{size}.json")
    assert not memory_estimate.fits(memory_estimate.estimate(spec, memory_estimate.plan_for(spec, smaller), smaller))


def test_expert_parallelism_must_fit_inside_data_parallelism():
    spec = load_model_spec(EXAMPLES / "model_30B_A3B.json")
    r = memory_estimate.Recipe(1, 2, 8, 64, ep=8)  # DP4 cannot hold EP8
    with pytest.raises(ValueError, match="multiple of etp\\*ep"):
        memory_estimate.estimate(spec, memory_estimate.plan_for(spec, r), r)
    dense = load_model_spec(EXAMPLES / "model_8B.json")
    r = memory_estimate.Recipe(1, 4, 8, 64, ep=2)
    with pytest.raises(ValueError, match="dense LLM"):
        memory_estimate.estimate(dense, memory_estimate.plan_for(dense, r), r)


@pytest.mark.parametrize("size", MODELS)
def test_converter_dry_run_sizes_every_expert_rank_file(size):
    """The recipe's conversion (`--cfg.dry_run`): one file per (tp, pp, ep) megatron's ranks hold, each with its
    EP rank's E/ep experts of every sparse layer of its stage and its TP rank's dense slices."""
    from mindspeed_mm.checkpoint.convert import dry_run
    from mindspeed_mm.config.parallel import ParallelConfig
    from mindspeed_mm.parallel.layout import rank_file_keys

    spec = load_model_spec(EXAMPLES / f"model_{size}.json")
    r, _ = _recipe(size)
    t, v = spec.text, spec.vision
    pc = ParallelConfig(tp_size=r.tp, ep_size=r.ep, etp_size=r.etp, llm_pp_layers=[list(t.pipeline_num_layers)],
                        vit_pp_layers=[list(v.pipeline_num_layers)])
    report = dry_run(spec, pc)
    keys = rank_file_keys(ParallelSizes(tp=r.tp, pp=r.pp, ep=r.ep, etp=r.etp, dp=r.ep))
    assert sorted(report.ranks) == sorted((tp, pp, ep) for tp, ep in keys for pp in range(r.pp))
    for pp in range(r.pp):  # a stage's files of one TP rank: the same dense slice and E/ep experts each
        for tp in range(r.tp):
            assert len({report.ranks[(tp, pp, ep)][0] for t, ep in keys if t == tp}) == 1
