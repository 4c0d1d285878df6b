"""Every parallel layout against the single-rank run of the same code on the same weights and batches.

The layout runs under torchrun on gloo; its gradients (or parameters after Adam steps) are merged back
into full-model tensors with the inverse sharding functions and compared parameter by parameter.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.batches import make_microbatches
from tests.helpers.launch import run_torchrun
from tests.helpers.layout_check import (LayoutArgs, layout_plan, load_rank_results, merge_rank_results, run_layout,
                                        trainable_spec)
from tests.helpers.oracle import use_dynamic_ntk_rope
from mindspeed_mm.testing.tiny_checkpoint import TINY_PRESETS, write_tiny_checkpoint

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = Path(__file__).parent / "workers" / "layout_worker.py"
LOSS_TOL, GRAD_TOL, PARAM_TOL = 1e-5, 1e-5, 1e-6
ROPE_MAX_POS = 16


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    dirs = {p: write_tiny_checkpoint(root / p, fmt="native", preset=p, seed=7)
            for p in ("vit300m", "vit6b", "deep", *KIND_PRESETS, MOE_PRESET)}
    # vit300m's weights with max_position_embeddings 16 and dynamic NTK (tests/oracle checks it on one rank)
    dirs["dynamic_rope"] = use_dynamic_ntk_rope(write_tiny_checkpoint(root / "dynamic_rope", fmt="native",
                                                                      preset="vit300m", seed=7), ROPE_MAX_POS, 2.0)
    return dirs


@pytest.fixture(scope="module")
def reference(hf_dirs):
    """Single-rank results, computed in this process once per (preset, micro-batches, Adam steps)."""
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    cache = {}

    def get(preset: str, microbatches: int, adam_steps: int):
        key = (preset, microbatches, adam_steps)
        if key not in cache:
            args = LayoutArgs(microbatches=microbatches, adam_steps=adam_steps)
            spec, plan = layout_plan(hf_dirs[preset], args, 1)
            cache[key] = merge_rank_results([run_layout(hf_dirs[preset], args)], spec, plan)
        return cache[key]

    yield get
    destroy_distributed()


def run(hf_dirs, tmp_path, preset: str, nproc: int, args: LayoutArgs) -> dict:
    return run_many(hf_dirs, tmp_path, preset, nproc, [args])[0]


def run_many(hf_dirs, tmp_path, preset: str | None, nproc: int,
             layouts: list[LayoutArgs | tuple[str, LayoutArgs]]) -> list[dict]:
    """Several layouts at the same (tp, pp, cp, vpp) in one torchrun launch, one result each. A layout given
    as (preset, args) runs on that preset's checkpoint instead of `preset`'s (several presets, one start-up)."""
    layouts = [lay if isinstance(lay, tuple) else (preset, lay) for lay in layouts]
    out_dirs = [tmp_path / str(i) for i in range(len(layouts))] if len(layouts) > 1 else [tmp_path]
    worker_args = [str(hf_dirs[layouts[0][0]])]
    current = layouts[0][0]
    for out_dir, (p, args) in zip(out_dirs, layouts):
        out_dir.mkdir(parents=True, exist_ok=True)
        if p != current:
            worker_args += ["--hf-dir", str(hf_dirs[p])]
            current = p
        worker_args += [str(out_dir), args.to_json()]
    run_torchrun(WORKER, nproc, worker_args, timeout=600)
    results = []
    for out_dir, (p, args) in zip(out_dirs, layouts):
        spec, plan = layout_plan(hf_dirs[p], args, nproc)
        results.append(merge_rank_results(load_rank_results(out_dir), spec, plan))
    return results


def assert_close(got: dict, want: dict, tol: float, what: str, relative: bool = True) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    worst = 0.0
    for name in want:
        scale = want[name].abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        bound = tol * max(scale, 1e-3) if relative else tol
        assert err <= bound, f"{what} {name}: max diff {err:.3g}, max |ref| {scale:.3g}"
        worst = max(worst, err / max(scale, 1e-3) if relative else err)
    print(f"{what}: {len(want)} tensors, worst {'relative ' if relative else ''}diff {worst:.2e}")


def assert_losses(got: dict, ref: dict, dp: int) -> None:
    ref_losses = ref["losses"][0]  # [step][microbatch] on the single rank
    for dp_rank, steps in got["losses"].items():
        for step, (losses, ref_step) in enumerate(zip(steps, ref_losses)):
            want = ref_step[dp_rank::dp]
            assert len(losses) == len(want)
            for a, b in zip(losses, want):
                assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), f"step {step} dp {dp_rank}: loss {a} vs {b}"
                print(f"loss {a:.7f} vs one rank {b:.7f}: diff {abs(a - b):.1e}")


LAYOUTS = {
    # name: (preset, nproc, LayoutArgs)
    "tp2_odd_vit_heads_odd_vocab": ("vit6b", 2, LayoutArgs(tp=2)),
    "tp2_sp": ("vit6b", 2, LayoutArgs(tp=2, sp=True)),
    "tp2_sp_vit300m": ("vit300m", 2, LayoutArgs(tp=2, sp=True)),
    "pp2_vit_on_stage0": ("vit300m", 2, LayoutArgs(pp=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[1, 1]],
                                                    microbatches=3)),
    "pp2_vit_on_both_stages": ("vit6b", 2, LayoutArgs(pp=2, vit_pp_layers=[[1, 1]], llm_pp_layers=[[0, 2]],
                                                       microbatches=3)),
    "pp2_features_cross_boundary": ("vit300m", 2, LayoutArgs(pp=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[0, 2]])),
    "pp2_vpp2": ("vit6b", 2, LayoutArgs(pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]],
                                        llm_pp_layers=[[0, 0], [1, 1]], microbatches=4)),
    "pp4_vpp2": ("deep", 4, LayoutArgs(pp=4, vpp=2, vit_pp_layers=[[1, 1, 1, 1], [0, 0, 0, 0]],
                                       llm_pp_layers=[[0, 0, 0, 0], [1, 1, 1, 1]], microbatches=8)),
    # MICROBATCH_SHAPES give sequence lengths that are not multiples of 2*cp: the model pads them.
    "cp2_ring": ("vit300m", 2, LayoutArgs(cp=2, cp_algo="megatron_cp_algo")),
    "cp2_ulysses": ("vit6b", 2, LayoutArgs(cp=2, cp_algo="ulysses_cp_algo")),
    "tp2_pp2": ("vit6b", 4, LayoutArgs(tp=2, pp=2, sp=True, vit_pp_layers=[[2, 0]], llm_pp_layers=[[1, 1]],
                                       microbatches=2)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(name, hf_dirs, reference, tmp_path):
    preset, nproc, args = LAYOUTS[name]
    got = run(hf_dirs, tmp_path, preset, nproc, args)
    ref = reference(preset, args.microbatches, 0)
    assert_losses(got, ref, dp=1)
    assert_close(got["tensors"], ref["tensors"], GRAD_TOL, "grad")


# text_decoder.rope_scaling (dynamic NTK): the frequencies come from the micro-batch's length before CP/SP
# padding and before the CP split, so every layout rotates as the single rank does. CP2 ring and Ulysses share
# a launch. PP2 (no padding; every stage gets the micro-batch's input_ids) is left out for wall time.
ROPE_LAYOUTS = {
    "cp2_ring_and_ulysses": (2, [LayoutArgs(cp=2, cp_algo="megatron_cp_algo"),
                                 LayoutArgs(cp=2, cp_algo="ulysses_cp_algo")]),
    "tp2_sp": (2, [LayoutArgs(tp=2, sp=True)]),
}


def test_dynamic_ntk_rope_reference_differs_from_plain_rope(hf_dirs, reference):
    """The single-rank reference of the dynamic-NTK cases is not plain RoPE's (same weights), so a layout
    that rotated with the wrong frequencies would fail: micro-batch 0 is longer than max_position_embeddings
    and not a multiple of 2*cp (CP2 and TP2+SP pad it), micro-batch 1 is exactly max_position_embeddings
    long (plain RoPE on every layout)."""
    lengths = [b["input_ids"].shape[1] for b in make_microbatches(trainable_spec(hf_dirs["dynamic_rope"]), 2)]
    assert lengths[0] > ROPE_MAX_POS and lengths[0] % 4 and lengths[1] == ROPE_MAX_POS, lengths
    ntk, plain = reference("dynamic_rope", 2, 0), reference("vit300m", 2, 0)
    (ntk_losses,), (plain_losses,) = ntk["losses"][0], plain["losses"][0]
    assert abs(ntk_losses[0] - plain_losses[0]) > 100 * LOSS_TOL, (ntk_losses, plain_losses)
    assert abs(ntk_losses[1] - plain_losses[1]) <= LOSS_TOL, (ntk_losses, plain_losses)
    name = next(k for k in ntk["tensors"] if "linear_qkv.weight" in k)
    diff = (ntk["tensors"][name] - plain["tensors"][name]).abs().max().item()
    assert diff > 100 * GRAD_TOL * ntk["tensors"][name].abs().max().item(), (name, diff)


@pytest.mark.parametrize("name", list(ROPE_LAYOUTS))
def test_dynamic_ntk_rope_layout_matches_single_rank(name, hf_dirs, reference, tmp_path):
    nproc, layouts = ROPE_LAYOUTS[name]
    for args, got in zip(layouts, run_many(hf_dirs, tmp_path, "dynamic_rope", nproc, layouts)):
        ref = reference("dynamic_rope", args.microbatches, 0)
        assert_losses(got, ref, dp=1)
        assert_close(got["tensors"], ref["tensors"], GRAD_TOL, f"grad ({args.cp_algo})" if args.cp > 1 else "grad")


def test_converted_checkpoint_at_tp2_pp2_matches_single_rank(hf_dirs, reference, tmp_path):
    """mm-convert's shards, loaded by the model at their layout, give the single-rank numbers (which equal
    transformers', tests/oracle)."""
    from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm

    mm_dir = tmp_path / "mm"
    hf_to_mm(HFToMMConfig(mm_dir=str(mm_dir), hf_config=HFConfig(hf_dir=str(hf_dirs["vit6b"])), progress=False,
                          parallel_config=ParallelConfig(tp_size=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[1, 1]])))
    args = LayoutArgs(tp=2, pp=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[1, 1]], mm_dir=str(mm_dir))
    got = run(hf_dirs, tmp_path / "ranks", "vit6b", 4, args)
    ref = reference("vit6b", args.microbatches, 0)
    assert_losses(got, ref, dp=1)
    assert_close(got["tensors"], ref["tensors"], GRAD_TOL, "grad")


