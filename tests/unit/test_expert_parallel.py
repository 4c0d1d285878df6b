"""Expert parallelism before any process group: the sizes, the layout's checks against the LLM, the flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_mm.config.model_spec import load_model_spec
from mindspeed_mm.config.parallel import ParallelConfig, ParallelSizes
from mindspeed_mm.parallel.layout import LayoutError, plan_from_parallel_config, plan_layout

TINY = Path(__file__).resolve().parents[2] / "examples" / "internvl3" / "model_tiny.json"
MOE = {"model_id": "qwen3_moe", "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 16,
       "qk_layernorm": True, "add_qkv_bias": False}


@pytest.fixture(scope="module")
def moe_json(tmp_path_factory):
    raw = json.loads(TINY.read_text())
    raw["text_decoder"].update(MOE)
    path = tmp_path_factory.mktemp("moe") / "model.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def moe_spec(moe_json):
    return load_model_spec(moe_json)


@pytest.fixture(scope="module")
def dense_spec():
    return load_model_spec(TINY)


# --- ParallelSizes ------------------------------------------------------------------------------

def test_defaults_are_unchanged():
    p = ParallelSizes(2, 1, 1, None, True, 3)  # positional, as before experts existed
    assert (p.ep, p.etp, p.expert_tp, p.world_size, p.expert_dp) == (1, None, 2, 6, 3)


@pytest.mark.parametrize("kw,world,expert_dp", [
    (dict(ep=2, dp=2), 2, 1),
    (dict(tp=2, sp=True, ep=2, etp=1, dp=1), 2, 1),  # EP over the TP ranks
    (dict(tp=2, sp=True, ep=2, dp=2), 4, 1),
    (dict(tp=2, sp=True, ep=2, etp=1, dp=2), 4, 2),
    (dict(ep=2, cp=2), 2, 1),
    (dict(pp=2, ep=2, dp=2), 4, 1),
])
def test_ep_lives_inside_data_parallel(kw, world, expert_dp):
    p = ParallelSizes(**kw)
    assert (p.world_size, p.expert_dp) == (world, expert_dp)


@pytest.mark.parametrize("kw,match", [
    (dict(ep=2), r"tp\*cp\*dp = 1\*1\*1 = 1 .* etp\*ep = 1\*2 = 2"),
    (dict(tp=2, sp=True, ep=2, dp=1), r"etp\*ep = 2\*2 = 4"),
    (dict(tp=4, etp=2, ep=2, dp=1), "must be 1 or tp=4"),
    (dict(tp=2, etp=1), "needs ep > 1"),
    (dict(ep=0), "ep must be an int >= 1"),
    (dict(etp=0), "etp must be null or an int >= 1"),
])
def test_bad_expert_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelSizes(**kw)


def test_from_world_size_and_smallest():
    assert ParallelSizes.from_world_size(4, tp=2, ep=2).dp == 2
    with pytest.raises(ValueError, match="etp\\*ep"):
        ParallelSizes.from_world_size(2, tp=2, ep=2)
    assert ParallelSizes.smallest(ep=2).world_size == 2
    assert ParallelSizes.smallest(tp=2, ep=2, etp=1).world_size == 2
    assert ParallelSizes.smallest(tp=2, ep=4).world_size == 8
    assert ParallelSizes.smallest(tp=2, pp=2) == ParallelSizes(tp=2, pp=2)


# --- the layout ---------------------------------------------------------------------------------

def test_moe_plan_carries_the_expert_split(moe_spec):
    plan = plan_layout(moe_spec, ParallelSizes(tp=2, sp=True, ep=2, etp=1, dp=2), 4)
    assert (plan.parallel.ep, plan.parallel.expert_tp) == (2, 1)
    assert "EP2 ETP1" in plan.describe()
    same_but_etp = plan_layout(moe_spec, ParallelSizes(tp=2, sp=True, ep=2, dp=2), 4)
    assert not plan.same_split(same_but_etp)  # the rank files hold other expert shards


@pytest.mark.parametrize("kw,world,match", [
    (dict(ep=8, dp=8), 8, r"expert_model_parallel_size=8: text_decoder.num_experts=4"),
    (dict(ep=2, dp=2), 3, r"world size 3 is not a multiple of tp\*pp\*cp|etp\*ep\*pp"),
])
def test_moe_layout_errors(moe_spec, kw, world, match):
    with pytest.raises(LayoutError, match=match):
        plan_layout(moe_spec, ParallelSizes(**kw), world)


def test_expert_ffn_must_split_over_etp(moe_spec, tmp_path):
    raw = json.loads(TINY.read_text())
    raw["text_decoder"].update(MOE, moe_ffn_hidden_size=15)
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(LayoutError, match="expert_tensor_parallel_size=2: text_decoder.moe_ffn_hidden_size=15"):
        plan_layout(load_model_spec(tmp_path / "m.json"), ParallelSizes(tp=2, sp=True, ep=2, dp=2), 4)


def test_dense_llm_refuses_ep_and_forgets_etp(dense_spec):
    with pytest.raises(LayoutError, match="expert_model_parallel_size=2: the LLM .* has no experts"):
        plan_layout(dense_spec, ParallelSizes(ep=2, dp=2), 2)
    plan = plan_layout(dense_spec, ParallelSizes(tp=2, etp=2), 2)
    assert plan.parallel == ParallelSizes(tp=2) and plan.same_split(plan_layout(dense_spec, ParallelSizes(tp=2), 2))


def test_parallel_config_ep_size(moe_spec, dense_spec):
    plan = plan_from_parallel_config(moe_spec, ParallelConfig(tp_size=2, ep_size=2, etp_size=1))
    assert (plan.parallel.ep, plan.parallel.expert_tp, plan.parallel.world_size) == (2, 1, 2)
    plan = plan_from_parallel_config(moe_spec, ParallelConfig(ep_size=4))
    assert (plan.parallel.ep, plan.parallel.dp) == (4, 4)
    assert plan_from_parallel_config(dense_spec, ParallelConfig(tp_size=2)).parallel == ParallelSizes(tp=2)
    for pc, match in ((ParallelConfig(ep_size=2), "parallel_config.ep_size=2: the LLM"),
                      (ParallelConfig(ep_size=3), "parallel_config.ep_size=3: text_decoder.num_experts=4"),
                      (ParallelConfig(ep_size=0), "parallel_config.ep_size must be an integer >= 1"),
                      (ParallelConfig(tp_size=2, etp_size=3, ep_size=2), "must be 1 or tp=2")):
        with pytest.raises(LayoutError, match=match):
            plan_from_parallel_config(moe_spec if pc.ep_size != 2 or pc.etp_size else dense_spec, pc)


# --- the flags ----------------------------------------------------------------------------------

def _train_main(model, *flags):
    from mindspeed_mm.training.train import main

    return main(["--mm-model", str(model), "--mm-data", "d", "--train-iters", "1", *map(str, flags)])


def test_flags_feed_parallel_sizes(moe_json):
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.train import _parallel_sizes

    args = parse_args(["--mm-model", str(moe_json), "--mm-data", "d", "--train-iters", "1",
                       "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"])
    assert _parallel_sizes(args, 4) == ParallelSizes(tp=2, sp=True, dp=2, ep=2, etp=1)
    assert _parallel_sizes(args) == ParallelSizes(tp=2, sp=True, dp=1, ep=2, etp=1)


@pytest.mark.parametrize("flags,want", [
    (["--expert-model-parallel-size", "2"], "expert_model_parallel_size=2: the LLM (text_decoder.model_id "
                                            "'internllm') has no experts"),
    (["--expert-model-parallel-size", "0"], "--expert-model-parallel-size must be >= 1, got 0"),
    (["--expert-tensor-parallel-size", "0"], "--expert-tensor-parallel-size must be >= 1, got 0"),
    (["--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"], "needs ep > 1"),
])
def test_bad_expert_flags_exit_with_one_line(flags, want, capsys):
    assert _train_main(TINY, *flags) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and want in err[0], err


def test_moe_flags_pass_the_layout_check(moe_json, capsys):
    # past the layout: the next check to fail is the data JSON's ("d" is no file)
    assert _train_main(moe_json, "--expert-model-parallel-size", "2") == 2
    err = capsys.readouterr().err
    assert "ConfigError: d: cannot read the file" in err and "expert" not in err, err
    assert _train_main(moe_json, "--expert-model-parallel-size", "3") == 2
    assert "expert_model_parallel_size=3: text_decoder.num_experts=4" in capsys.readouterr().err


def test_inference_expert_flags_must_match_the_run():
    from types import SimpleNamespace

    from mindspeed_mm.config.model_flags import ArgumentError
    from mindspeed_mm.inference.cli import _parse, reconcile_flags

    info = SimpleNamespace(tp=2, pp=1, path="ckpt", describe=lambda: "TP2 x PP1",
                           plan=SimpleNamespace(vpp=None, parallel=ParallelSizes(tp=2)))
    for flags, match in ((["--expert-model-parallel-size", "2"], "no expert parallelism"),
                         (["--expert-tensor-parallel-size", "1"], "contradicts the run's 2")):
        with pytest.raises(ArgumentError, match=match):
            reconcile_flags(_parse(["cfg.json", *flags]), None, info)
