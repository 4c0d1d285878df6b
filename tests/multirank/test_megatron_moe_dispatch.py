"""megatron-core's MoELayer (alltoall dispatcher, SequentialMLP experts) on gloo under EP, EP x TP + SP and
expert TP: outputs and gradients as the same layer at EP1 on one rank with the same full weights."""
import json
from pathlib import Path

import pytest

from tests.helpers.launch import run_torchrun

WORKER = Path(__file__).parent / "workers" / "moe_dispatch.py"
TOL = 1e-5  # relative to the largest value; float32 sums in another order


def _run(tmp_path: Path, nproc: int, *layouts: str) -> dict:
    out = tmp_path / "result.json"
    run_torchrun(WORKER, nproc=nproc, args=[str(out), *layouts], timeout=120)
    return json.loads(out.read_text())


def _check(result: dict, layout: str, local_experts: int) -> None:
    r = result[layout]
    for what, diff in r["diffs"].items():
        assert diff <= TOL, (layout, what, r["diffs"])
    assert r["param_names"] == ["router.weight"] + [f"experts.local_experts.{i}.linear_fc{n}.weight"
                                                    for i in range(local_experts) for n in (1, 2)], r


@pytest.mark.multirank
def test_ep2_matches_one_rank(tmp_path):
    r = _run(tmp_path, 2, "1,2,1")  # layout: tp,ep,etp
    _check(r, "1,2,1", local_experts=2)
    assert r["1,2,1"]["expert_groups"] == {"ep": 2, "etp": 1, "edp": 1}


@pytest.mark.multirank
def test_ep2_with_tp2_sp_and_expert_tp_matches_one_rank(tmp_path):
    r = _run(tmp_path, 4, "2,2,1", "2,2,2")
    _check(r, "2,2,1", local_experts=2)
    _check(r, "2,2,2", local_experts=2)
    assert r["2,2,1"]["expert_groups"] == {"ep": 2, "etp": 1, "edp": 2}
    assert r["2,2,2"]["expert_groups"] == {"ep": 2, "etp": 2, "edp": 1}
