"""LoRA at every parallel layout against the single-rank run of the same code: 3 Adam steps from the same
weights and the same random adapters (B non-zero, so step 1's gradient reaches A), base ViT and LLM frozen,
projector trainable (as a user has LoRA), the ViT's last layer unfrozen in one case.

Compared per layout: each step's micro-batch losses (1e-5 relative), every trainable tensor after the steps
(PARAM_TOL absolute), the frozen base weights bit-identical to the loaded ones on every rank, only adapters and
the trainable modules changed, the start-up report's parameter counts (the registry's, whatever the layout)
and its optimizer-state bytes (Adam's two moments of what each rank's optimizer holds, plus step counters).
All six layouts run in one torchrun launch of two ranks (megatron's groups rebuilt between them)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers.launch import run_torchrun
from tests.helpers.layout_check import LayoutArgs, layout_plan, load_rank_results, merge_rank_results, run_layout
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = Path(__file__).parent / "workers" / "layout_worker.py"
LOSS_TOL, PARAM_TOL = 1e-5, 1e-6
PRESET, MB, STEPS = "vit6b", 4, 3

_LORA = dict(lora="both", adam_steps=STEPS, microbatches=MB)
LAYOUTS = {
    # name: LayoutArgs at world size 2 (vit6b: 5 ViT heads, split 3 + 2 at TP2)
    "tp2": LayoutArgs(tp=2, **_LORA),
    "tp2_sp": LayoutArgs(tp=2, sp=True, **_LORA),
    "pp2_vpp2_unfreeze_last_vit_layer": LayoutArgs(pp=2, vpp=2, vit_pp_layers=[[1, 1], [0, 0]],
                                                   llm_pp_layers=[[0, 0], [1, 1]], unfreeze_last_layers=1, **_LORA),
    "cp2_ring": LayoutArgs(cp=2, cp_algo="megatron_cp_algo", **_LORA),
    # 2 micro-batches on each of the 2 DP ranks: the single rank's 4
    "dp2_distributed_optimizer": LayoutArgs(distributed_optimizer=True, **{**_LORA, "microbatches": MB // 2}),
    "tp2_full_recompute": LayoutArgs(tp=2, recompute=True, **_LORA),
}


def _reference_args(args: LayoutArgs) -> LayoutArgs:
    """The single-rank run a layout is compared with (recompute changes no number: left out there)."""
    return LayoutArgs(lora=args.lora, unfreeze_last_layers=args.unfreeze_last_layers, adam_steps=STEPS,
                      microbatches=MB)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora_layouts") / PRESET, fmt="native", preset=PRESET, seed=7)


@pytest.fixture(scope="module")
def results(hf_dir, tmp_path_factory):
    """{name: (merged layout result, merged single-rank result, spec)}: the layouts in one launch, then the
    references in this process."""
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    root = tmp_path_factory.mktemp("lora_ranks")
    worker_args = [str(hf_dir)]
    for name, args in LAYOUTS.items():
        (root / name).mkdir()
        worker_args += [str(root / name), args.to_json()]
    run_torchrun(WORKER, 2, worker_args, timeout=600)
    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    refs, out = {}, {}
    try:
        for name, args in LAYOUTS.items():
            ref_args = _reference_args(args)
            key = ref_args.to_json()
            if key not in refs:
                spec, plan = layout_plan(hf_dir, ref_args, 1)
                refs[key] = merge_rank_results([run_layout(hf_dir, ref_args)], spec, plan)
            spec, plan = layout_plan(hf_dir, args, 2)
            out[name] = (merge_rank_results(load_rank_results(root / name), spec, plan), refs[key], spec)
    finally:
        destroy_distributed()
    return out


def _expected_trainable(spec) -> tuple[set, int, int]:
    from mindspeed_mm.models.internvl.params import params, trainable

    ps = params(spec, adapters=True)
    names = {p.name for p in ps if trainable(spec, p.name)}
    return names, sum(math.prod(p.shape) for p in ps), sum(math.prod(p.shape) for p in ps if p.name in names)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_matches_single_rank(name, results):
    got, ref, spec = results[name]
    args = LAYOUTS[name]
    dp = 2 if args.distributed_optimizer else 1
    # losses: every step, every micro-batch (the DP ranks' share of the single rank's)
    ref_steps = ref["losses"][0]
    assert len(ref_steps) == STEPS and set(got["losses"]) == set(range(dp))
    for dp_rank, steps in got["losses"].items():
        assert len(steps) == STEPS
        for step, (losses, want_all) in enumerate(zip(steps, ref_steps)):
            want = want_all[dp_rank::dp]
            assert len(losses) == len(want)
            for a, b in zip(losses, want):
                assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), f"{name} step {step} dp {dp_rank}: {a} vs {b}"
    # what trains: the registry's rule, on every rank as the model set it
    names, total, n_trainable = _expected_trainable(spec)
    assert any(".lora_a" in n for n in names) and any(n.startswith("image_encoder.projector.") for n in names)
    assert any(n.startswith("image_encoder.encoder.encoder.layers.1.") and ".lora_" not in n
               for n in names) == bool(args.unfreeze_last_layers)
    ranks = got["ranks"]
    held = set().union(*(r["trainable"] for r in ranks))
    assert held == names, sorted(held ^ names)[:5]
    # frozen base weights bit-identical to the loaded ones on every rank; only trainable ones changed
    for r in ranks:
        assert r["frozen_changed"] == [], (name, r["frozen_changed"][:5])
    changed = set().union(*(r["changed"] for r in ranks))
    assert changed <= names
    adapters = {n for n in names if ".lora_" in n}
    assert adapters <= changed, sorted(adapters - changed)[:5]
    # trainable tensors after 3 steps: within PARAM_TOL of one rank; the others equal to it exactly
    worst = 0.0
    for n, want in ref["tensors"].items():
        err = (got["tensors"][n] - want).abs().max().item()
        if n in names:
            assert err <= PARAM_TOL, f"{name} {n}: max diff {err:.3g}"
            worst = max(worst, err)
        else:
            assert err == 0.0, f"{name} {n}: frozen, yet differs from one rank by {err:.3g}"
    assert got["tensors"].keys() == ref["tensors"].keys()
    print(f"{name}: {len(names)} trainable tensors, worst diff {worst:.2e}")
    # the start-up report: every parameter once, whatever the layout
    for r in ranks:
        c = r["counts"]
        assert (c["total"], c["trainable"]) == (total, n_trainable), (name, c, total, n_trainable)
        assert c["adapters"] + c["vision"] + c["projector"] + c["text"] == c["trainable"]
        assert c["adapters"] == sum(math.prod(p.shape) for p in _adapter_params(spec))
    # optimizer state: Adam's exp_avg and exp_avg_sq (fp32) of what each rank's optimizer holds (a DP shard of
    # it under the distributed optimizer), plus one step counter per tensor it holds
    moments = 8 * sum(r["local_trainable"][0] for r in ranks) // dp
    counters = sum(r["local_trainable"][1] for r in ranks)
    state = ranks[0]["optimizer_state_bytes"]
    assert all(r["optimizer_state_bytes"] == state for r in ranks)
    assert moments <= state <= moments + 8 * counters, (name, state, moments, counters)


def _adapter_params(spec):
    from mindspeed_mm.models.internvl.params import params

    return [p for p in params(spec, adapters=True) if p.adapter]