def test_dp2_distributed_optimizer_after_three_adam_steps(hf_dirs, reference, tmp_path):
    args = LayoutArgs(microbatches=1, adam_steps=3, distributed_optimizer=True)
    got = run(hf_dirs, tmp_path, "vit300m", 2, args)
    ref = reference("vit300m", 2, 3)
    assert_losses(got, ref, dp=2)
    assert_close(got["tensors"], ref["tensors"], PARAM_TOL, "param", relative=False)


# ---------------------------------------------------------------------------------------------------------------
# The other LLM kinds (issue 17), untied presets (tied embeddings across stages: tests/multirank/
# test_tied_embeddings.py). Every grad layout runs 4 micro-batches (PP2 x VPP2 needs a multiple of pp), so one
# single-rank reference per preset serves them all; 4 micro-batch losses and every gradient are compared.
#
# Qwen3 (qwen3_vit6b), the full matrix: its per-head q/k RMSNorm (models/internvl/norm.HeadNorm) is the new
# piece under TP (one weight for heads split over TP ranks: its gradient summed over TP exactly once; megatron's
# qk_layernorm flag, which would sum it again in finalize_model_grads, stays off), SP (heads split, not tokens)
# and CP (per token, per head). The vit6b-style ViT has 5 heads, split 3 + 2 at TP2. The LLM has 4 query heads
# in 2 groups (head_dim 24 apart from hidden / heads): megatron refuses a TP that does not divide both, so an
# LLM split unevenly is not a layout there is to test.
#
# InternLM3 (internlm3_vit300m, InternVL3-9B's pairing with InternViT-300M), the same matrix: its decoder is
# Qwen2's with other HF names, no qkv bias and another rope theta; each layout rides in a launch Qwen3's opens.
#
# Each launch groups the layouts at one (tp, pp, cp, vpp), across presets, to pay one torchrun start-up.
# ---------------------------------------------------------------------------------------------------------------

