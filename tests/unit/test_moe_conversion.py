"""mm-convert at expert parallelism: megatron's ``mp_rank_XX[_YYY]_ZZZ`` rank files, each with its EP rank's experts
under local indices, written by hf_to_mm, read back by mm_to_hf, resplit between EP/ETP/TP/PP layouts; every tensor
checked bit for bit against the source safetensors, and the expert files against the HF tensors of the experts they
must hold."""
from __future__ import annotations

import shutil

import pytest
import torch

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.checkpoint.mm_format import META_FILE, read_meta
from mindspeed_mm.cli.mm_convert import (
    HFConfig, HFToMMConfig, MMToHFConfig, ParallelConfig, ResplitConfig, hf_to_mm, main, mm_to_hf, resplit,
)
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.testing.tiny_checkpoint import TINY_PRESETS, write_tiny_checkpoint

PRESET = "qwen3_moe_vit300m"
E = 8  # the preset's experts
FC1 = "text_decoder.decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.weight"
FC2 = "text_decoder.decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.weight"
HF = "language_model.model.layers.{i}.mlp.experts.{e}.{x}_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {fmt: write_tiny_checkpoint(root / fmt, fmt, PRESET, seed=11) for fmt in ("native", "original")}


def _to_mm(hf, out, **pc):
    hf_to_mm(HFToMMConfig(mm_dir=str(out), hf_config=HFConfig(str(hf)), parallel_config=ParallelConfig(**pc),
                          progress=False))
    return out


def _to_hf(mm, out, **kw):
    mm_to_hf(MMToHFConfig(mm_dir=str(mm), save_hf_dir=str(out), progress=False, **kw))
    return load_hf_checkpoint(out)[2]


def _assert_equal(got, want):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:4]
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _rank_file(mm, name):
    return torch.load(mm / "release" / name / "model_optim_rng.pt", weights_only=True)["model"]


LAYOUTS = {  # name: (ParallelConfig fields, the rank directories megatron's ranks give)
    "ep2": (dict(ep_size=2), ["mp_rank_00_000", "mp_rank_00_001"]),
    # etp 1 at tp 2: megatron lays the expert ranks etp-first over the same ranks, so rank r is (tp r % 2,
    # ep r % 2): the pairs (0, 0) and (1, 1) only
    "tp2_ep2_etp1": (dict(tp_size=2, ep_size=2, etp_size=1), ["mp_rank_00_000", "mp_rank_01_001"]),
    "tp2_ep2_etp2_pp2": (dict(tp_size=2, ep_size=2, etp_size=2, vit_pp_layers=[[2, 0]], llm_pp_layers=[[2, 1]]),
                         [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]),
}


