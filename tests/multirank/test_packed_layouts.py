"""Packed micro-batches at every parallel layout against their samples run one by one on one rank.

A packed micro-batch (batches.make_packed_microbatches: three samples per micro-batch, in one row or two, the
second padded) runs through the real training path in per-sample mode; its samples alone run as one micro-batch
each (default mode: each micro-batch's loss is the sample's). Both steps are the gradient of the mean of the
samples' losses, so every sample's loss and every parameter's gradient must agree (1e-5, fp32): attention that
crossed samples, RoPE that did not restart per sample, or a target across a sample boundary would not.

All two-rank layouts share one torchrun launch (the worker rebuilds megatron's groups between them); the four-rank
CP layouts (every sample split over the CP ranks, `PackedLayout`) take one more, CP beside TP and SP another.
"""
from __future__ import annotations

import pytest

from tests.helpers.layout_check import LayoutArgs, layout_plan, merge_rank_results, run_layout
from tests.multirank.test_layouts import GRAD_TOL, LOSS_TOL, assert_close, run_many
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

pytestmark = [pytest.mark.multirank]

PRESET = "vit300m"
_PP2_VPP2 = dict(pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]], llm_pp_layers=[[0, 0], [1, 1]])
LAYOUTS = {
    # name: (LayoutArgs, DP size); microbatches: packs per DP rank
    "tp2_sp": (LayoutArgs(tp=2, sp=True, packed="pack", microbatches=2), 1),
    "pp2_vpp2": (LayoutArgs(**_PP2_VPP2, packed="pack", microbatches=4), 1),
    "cp2_ring": (LayoutArgs(cp=2, cp_algo="megatron_cp_algo", packed="pack", microbatches=2), 1),
    "cp2_ulysses": (LayoutArgs(cp=2, cp_algo="ulysses_cp_algo", packed="pack", microbatches=2), 1),
    "dp2": (LayoutArgs(packed="pack", microbatches=1), 2),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {PRESET: write_tiny_checkpoint(tmp_path_factory.mktemp("packed") / PRESET, fmt="native", preset=PRESET,
                                          seed=7)}


@pytest.fixture(scope="module")
def reference(hf_dirs):
    """One-rank results in this process: the samples alone, or packed, per number of packs."""
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    cache = {}

    def get(packs: int, packed: str = "alone"):
        if (packs, packed) not in cache:
            args = LayoutArgs(packed=packed, microbatches=packs)
            spec, plan = layout_plan(hf_dirs[PRESET], args, 1)
            cache[packs, packed] = merge_rank_results([run_layout(hf_dirs[PRESET], args)], spec, plan)
        return cache[packs, packed]

    yield get
    destroy_distributed()


def assert_sample_losses(got: dict, alone: dict, dp: int, what: str) -> float:
    """Every DP rank's per-sample losses against the samples of its packs (packs dp_rank::dp) alone."""
    per_pack = 3
    ref = alone["losses"][0][0]
    worst = 0.0
    for dp_rank, (losses,) in got["losses"].items():
        want = [x for pack in range(dp_rank, len(ref) // per_pack, dp)
                for x in ref[pack * per_pack:(pack + 1) * per_pack]]
        assert len(losses) == len(want), (what, len(losses), len(want))
        for a, b in zip(losses, want):
            assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), f"{what} dp {dp_rank}: sample loss {a} vs alone {b}"
            worst = max(worst, abs(a - b))
    print(f"{what}: {sum(len(v[0]) for v in got['losses'].values())} sample losses, worst diff {worst:.1e}")
    return worst


def test_pack_at_one_rank_matches_samples_alone(reference):
    for packs in (2, 4):
        got, alone = reference(packs, "pack"), reference(packs)
        assert_sample_losses(got, alone, 1, f"one rank, {packs} packs")
        assert_close(got["tensors"], alone["tensors"], GRAD_TOL, f"grad (one rank, {packs} packs)")


def test_pack_at_every_layout_matches_samples_alone_on_one_rank(hf_dirs, reference, tmp_path):
    layouts = [args for args, _ in LAYOUTS.values()]
    results = run_many(hf_dirs, tmp_path, PRESET, 2, layouts)
    for (name, (args, dp)), got in zip(LAYOUTS.items(), results):
        alone = reference(args.microbatches * dp)
        assert_sample_losses(got, alone, dp, name)
        assert_close(got["tensors"], alone["tensors"], GRAD_TOL, f"grad ({name})")



LAYOUTS_4 = {
    # four ranks: every sample split over four CP ranks
    "cp4_ring": (LayoutArgs(cp=4, cp_algo="megatron_cp_algo", packed="pack", microbatches=2), 1),
    "cp4_ulysses": (LayoutArgs(cp=4, cp_algo="ulysses_cp_algo", packed="pack", microbatches=2), 1),
}
# CP beside TP with SP, and beside PP (four ranks, a launch of their own)
CP2_TP2_SP = {"cp2_tp2_sp_ring": (LayoutArgs(tp=2, sp=True, cp=2, cp_algo="megatron_cp_algo", packed="pack",
                                             microbatches=2), 1),
              "cp2_pp2_vpp2_ulysses": (LayoutArgs(**_PP2_VPP2, cp=2, cp_algo="ulysses_cp_algo", packed="pack",
                                                  microbatches=4), 1)}


def _check_four_ranks(hf_dirs, reference, tmp_path, layouts):
    results = run_many(hf_dirs, tmp_path, PRESET, 4, [args for args, _ in layouts.values()])
    for (name, (args, dp)), got in zip(layouts.items(), results):
        alone = reference(args.microbatches * dp)
        assert_sample_losses(got, alone, dp, name)
        assert_close(got["tensors"], alone["tensors"], GRAD_TOL, f"grad ({name})")


def test_pack_at_cp4_matches_samples_alone_on_one_rank(hf_dirs, reference, tmp_path):
    _check_four_ranks(hf_dirs, reference, tmp_path, LAYOUTS_4)


@pytest.mark.slow
def test_pack_at_cp2_beside_tp_sp_and_pp_matches_samples_alone_on_one_rank(hf_dirs, reference, tmp_path):
    _check_four_ranks(hf_dirs, reference, tmp_path, CP2_TP2_SP)