KIND_PRESETS = ("qwen3_vit6b", "internlm3_vit300m")
KIND_MB = 4
_PP2_VPP2 = dict(pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]], llm_pp_layers=[[0, 0], [1, 1]], microbatches=KIND_MB)
KIND_LAYOUTS = {
    # name: (nproc, [(preset, LayoutArgs), ...]) at one (tp, pp, cp, vpp)
    "tp2_and_tp2_sp": (2, [(preset, LayoutArgs(tp=2, sp=sp, microbatches=KIND_MB))
                           for preset in KIND_PRESETS for sp in (False, True)]),
    "pp2_vpp2": (2, [(preset, LayoutArgs(**_PP2_VPP2)) for preset in KIND_PRESETS]),
    "cp2_ring_and_ulysses": (2, [(preset, LayoutArgs(cp=2, cp_algo=algo, microbatches=KIND_MB))
                                 for preset in KIND_PRESETS for algo in ("megatron_cp_algo", "ulysses_cp_algo")]),
}


def _describe(preset: str, args: LayoutArgs) -> str:
    parts = [f"tp{args.tp}"] + (["sp"] if args.sp else []) + [f"pp{args.pp}"] + (
        [f"vpp{args.vpp}"] if args.vpp else []) + ([f"cp{args.cp} {args.cp_algo}"] if args.cp > 1 else [])
    return f"{preset} {' '.join(parts)}"