@pytest.mark.parametrize("fmt", ["native", "original"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ep_round_trips_bit_exact(ckpts, tmp_path, name, fmt):
    hf = ckpts[fmt]
    _, _, state = load_hf_checkpoint(hf)
    pc, dirs = LAYOUTS[name]
    mm = _to_mm(hf, tmp_path / "mm", **pc)
    assert sorted(p.name for p in (mm / "release").iterdir()) == sorted(dirs)
    meta = read_meta(mm)
    assert (meta.ep, meta.etp) == (2, pc.get("etp_size", 1) if pc.get("tp_size", 1) > 1 else 1)
    _assert_equal(_to_hf(mm, tmp_path / "direct"), state)
    one = tmp_path / "ep1"
    resplit(ResplitConfig(mm_dir=str(mm), save_mm_dir=str(one), parallel_config=ParallelConfig(), progress=False))
    assert [p.name for p in (one / "release").iterdir()] == ["mp_rank_00"]
    assert read_meta(one).ep == 1
    _assert_equal(_to_hf(one, tmp_path / "via_ep1"), state)


def test_expert_files_hold_their_experts_under_local_indices(ckpts, tmp_path):
    """Each EP rank's file holds exactly E/ep experts per sparse layer, numbered 0..E/ep-1, and local j of EP rank r
    is the HF expert r*E/ep + j (gate and up stacked, as the dense MLP's fc1)."""
    _, _, state = load_hf_checkpoint(ckpts["native"])
    mm = _to_mm(ckpts["native"], tmp_path / "mm", ep_size=2)
    sparse = [i for i in range(TINY_PRESETS[PRESET].llm_layers) if i > 0]  # layer 0 is dense
    local = E // 2
    for r in range(2):
        sd = _rank_file(mm, f"mp_rank_00_{r:03d}")
        for i in sparse:
            held = sorted(int(k.split(".")[7]) for k in sd if f"layers.{i}.mlp.experts." in k and "fc2" in k)
            assert held == list(range(local))
            for j in range(local):
                e = r * local + j
                fc1 = torch.cat([state[HF.format(i=i, e=e, x="gate")], state[HF.format(i=i, e=e, x="up")]])
                assert torch.equal(sd[FC1.format(i=i, j=j)], fc1)
                assert torch.equal(sd[FC2.format(i=i, j=j)], state[HF.format(i=i, e=e, x="down")])
        # the dense tensors: every EP rank's copy whole (TP1)
        assert torch.equal(sd["text_decoder.decoder.layers.0.mlp.linear_fc2.weight"],
                           state["language_model.model.layers.0.mlp.down_proj.weight"])
        assert torch.equal(sd["text_decoder.decoder.layers.1.mlp.router.weight"],
                           state["language_model.model.layers.1.mlp.gate.weight"])


def test_etp1_files_hold_whole_experts_and_tp_sliced_dense(ckpts, tmp_path):
    _, _, state = load_hf_checkpoint(ckpts["native"])
    mm = _to_mm(ckpts["native"], tmp_path / "mm", tp_size=2, ep_size=2, etp_size=1)
    sd = _rank_file(mm, "mp_rank_01_001")
    down = state["language_model.model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(sd["text_decoder.decoder.layers.0.mlp.linear_fc2.weight"], down[:, down.shape[1] // 2:])
    assert torch.equal(sd[FC2.format(i=2, j=1)], state[HF.format(i=2, e=E // 2 + 1, x="down")])


@pytest.mark.parametrize("a,b", [
    (dict(ep_size=2), dict(tp_size=2, ep_size=4, etp_size=1)),
    (dict(tp_size=2, ep_size=2, etp_size=1), dict(tp_size=2, ep_size=2, etp_size=2, vit_pp_layers=[[2, 0]],
                                                  llm_pp_layers=[[2, 1]])),
    (dict(ep_size=4), dict(tp_size=2)),
])
def test_resplit_between_expert_layouts_equals_direct_conversion(ckpts, tmp_path, a, b):
    hf = ckpts["original"]
    src = _to_mm(hf, tmp_path / "a", **a)
    direct = _to_mm(hf, tmp_path / "direct", **b)
    resplit(ResplitConfig(mm_dir=str(src), save_mm_dir=str(tmp_path / "b"), parallel_config=ParallelConfig(**b),
                          progress=False))
    got, want = sorted((tmp_path / "b" / "release").iterdir()), sorted((direct / "release").iterdir())
    assert [p.name for p in got] == [p.name for p in want]
    for g, w in zip(got, want):
        _assert_equal(_rank_file(tmp_path / "b", g.name), _rank_file(direct, w.name))


def test_without_metadata_the_expert_layout_is_read_off_the_files(ckpts, tmp_path):
    _, _, state = load_hf_checkpoint(ckpts["native"])
    for i, pc in enumerate(v[0] for v in LAYOUTS.values()):
        mm = _to_mm(ckpts["native"], tmp_path / f"mm{i}", **pc)
        (mm / META_FILE).unlink()
        _assert_equal(_to_hf(mm, tmp_path / f"hf{i}", hf_config=HFConfig(str(ckpts["native"]))), state)


@pytest.mark.parametrize("meta", [True, False])
def test_a_missing_expert_file_is_named(ckpts, tmp_path, meta, capsys):
    mm = _to_mm(ckpts["native"], tmp_path / "mm", tp_size=2, ep_size=2, etp_size=2, vit_pp_layers=[[2, 0]],
                llm_pp_layers=[[2, 1]])
    if not meta:
        (mm / META_FILE).unlink()
    shutil.rmtree(mm / "release" / "mp_rank_01_000_001")
    capsys.readouterr()
    argv = ["InternVLConverter", "mm_to_hf", "--cfg.mm_dir", str(mm), "--cfg.save_hf_dir", str(tmp_path / "out"),
            "--cfg.hf_config.hf_dir", str(ckpts["native"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mp_rank_01_000_001" in err[0] and "missing" in err[0], err


def test_a_truncated_expert_file_is_named(ckpts, tmp_path):
    mm = _to_mm(ckpts["native"], tmp_path / "mm", ep_size=2)
    path = mm / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match="mp_rank_00_001"):
        _to_hf(mm, tmp_path / "out")


def test_dry_run_lists_the_expert_files(ckpts):
    from mindspeed_mm.checkpoint.convert import dry_run_from_files

    report = dry_run_from_files(str(ckpts["native"]), parallel=ParallelConfig(tp_size=2, ep_size=2, etp_size=1))
    assert sorted(report.ranks) == [(0, 0, 0), (1, 0, 1)]
    assert "ep_rank 1" in report.line()
