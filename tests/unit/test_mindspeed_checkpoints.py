"""MindSpeed-MM's own InternVL3 checkpoints, as its converter and trainer write them (tests/helpers/
mindspeed_checkpoint.py, by its rules and not ours): read back bit-exact, written exactly, their layout
discovered from the files, bad ones refused in one line, their training saves read without running anything."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm.checkpoint import torch_file
from mindspeed_mm.checkpoint.mm_format import META_FILE, read_rank_file
from mindspeed_mm.cli.mm_convert import (
    HFConfig, HFToMMConfig, MMToHFConfig, ParallelConfig, ResplitConfig, hf_to_mm, main, mm_to_hf, resplit,
)
from mindspeed_mm.errors import CheckpointFormatError, UserError
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from tests.helpers.launch import run_converter_without_torch
from tests.helpers.mindspeed_checkpoint import write_mindspeed_checkpoint

CASES = {
    # name: (preset, dtype, tp, vit per stage, llm per stage); vocab 333 (odd), ViT 5 heads (unaligned)
    "tp2": ("vit6b", "float32", 2, None, None),
    "tp4": ("tp4", "bfloat16", 4, None, None),
    "tp2_pp2": ("deep", "float32", 2, [[4, 0]], [[1, 3]]),
    "tp2_pp2_vpp2": ("deep", "float32", 2, [[2, 2], [0, 0]], [[0, 0], [2, 2]]),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_hf")
    out = {}
    for preset, dtype in sorted({(c[0], c[1]) for c in CASES.values()}):
        out[preset, dtype] = write_tiny_checkpoint(root / f"{preset}_{dtype}", fmt="original", preset=preset,
                                                   seed=4, dtype=dtype)
    return out


def _pc(tp, vit, llm) -> ParallelConfig:
    return ParallelConfig(tp_size=tp, vit_pp_layers=vit, llm_pp_layers=llm)


@pytest.fixture(scope="module")
def ms(hf, tmp_path_factory):
    """Each case as MindSpeed-MM's conversion, and tp2_pp2 also as its training save."""
    root = tmp_path_factory.mktemp("ms_ckpt")
    out = {}
    for name, (preset, dtype, tp, vit, llm) in CASES.items():
        out[name] = write_mindspeed_checkpoint(hf[preset, dtype], root / name, tp, vit, llm)
    preset, dtype, tp, vit, llm = CASES["tp2_pp2"]
    out["tp2_pp2_save"] = write_mindspeed_checkpoint(hf[preset, dtype], root / "save", tp, vit, llm,
                                                     as_training_save=True)
    return out


def _hf_of(hf, name: str) -> Path:
    preset, dtype = CASES[name.removesuffix("_save")][:2]
    return hf[preset, dtype]


def _rank_files(mm_dir: Path) -> dict[str, dict]:
    return {str(f.relative_to(mm_dir)): torch.load(f, weights_only=True) for f in sorted(mm_dir.rglob("*.pt"))}


def _assert_same_rank_files(a: Path, b: Path) -> None:
    fa, fb = _rank_files(a), _rank_files(b)
    assert fa.keys() == fb.keys() and fa
    for path in fa:
        oa, ob = fa[path], fb[path]
        assert oa.keys() == ob.keys(), path
        for key in oa:
            if not isinstance(oa[key], dict):
                assert oa[key] == ob[key], (path, key)
                continue
            assert oa[key].keys() == ob[key].keys(), (path, key)
            for k, t in oa[key].items():
                u = ob[key][k]
                assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), (path, key, k)
    assert (a / "latest_checkpointed_iteration.txt").read_text() == (b / "latest_checkpointed_iteration.txt").read_text()


def _safetensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", [*CASES, "tp2_pp2_save"])
def test_mm_to_hf_of_mindspeed_files_is_bit_exact(hf, ms, tmp_path, name):
    src = _hf_of(hf, name)
    mm_to_hf(MMToHFConfig(mm_dir=str(ms[name]), save_hf_dir=str(tmp_path / "out"), hf_config=HFConfig(str(src)),
                          progress=False))
    want, got = _safetensors(src), _safetensors(tmp_path / "out")
    assert want.keys() == got.keys()
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_to_mm_mindspeed_target_writes_their_files(hf, ms, tmp_path, name):
    _, _, tp, vit, llm = CASES[name]
    hf_to_mm(HFToMMConfig(mm_dir=str(tmp_path / "ours"), hf_config=HFConfig(str(_hf_of(hf, name))),
                          parallel_config=_pc(tp, vit, llm), target_format="mindspeed", progress=False))
    _assert_same_rank_files(ms[name], tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / META_FILE).read_text())["tp_style"] == "mindspeed"