@pytest.mark.parametrize("name", list(KIND_LAYOUTS))
def test_llm_kind_layout_matches_single_rank(name, hf_dirs, reference, tmp_path):
    nproc, layouts = KIND_LAYOUTS[name]
    for (preset, args), got in zip(layouts, run_many(hf_dirs, tmp_path, None, nproc, layouts)):
        what = _describe(preset, args)
        ref = reference(preset, args.microbatches, 0)
        assert len(ref["losses"][0][0]) == KIND_MB
        assert_losses(got, ref, dp=1)
        if preset.startswith("qwen3"):
            # the LLM's per-head q/k norm weights: the gradient summed over TP once (not 0.5x or 2x one rank's)
            norms = [k for k in ref["tensors"] if k.startswith("text_decoder.")
                     and k.endswith(("q_layernorm.weight", "k_layernorm.weight"))]
            assert len(norms) == 2 * TINY_PRESETS[preset].llm_layers, norms
            for k in norms:
                want, grad = ref["tensors"][k], got["tensors"][k]
                assert want.abs().max() > 1e-3, (k, want)
                ratio = (grad * want).sum().item() / (want * want).sum().item()
                err = (grad - want).abs().max().item() / want.abs().max().item()
                assert err <= GRAD_TOL, f"{what} {k}: relative diff {err:.2e}, ratio to one rank {ratio:.6f}"
                print(f"{what} {k}: relative diff {err:.1e}, ratio to one rank {ratio:.7f}")
        assert_close(got["tensors"], ref["tensors"], GRAD_TOL, f"grad ({what})")


