"""Checkpoints at expert parallelism on 2 ranks (gloo): mm-convert's EP rank files loaded into EP chunks (at their
own layout and resharded from others) equal the HF state sliced for each rank; a training save at EP2 holds what
the ranks trained (mm_to_hf of it equals their parameters, bit for bit) and resumes, at EP2 and at EP1, where the
uninterrupted run went (its optimizer state, gathered over the expert-data-parallel group, carried over)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, MMToHFConfig, ParallelConfig, hf_to_mm, mm_to_hf
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm as map_hf_to_mm
from mindspeed_mm.models.internvl.params import lookup
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from tests.helpers.launch import run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = Path(__file__).parent / "workers" / "moe_checkpoint_worker.py"
PRESET = "qwen3_moe_vit300m"
RESUME_TOL = 1e-6


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moe") / "hf", "native", PRESET, seed=13)


def _convert(hf, out, **pc):
    hf_to_mm(HFToMMConfig(mm_dir=str(out), hf_config=HFConfig(str(hf)), parallel_config=ParallelConfig(**pc),
                          progress=False))
    return str(out)


def _run(hf, out: Path, steps: list[dict], nproc: int = 2):
    out.mkdir(parents=True, exist_ok=True)
    return run_torchrun(WORKER, nproc, [str(hf), str(out), json.dumps(steps)], timeout=600)


EP2 = dict(tp=1, ep=2)
TP2_EP2_ETP1 = dict(tp=2, ep=2, etp=1, sp=True)


def test_converted_expert_checkpoints_load_into_ep_chunks(hf, tmp_path):
    ep2 = _convert(hf, tmp_path / "ep2", ep_size=2)
    etp1 = _convert(hf, tmp_path / "etp1", tp_size=2, ep_size=2, etp_size=1)
    ep1 = _convert(hf, tmp_path / "ep1")
    steps = [{"load": ep2, **EP2}, {"load": etp1, **EP2}, {"load": ep1, **EP2},
             {"load": etp1, **TP2_EP2_ETP1}, {"load": ep2, **TP2_EP2_ETP1}, {"load": ep2, "tp": 1, "ep": 1}]
    out = _run(hf, tmp_path / "ranks", steps).stdout
    assert out.count("tensors equal") == 2 * len(steps), out


def _merged(out: Path, tag: str) -> dict:
    """The full model's parameters from every rank's (the experts by their global names, each from its EP rank)."""
    full = {}
    for path in sorted(out.glob(f"{tag}_rank*.pt")):
        r = torch.load(path, weights_only=True)
        for name, t in r["params"].items():
            assert lookup(name)[0].per_expert or name not in full or torch.equal(full[name], t), name
            full.setdefault(name, t)
    return full


def _close(got: dict, want: dict, tol: float, what: str):
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= tol, f"{what}: worst diff {worst:.3g}"


def test_training_save_at_ep2_holds_the_trained_parameters_and_resumes(hf, tmp_path):
    save = tmp_path / "save"
    out = tmp_path / "ranks"
    _run(hf, out, [{"train": str(save), **EP2, "steps": 3, "save_after": 2, "tag": "a"}])
    assert sorted(p.name for p in (save / "iter_0000002").iterdir() if p.is_dir()) == \
        ["mp_rank_00_000", "mp_rank_00_001"]
    saved = _merged(out, "a_saved")
    spec = spec_from_hf_dir(hf)
    assert sum(lookup(n)[0].per_expert for n in saved) == 2 * spec.text.num_experts * len(spec.text.moe_layers)
    before = map_hf_to_mm(load_hf_checkpoint(hf)[2], spec, "native")
    assert not torch.equal(saved["text_decoder.decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight"],
                           before["text_decoder.decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight"])
    mm_to_hf(MMToHFConfig(mm_dir=str(save), save_hf_dir=str(tmp_path / "hf_back"), hf_config=HFConfig(str(hf)),
                          progress=False))
    back = map_hf_to_mm(load_hf_checkpoint(tmp_path / "hf_back")[2], spec, "native")
    assert back.keys() == saved.keys()
    for k in saved:
        assert torch.equal(back[k], saved[k]), k
    # the third step after loading the save (weights and distributed optimizer state) at EP2 and at EP1
    _run(hf, out, [{"train": str(tmp_path / "unused"), **EP2, "steps": 3, "load": str(save), "tag": "b"},
                   {"train": str(tmp_path / "unused"), "tp": 1, "ep": 1, "steps": 3, "load": str(save), "tag": "c"}])
    end = _merged(out, "a_end")
    _close(_merged(out, "b_end"), end, RESUME_TOL, "resumed at EP2")
    _close(_merged(out, "c_end"), end, RESUME_TOL, "resumed at EP1")