@pytest.mark.parametrize("name", ["tp4", "tp2_pp2_vpp2", "tp2_pp2_save"])
def test_resplit_mindspeed_to_mm_and_back_is_bit_exact(hf, ms, tmp_path, name):
    _, _, tp, vit, llm = CASES[name.removesuffix("_save")]
    resplit(ResplitConfig(mm_dir=str(ms[name]), save_mm_dir=str(tmp_path / "mm"), hf_config=HFConfig(str(_hf_of(hf, name))),
                          parallel_config=_pc(tp // 2 or 1, None, None), progress=False))
    assert json.loads((tmp_path / "mm" / META_FILE).read_text())["tp_style"] == "mm"
    resplit(ResplitConfig(mm_dir=str(tmp_path / "mm"), save_mm_dir=str(tmp_path / "back"),
                          parallel_config=_pc(tp, vit, llm), target_format="mindspeed", progress=False))
    # of a training save, what comes back is the release conversion of its weights
    _assert_same_rank_files(ms[name.removesuffix("_save")], tmp_path / "back")


def test_mm_style_resplit_to_mindspeed_equals_direct(hf, ms, tmp_path):
    """mm -> mindspeed at the same layout changes only the projector and the vocabulary."""
    _, _, tp, vit, llm = CASES["tp2_pp2"]
    hf_to_mm(HFToMMConfig(mm_dir=str(tmp_path / "mm"), hf_config=HFConfig(str(_hf_of(hf, "tp2_pp2"))),
                          parallel_config=_pc(tp, vit, llm), progress=False))
    resplit(ResplitConfig(mm_dir=str(tmp_path / "mm"), save_mm_dir=str(tmp_path / "ms"),
                          parallel_config=_pc(tp, vit, llm), target_format="mindspeed", progress=False))
    _assert_same_rank_files(ms["tp2_pp2"], tmp_path / "ms")
    mm, theirs = _rank_files(tmp_path / "mm"), _rank_files(ms["tp2_pp2"])
    differ = {k for f in mm for k in mm[f]["model"] if mm[f]["model"][k].shape != theirs[f]["model"][k].shape}
    assert differ == {"image_encoder.projector.linear_fc1.weight", "image_encoder.projector.linear_fc1.bias",
                      "image_encoder.projector.linear_fc2.weight", "text_decoder.embedding.word_embeddings.weight",
                      "text_decoder.output_layer.weight"}


# ------------------------------------------------------------------------------------------------ discovery

def _one_line_error(exc_type, fn, match: str) -> str:
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def _to_hf(mm_dir, out, hf_dir=None, pc=None):
    return lambda: mm_to_hf(MMToHFConfig(mm_dir=str(mm_dir), save_hf_dir=str(out),
                                         hf_config=HFConfig(str(hf_dir) if hf_dir else None), parallel_config=pc,
                                         progress=False))


def test_discovered_layout_and_style(hf, ms):
    from mindspeed_mm.checkpoint.discover import discover
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir

    for name, (_, _, tp, vit, llm) in CASES.items():
        found = discover(ms[name], spec_from_hf_dir(_hf_of(hf, name)))
        assert found.tp_style == "mindspeed"
        assert (found.plan.parallel.tp, [list(r) for r in found.plan.vit_pp_layers],
                [list(r) for r in found.plan.llm_pp_layers]) == (tp, vit or [[2]], llm or [[2]])


def test_missing_rank_dir_is_named(hf, ms, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ms["tp2_pp2"], bad)
    shutil.rmtree(bad / "release" / "mp_rank_01_001")
    _one_line_error(CheckpointFormatError, _to_hf(bad, tmp_path / "o", _hf_of(hf, "tp2_pp2")),
                    "rank directory mp_rank_01_001 is missing")
    shutil.copytree(ms["tp2_pp2"], tmp_path / "extra")
    (tmp_path / "extra" / "release" / "mp_rank_02").mkdir()
    _one_line_error(CheckpointFormatError, _to_hf(tmp_path / "extra", tmp_path / "o", _hf_of(hf, "tp2_pp2")),
                    "mixes rank directories")


def test_layer_sums_against_another_model_are_refused(hf, ms, tmp_path):
    _one_line_error(CheckpointFormatError, _to_hf(ms["tp2_pp2"], tmp_path / "o", _hf_of(hf, "tp2")),
                    "but the model config has 2")


def test_explicit_parallel_config_must_match_the_files(hf, ms, tmp_path):
    msg = _one_line_error(UserError, _to_hf(ms["tp2_pp2"], tmp_path / "o", _hf_of(hf, "tp2_pp2"),
                                            _pc(2, [[4, 0]], [[2, 2]])), "parallel_config says")
    assert "llm[[1, 3]]" in msg
    mm_to_hf(MMToHFConfig(mm_dir=str(ms["tp2_pp2"]), save_hf_dir=str(tmp_path / "ok"),
                          hf_config=HFConfig(str(_hf_of(hf, "tp2_pp2"))), parallel_config=_pc(2, [[4, 0]], [[1, 3]]),
                          progress=False))


def test_hf_dir_is_required_without_metadata(ms, tmp_path, capsys):
    _one_line_error(UserError, _to_hf(ms["tp2"], tmp_path / "o"), "hf_config.hf_dir is required")
    assert main(["InternVLConverter", "mm_to_hf", "--cfg.mm_dir", str(ms["tp2"]), "--cfg.save_hf_dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf_config.hf_dir" in err[0], err


def test_inconsistent_shapes_are_named(hf, ms, tmp_path):
    """A rank file whose vocabulary rows follow neither convention: the file and tensor are named."""
    bad = tmp_path / "bad"
    shutil.copytree(ms["tp2"], bad)
    f = bad / "release" / "mp_rank_01" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=True)
    obj["model"]["text_decoder.output_layer.weight"] = obj["model"]["text_decoder.output_layer.weight"][:-3]
    torch.save(obj, f)
    msg = _one_line_error(CheckpointFormatError, _to_hf(bad, tmp_path / "o", _hf_of(hf, "tp2")),
                          "text_decoder.output_layer.weight has shape")
    assert "mp_rank_01" in msg


def test_inference_reads_a_mindspeed_checkpoint(hf, ms, tmp_path):
    from mindspeed_mm.inference.loading import inspect_checkpoint
    from mindspeed_mm.testing.tiny_run import write_model_json

    model = json.loads(write_model_json(_hf_of(hf, "tp2_pp2"), tmp_path / "model.json").read_text())
    info = inspect_checkpoint(ms["tp2_pp2_save"], model)
    assert (info.kind, info.tp_style, info.tp, info.pp) == ("mm_dir", "mindspeed", 2, 2)


# ------------------------------------------------------------------------------------------------ the reader

def test_training_save_reader_never_calls_the_stand_ins(ms, tmp_path):
    """Globals outside the allowlist become inert records: nothing named in the pickle is imported or called
    (here os.system, which would create a file), and the chunks keep only tensors."""
    import os

    marker = tmp_path / "called"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = next(ms["tp2_pp2_save"].rglob("model_optim_rng.pt"))
    obj = torch.load(path, weights_only=False)  # our own fixture file, to add the payload
    obj["evil"] = Evil()
    f = tmp_path / "model_optim_rng.pt"
    torch.save(obj, f)
    rf = read_rank_file(f)
    assert not marker.exists()
    assert isinstance(rf.other["evil"], torch_file.StandIn) and rf.other["evil"].qualname == "system"
    args = rf.other["args"]
    assert isinstance(args, torch_file.StandIn) and (args.module, args.qualname) == ("argparse", "Namespace")
    kind = args.state["lr_decay_style"]
    assert kind.qualname == "ScheduleKind" and kind.args == ("cosine",)
    assert rf.other["iteration"] == 10 and rf.extra_state > 0
    assert all(isinstance(t, torch_file.StoredTensor) for sd in rf.chunks for t in sd.values())
    with pytest.raises(torch_file.UnsupportedPickle):  # the strict mode still refuses
        torch_file.load(f)


def test_a_stand_in_among_the_weights_is_refused(ms, tmp_path):
    import argparse

    src = ms["tp2"] / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(src, weights_only=True)
    obj["model"]["text_decoder.output_layer.weight"] = argparse.Namespace()
    f = tmp_path / "model_optim_rng.pt"
    torch.save(obj, f)
    with pytest.raises(CheckpointFormatError, match="text_decoder.output_layer.weight.*is not a tensor"):
        read_rank_file(f)


def test_mindspeed_conversions_never_import_torch(hf, ms, tmp_path):
    """hf_to_mm to their convention and resplit of their training save (no metadata: discovered, the
    Namespace read as stand-ins) stay torch-free, like every other hf_to_mm / resplit."""

    src, save = _hf_of(hf, "tp2_pp2"), ms["tp2_pp2_save"]
    run_converter_without_torch(
        ["InternVLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "a"), "--cfg.hf_config.hf_dir", str(src),
         "--cfg.parallel_config.tp_size", "2", "--cfg.target_format", "mindspeed"],
        ["InternVLConverter", "resplit", "--cfg.mm_dir", str(save), "--cfg.hf_config.hf_dir", str(src),
         "--cfg.save_mm_dir", str(tmp_path / "b")])
    assert json.loads((tmp_path / "a" / META_FILE).read_text())["tp_style"] == "mindspeed"
    assert json.loads((tmp_path / "b" / META_FILE).read_text())["tp_style"] == "mm"