@pytest.mark.parametrize("preset", KIND_PRESETS)
def test_llm_kind_dp2_distributed_optimizer_after_three_adam_steps(preset, hf_dirs, reference, tmp_path):
    """DP2 with the distributed optimizer: 3 Adam steps' losses per DP rank and the parameters after."""
    args = LayoutArgs(microbatches=1, adam_steps=3, distributed_optimizer=True)
    got = run(hf_dirs, tmp_path, preset, 2, args)
    ref = reference(preset, 2, 3)
    assert len(ref["losses"][0]) == 3
    assert_losses(got, ref, dp=2)
    assert_close(got["tensors"], ref["tensors"], PARAM_TOL, "param", relative=False)


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-MoE (issue 22): 8 experts, top-2, layer 0 dense, layers 1-2 sparse. Expert parallelism lives inside DP as
# in megatron (EP2 on 2 ranks is DP2 with the experts split), so every layout runs DP > 1 and is compared with one
# rank running all the DP ranks' micro-batches: 3 Adam steps, their micro-batch losses (which include the
# load-balancing loss's effect on the weights: its gradient is part of every step) and every parameter after them.
# PP2 carries the routers' statistics between the stages (models/internvl/moe.py); TP2 runs with sequence
# parallelism, megatron's requirement for MoE under TP, with the experts unsplit (ETP1) or split as the MLP (ETP2).
# Full recompute re-runs the routers in backward, where they take the load-balancing gradient directly.
# ---------------------------------------------------------------------------------------------------------------

MOE_PRESET = "qwen3_moe_vit300m"
MOE_MB, MOE_STEPS = 2, 3
MOE_LAYOUTS = {
    # name: (nproc, [LayoutArgs...]), one launch each
    "ep2_and_tp2_sp_ep2_etp1": (2, [LayoutArgs(ep=2, microbatches=MOE_MB, adam_steps=MOE_STEPS),
                                    LayoutArgs(ep=2, recompute=True, microbatches=MOE_MB, adam_steps=MOE_STEPS),
                                    LayoutArgs(tp=2, sp=True, ep=2, etp=1, microbatches=MOE_MB * 2,
                                               adam_steps=MOE_STEPS)]),
    "tp2_sp_ep2_etp2_and_pp2_ep2_and_dp4_ep2": (4, [
        LayoutArgs(tp=2, sp=True, ep=2, etp=2, microbatches=MOE_MB, adam_steps=MOE_STEPS),
        LayoutArgs(cp=2, ep=2, microbatches=MOE_MB, adam_steps=MOE_STEPS),
        LayoutArgs(pp=2, vpp=2, ep=2, vit_pp_layers=[[2, 0], [0, 0]], llm_pp_layers=[[0, 1], [1, 1]],
                   microbatches=4, adam_steps=MOE_STEPS),
        LayoutArgs(pp=2, ep=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[2, 1]], microbatches=MOE_MB,
                   adam_steps=MOE_STEPS, distributed_optimizer=True),
        LayoutArgs(ep=2, microbatches=1, adam_steps=MOE_STEPS, distributed_optimizer=True)]),
}


@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_moe_layout_matches_single_rank(name, hf_dirs, reference, tmp_path):
    nproc, layouts = MOE_LAYOUTS[name]
    for args, got in zip(layouts, run_many(hf_dirs, tmp_path, MOE_PRESET, nproc, layouts)):
        dp = nproc // (args.tp * args.pp * args.cp)
        ref = reference(MOE_PRESET, args.microbatches * dp, MOE_STEPS)
        print(args)
        assert_losses(got, ref, dp=dp)
        assert_close(got["tensors"], ref["tensors"], PARAM_TOL, "param", relative=False)
        for step, (a, b) in enumerate(zip(got["moe"], ref["moe"])):  # every rank logs the global batch's figures
            assert a["expert_load"] == b["expert_load"], (step, a["expert_load"], b["expert_load"])
            assert abs(a["load_balancing_loss"] - b["load_balancing_loss"]) <= LOSS_TOL * b["load_balancing_loss"]
