"""mm-convert: HF <-> MM <-> HF bit-exact at TP 1/2/4, PP and VPP, resplit, bad input, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mindspeed_mm.cli.mm_convert import (
    HFConfig,
    HFToMMConfig,
    MMToHFConfig,
    ParallelConfig,
    ResplitConfig,
    hf_to_mm,
    mm_to_hf,
    resplit,
)
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.checkpoint.mm_format import (
    META_FILE,
    chunk_key,
    iteration_dir,
    rank_file,
    read_meta,
    save_rank_object,
)
from mindspeed_mm.checkpoint.streaming_save import owned
from mindspeed_mm.cli.mm_convert import main
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.models.internvl.hf import mapping as hf_mapping
from mindspeed_mm.parallel.layout import LayoutError
from mindspeed_mm.models.internvl.sharding import local_state_dict
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from tests.helpers.launch import run_converter_without_torch
from tests.helpers.torch_files import without_serialization_id


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        # vit6b-style (5 ViT heads: unaligned at TP2/TP4), 4 LLM kv groups, odd vocab 333; sharded input
        "tp4_native": write_tiny_checkpoint(root / "tp4_native", "native", "tp4", seed=1, max_shard_bytes=40_000),
        "tp4_original_bf16": write_tiny_checkpoint(root / "tp4_orig", "original", "tp4", seed=1, dtype="bf16"),
        "vit300m_original": write_tiny_checkpoint(root / "v300", "original", "vit300m", seed=2,
                                                  max_shard_bytes=30_000),
        # the other LLM kinds, and tied embeddings (no lm_head on disk)
        "qwen3_native": write_tiny_checkpoint(root / "qwen3", "native", "qwen3_vit6b", seed=3),
        "internlm3_original": write_tiny_checkpoint(root / "internlm3", "original", "internlm3_vit300m", seed=3),
        "tied_native": write_tiny_checkpoint(root / "tied_native", "native", "qwen3_tied", seed=3),
        "tied_original": write_tiny_checkpoint(root / "tied_orig", "original", "qwen3_tied", seed=3),
    }


def _pc(tp, vit=None, llm=None):
    return ParallelConfig(llm_pp_layers=llm, vit_pp_layers=vit, tp_size=tp)


def _to_mm(hf, out, pc, **kw):
    return hf_to_mm(HFToMMConfig(mm_dir=str(out), hf_config=HFConfig(str(hf)), parallel_config=pc,
                                 progress=False, **kw))


def _load_mm(mm_dir):
    meta = read_meta(mm_dir)
    it = iteration_dir(mm_dir)
    out = {}
    for s in range(meta.pp * meta.vpp):
        for t in range(meta.tp):
            obj = torch.load(rank_file(it, t, s % meta.pp, meta.pp), weights_only=True)
            assert obj["checkpoint_version"] == 3.0
            out[(t, s)] = obj[chunk_key(s // meta.pp, meta.vpp)]
    return meta, out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _leftovers(path: Path):
    return [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


CASES = [  # (checkpoint, tp, vit_pp_layers, llm_pp_layers, output format)
    ("tp4_native", 1, None, None, "native"),
    ("tp4_native", 4, [[1, 1], [0, 0]], [[0, 0], [1, 1]], "native"),  # VPP2, ViT over two stages
    ("tp4_native", 2, [[2, 0]], [[1, 1]], "original"),
    ("tp4_original_bf16", 2, [[2, 0]], [[1, 1]], "original"),  # ViT on one stage, sharing it with the LLM
    ("tp4_original_bf16", 4, [[2, 0]], [[0, 2]], "native"),
    ("vit300m_original", 2, [[1, 1, 0]], [[0, 1, 1]], "original"),  # ViT over several stages, PP3
    ("qwen3_native", 1, None, None, "native"),
    ("qwen3_native", 2, [[2, 0]], [[1, 1]], "original"),
    ("internlm3_original", 1, None, None, "original"),
    ("internlm3_original", 2, [[2, 0]], [[1, 1]], "native"),
    ("tied_native", 1, None, None, "original"),
    ("tied_native", 2, [[2, 0]], [[1, 1]], "native"),  # the last stage holds the embedding's copy
    ("tied_original", 2, [[2, 0]], [[1, 1]], "original"),
]


@pytest.mark.parametrize("name,tp,vit,llm,fmt", CASES)
def test_round_trip_bit_exact_and_shards_match_model_slices(ckpts, tmp_path, name, tp, vit, llm, fmt):
    hf = ckpts[name]
    config, src_fmt, state = load_hf_checkpoint(hf)
    _to_mm(hf, tmp_path / "mm", _pc(tp, vit, llm))
    meta, shards = _load_mm(tmp_path / "mm")
    assert meta.source_format == src_fmt and meta.tp == tp
    # every shard is exactly what the model loads: local_state_dict of the unsharded mapping
    spec = spec_from_hf_dir(hf)
    plan = meta.plan()
    full = hf_mapping.hf_to_mm(state, spec, src_fmt)
    for (t, s), sd in shards.items():
        _assert_same(sd, local_state_dict(full, spec, plan, t, plan.stages[s]))
    # each rank file is, byte for byte, what torch.save writes for those tensors (the converter streams it
    # without torch), but for torch's serialization id
    it = iteration_dir(tmp_path / "mm")
    for t in range(meta.tp):
        for pp_rank in range(meta.pp):
            path = rank_file(it, t, pp_rank, meta.pp)
            chunks = [{k: owned(x) for k, x in local_state_dict(full, spec, plan, t, plan.stage(pp_rank, v)).items()}
                      for v in range(plan.num_chunks)]
            ref = tmp_path / "ref" / path.relative_to(it)
            ref.parent.mkdir(parents=True)
            save_rank_object(ref, {chunk_key(v, len(chunks)): sd for v, sd in enumerate(chunks)})
            assert without_serialization_id(path) == without_serialization_id(ref), path
    mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / "mm"), save_hf_dir=str(tmp_path / "back"), hf_format=fmt,
                          progress=False, max_shard_size=50_000))
    back_cfg, back_fmt, back = load_hf_checkpoint(tmp_path / "back")
    assert back_fmt == fmt
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    tied = spec.text.tied
    assert back_cfg["text_config" if fmt == "native" else "llm_config"]["tie_word_embeddings"] is tied
    if fmt == "native":
        assert back_cfg["tie_word_embeddings"] is tied
    assert ("language_model.lm_head.weight" in back) is not tied
    if fmt == src_fmt:
        _assert_same(back, state)
        assert back_cfg == config
    else:  # the other format: same parameters, and back again to the source format is bit-exact
        _assert_same(hf_mapping.hf_to_mm(back, spec, fmt), full)
        _to_mm(tmp_path / "back", tmp_path / "mm2", _pc(1))
        mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / "mm2"), save_hf_dir=str(tmp_path / "back2"), hf_format=src_fmt,
                              progress=False))
        _assert_same(load_hf_checkpoint(tmp_path / "back2")[2], state)


def test_tied_copy_is_the_embedding_on_the_last_stage(ckpts, tmp_path):
    """Tied embeddings with the LLM over two stages: the last stage's rank files hold the embedding's TP slice
    as `output_layer.weight` (as MindSpeed-MM's do), the first stage's as the embedding; at one stage, once."""
    _to_mm(ckpts["tied_native"], tmp_path / "mm", _pc(2, [[2, 0]], [[1, 1]]))
    _, shards = _load_mm(tmp_path / "mm")
    for t in range(2):
        emb, out = "text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight"
        assert out not in shards[t, 0] and emb not in shards[t, 1]
        assert torch.equal(shards[t, 0][emb], shards[t, 1][out])
    _to_mm(ckpts["tied_native"], tmp_path / "mm1", _pc(1, [[2, 0]], [[0, 2]]))
    _, shards = _load_mm(tmp_path / "mm1")
    assert "text_decoder.output_layer.weight" not in shards[0, 1]


def test_bf16_stays_bf16(ckpts, tmp_path):
    _to_mm(ckpts["tp4_original_bf16"], tmp_path / "mm", _pc(2))
    meta, shards = _load_mm(tmp_path / "mm")
    assert meta.dtypes == {"bfloat16": sum(1 for _ in load_hf_checkpoint(ckpts["tp4_original_bf16"])[2])}
    assert {t.dtype for sd in shards.values() for t in sd.values()} == {torch.bfloat16}


@pytest.mark.parametrize("a,b", [
    (_pc(2, [[2, 0]], [[1, 1]]), _pc(4, [[1, 1], [0, 0]], [[0, 0], [1, 1]])),
    (_pc(4, [[1, 1], [0, 0]], [[0, 0], [1, 1]]), _pc(1)),
])
def test_resplit_equals_direct_conversion(ckpts, tmp_path, a, b):
    hf = ckpts["tp4_native"]
    _to_mm(hf, tmp_path / "a", a)
    _to_mm(hf, tmp_path / "direct", b, workers=1)
    resplit(ResplitConfig(mm_dir=str(tmp_path / "a"), save_mm_dir=str(tmp_path / "b"), parallel_config=b,
                          progress=False, workers=3))
    meta_d, direct = _load_mm(tmp_path / "direct")
    meta_b, split = _load_mm(tmp_path / "b")
    assert direct.keys() == split.keys()
    for k in direct:
        _assert_same(split[k], direct[k])
    files = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("*.pt"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.pt"))
    for f in files:
        assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes(), f
    assert (meta_b.tp, meta_b.pp, meta_b.vpp, meta_b.llm_pp_layers) == (meta_d.tp, meta_d.pp, meta_d.vpp,
                                                                         meta_d.llm_pp_layers)


def test_on_disk_layout(ckpts, tmp_path):
    _to_mm(ckpts["tp4_native"], tmp_path / "mm", _pc(2, [[1, 1], [0, 0]], [[0, 0], [1, 1]]))
    mm = tmp_path / "mm"
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in (mm / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    obj = torch.load(mm / "release/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    assert sorted(obj) == ["checkpoint_version", "model0", "model1"]
    meta = json.loads((mm / META_FILE).read_text())
    assert meta["llm_pp_layers"] == [[0, 0], [1, 1]] and meta["source_format"] == "native"
    assert not _leftovers(mm)


def test_mm_to_hf_checks_a_given_layout(ckpts, tmp_path):
    _to_mm(ckpts["tp4_native"], tmp_path / "mm", _pc(2, [[2, 0]], [[1, 1]]))
    with pytest.raises(LayoutError, match="records"):
        mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / "mm"), save_hf_dir=str(tmp_path / "back"), progress=False,
                              parallel_config=_pc(1)))
    assert not (tmp_path / "back").exists()
    mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / "mm"), save_hf_dir=str(tmp_path / "back"), progress=False,
                          parallel_config=_pc(2, [[2, 0]], [[1, 1]])))


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def broken(ckpts, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(ckpts["tp4_native"], src)
    return src


def _fails(hf, out, exc, match, pc=None):
    with pytest.raises(exc, match=match):
        _to_mm(hf, out, pc or _pc(2))
    assert not out.exists() and not _leftovers(out)


def test_missing_shard_is_named(broken, tmp_path):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(broken, tmp_path / "out", FileNotFoundError, shard.name)


def test_truncated_safetensors_is_named(broken, tmp_path):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    _fails(broken, tmp_path / "out", CheckpointFormatError, f"{shard.name}.*truncated")


def test_unknown_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = write_tiny_checkpoint(tmp_path / "hf", "original", "tp4", seed=0)
    sd = load_file(hf / "model.safetensors")
    sd["vision_model.extra.weight"] = torch.zeros(2)
    save_file(sd, hf / "model.safetensors")
    _fails(hf, tmp_path / "out", CheckpointFormatError, "vision_model.extra.weight")


def test_mixed_dtypes_within_one_parameter_are_named(tmp_path):
    """native q/k/v form one fused parameter; they are copied, never cast, so they must share a dtype."""
    from safetensors.torch import load_file, save_file
    hf = write_tiny_checkpoint(tmp_path / "hf", "native", "tp4", seed=0)
    sd = load_file(hf / "model.safetensors")
    k = next(k for k in sd if k.endswith("self_attn.k_proj.weight") and "language_model" in k)
    sd[k] = sd[k].double()
    save_file(sd, hf / "model.safetensors")
    _fails(hf, tmp_path / "out", CheckpointFormatError, "different dtypes")


@pytest.mark.parametrize("pc,match", [
    (_pc(1, [[2, 0]], [[1, 2]]), "llm_pp_layers.*sums to 3"),
    (_pc(1, [[1, 0]], [[1, 1]]), "vit_pp_layers.*sums to 1"),
    (_pc(1, [[2, 0, 0]], [[1, 1]]), "vit_pp_layers.*has 3 entries but the run has pp=2"),
    (_pc(3), "num_query_groups=4"),
    (ParallelConfig(tp_size=8), "num_query_groups=4"),
])
def test_bad_layouts_are_refused(ckpts, tmp_path, pc, match):
    _fails(ckpts["tp4_native"], tmp_path / "out", LayoutError, match, pc)


def test_existing_output_is_refused_unless_overwrite(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        _to_mm(ckpts["tp4_native"], out, _pc(1))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _to_mm(ckpts["tp4_native"], out, _pc(1), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / META_FILE).is_file() and not _leftovers(out)


def test_corrupt_mm_shard_is_named(ckpts, tmp_path):
    _to_mm(ckpts["tp4_native"], tmp_path / "mm", _pc(2))
    victim = tmp_path / "mm/release/mp_rank_01/model_optim_rng.pt"
    obj = torch.load(victim, weights_only=True)
    obj["model"]["bogus.weight"] = torch.zeros(1)
    torch.save(obj, victim)
    with pytest.raises(CheckpointFormatError, match="mp_rank_01.*bogus.weight"):
        mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / "mm"), save_hf_dir=str(tmp_path / "back"), progress=False))
    assert not (tmp_path / "back").exists()


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_reference_command_line(ckpts, tmp_path, capsys):
    hf = ckpts["tp4_original_bf16"]
    rc = main(["InternVLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm"),
               "--cfg.hf_config.hf_dir", str(hf),
               "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
               "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
               "--cfg.parallel_config.tp_size", "2",
               "--cfg.trust_remote_code", "True"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "hf_to_mm: original HF -> MM TP2 PP2" in captured.out and "files" in captured.out
    assert "trust_remote_code is ignored" in captured.err and "detected HF format 'original'" in captured.err
    cfg_file = tmp_path / "back.yaml"
    cfg_file.write_text(f"cfg:\n  mm_dir: {tmp_path / 'mm'}\n  save_hf_dir: {tmp_path / 'back'}\n"
                        "  hf_format: native\n")
    assert main(["InternVLConverter", "mm_to_hf", "--config", str(cfg_file)]) == 0
    assert load_hf_checkpoint(tmp_path / "back")[1] == "native"
    assert main(["InternVLConverter", "resplit", "--cfg.mm_dir", str(tmp_path / "mm"),
                 "--cfg.save_mm_dir", str(tmp_path / "mm1"), "--cfg.parallel_config.tp_size", "1"]) == 0


def test_hf_to_mm_and_resplit_never_import_torch(ckpts, tmp_path):
    """torch's import and teardown cost more than copying a 2B checkpoint, so the conversion process that
    writes shards must not load it: checked in a fresh interpreter, output compared with this process's."""

    hf = ckpts["tp4_original_bf16"]
    run_converter_without_torch(
        ["InternVLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "a"), "--cfg.hf_config.hf_dir", str(hf),
         "--cfg.parallel_config.tp_size", "2", "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
         "--cfg.parallel_config.vit_pp_layers", "[[2,0]]"],
        ["InternVLConverter", "resplit", "--cfg.mm_dir", str(tmp_path / "a"), "--cfg.save_mm_dir", str(tmp_path / "b"),
         "--cfg.parallel_config.tp_size", "1"])
    _to_mm(hf, tmp_path / "c", _pc(1))
    for f in sorted((tmp_path / "c").rglob("*.pt")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "c")).read_bytes(), f


@pytest.mark.parametrize("cmd", ["hf_to_mm", "mm_to_hf", "resplit"])
def test_cli_help_lists_every_option(cmd, capsys):
    import dataclasses

    from mindspeed_mm.cli.mm_convert import COMMANDS
    with pytest.raises(SystemExit) as e:
        main(["InternVLConverter", cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--print_config" in out and "--config" in out

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            yield f"{prefix}.{f.name}", f.metadata["help"]
    for opt, text in walk(COMMANDS[cmd][0], "--cfg"):
        assert opt in out and text.split()[0] in out, opt


def test_cli_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["InternVLConverter", "resplit", "--cfg.mm_dir", "a", "--cfg.save_mm_dir", "b",
              "--cfg.parallel_config.tp_size", "2", "--print_config"])
    assert "tp_size: 2" in capsys.readouterr().out


def test_dropping_mapped_pages_keeps_the_data(ckpts, tmp_path):
    """resplit lets the kernel drop pages of mapped source files once copied; the data must still read back,
    whether the file was mapped by torch.load or by the converter's own reader."""
    from mindspeed_mm.checkpoint.mm_format import drop_resident_pages, load_rank_file, read_rank_file

    mm = tmp_path / "mm"
    _to_mm(ckpts["tp4_native"], mm, _pc(1, vit=[[2]], llm=[[2]]))
    path = rank_file(iteration_dir(mm), 0, 0, 1)
    sd = load_rank_file(path, 1)[0]
    before = {k: v.clone() for k, v in sd.items()}
    for v in sd.values():
        drop_resident_pages(v)
    for k, v in sd.items():
        assert torch.equal(v, before[k]), k
    arrays = read_rank_file(path, 1).chunks[0]
    for v in arrays.values():
        drop_resident_pages(v.array)
    for k, v in arrays.items():
        assert v.array.tobytes() == before[k].contiguous().view(torch.uint8).numpy().tobytes(), k


def test_mm_rank_file_tensors_are_found_on_disk(ckpts, tmp_path):
    """resplit copies row pieces file to file: each tensor's address minus the mapping's is where its bytes
    lie in the rank file, and they are the bytes torch.load reads."""
    import os

    from mindspeed_mm.checkpoint.mm_format import load_rank_file, read_rank_file

    mm = tmp_path / "mm"
    _to_mm(ckpts["tp4_native"], mm, _pc(2, vit=[[2, 0]], llm=[[1, 1]]))
    for pp_rank in range(2):
        path = rank_file(iteration_dir(mm), 1, pp_rank, 2)
        rf = read_rank_file(path, 1)
        chunks = load_rank_file(path, 1)
        assert rf.base is not None and rf.chunks[0].keys() == chunks[0].keys()
        with open(path, "rb") as f:
            for k, t in chunks[0].items():
                stored = rf.chunks[0][k]
                raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
                assert stored.dtype == str(t.dtype).removeprefix("torch.") and stored.array.shape == t.shape, k
                assert os.pread(f.fileno(), len(raw), stored.array.__array_interface__["data"][0] - rf.base) == raw, k


def test_rank_file_outside_the_allowlist_is_read_without_torch(ckpts, tmp_path):
    """A rank file whose pickle holds more than the allowlist (a training save's uint32 RNG tensor, an
    argparse.Namespace) is still read by the torch-free reader, those entries as inert stand-ins; resplit then
    gives the same files as from the plain conversion."""
    import argparse
    import shutil

    import numpy as np

    _to_mm(ckpts["tp4_native"], tmp_path / "a", _pc(2, vit=[[2, 0]], llm=[[1, 1]]))
    shutil.copytree(tmp_path / "a", tmp_path / "saved")
    for f in sorted((tmp_path / "saved").rglob("*.pt")):
        obj = torch.load(f, weights_only=True)
        obj.update(rng_state=[{"np": torch.from_numpy(np.random.RandomState(0).get_state()[1].copy())}],
                   args=argparse.Namespace(lr=1e-3), iteration=7)
        torch.save(obj, f)
    for src, out in (("a", "b"), ("saved", "c")):
        resplit(ResplitConfig(mm_dir=str(tmp_path / src), save_mm_dir=str(tmp_path / out), parallel_config=_pc(1),
                              progress=False))
    for f in sorted((tmp_path / "b").rglob("*.pt")):
        assert f.read_bytes() == (tmp_path / "c" / f.relative_to(tmp_path / "b")).read_bytes(), f


def test_resplit_hands_back_source_pages_and_bypasses_the_cache(ckpts, tmp_path, monkeypatch):
    """Every source byte resplit copies has its mapped pages let go right after (so RSS stays near a few
    chunks), and the rank files are written with O_DIRECT where the filesystem takes it."""
    import fcntl
    import os

    from mindspeed_mm.checkpoint import sources, streaming_save

    _to_mm(ckpts["tp4_native"], tmp_path / "a", _pc(2, vit=[[2, 0]], llm=[[1, 1]]))
    dropped, direct = [], []
    real_drop, real_write = sources.drop_resident_pages, streaming_save._write_chunk
    monkeypatch.setattr(sources, "drop_resident_pages", lambda a: dropped.append(a.nbytes) or real_drop(a))
    monkeypatch.setattr(streaming_save, "_write_chunk", lambda fd, *a: direct.append(
        bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)) or real_write(fd, *a))
    s = resplit(ResplitConfig(mm_dir=str(tmp_path / "a"), save_mm_dir=str(tmp_path / "b"), parallel_config=_pc(1),
                              progress=False))
    # a column part handed back spans its rows' other columns too, so handed-back bytes may exceed the file
    assert 0.95 * s.bytes < sum(dropped) < 2 * s.bytes
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        takes_direct = True
    except OSError:
        takes_direct = False
    assert direct and set(direct) == {takes_direct}


def test_direct_io_can_be_switched_off(ckpts, tmp_path, monkeypatch):
    """`--cfg.direct_io false` writes through the page cache, the same bytes."""
    import fcntl
    import os

    from mindspeed_mm.checkpoint import streaming_save

    direct = []
    real_write = streaming_save._write_chunk
    monkeypatch.setattr(streaming_save, "_write_chunk", lambda fd, *a: direct.append(
        bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)) or real_write(fd, *a))
    pc = _pc(2, vit=[[2, 0]], llm=[[1, 1]])
    _to_mm(ckpts["tp4_native"], tmp_path / "a", pc)
    direct.clear()
    assert main(["InternVLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "b"), "--cfg.hf_config.hf_dir",
                 str(ckpts["tp4_native"]), "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
                 "--cfg.parallel_config.vit_pp_layers", "[[2,0]]", "--cfg.parallel_config.tp_size", "2",
                 "--cfg.direct_io", "false", "--cfg.progress", "false"]) == 0
    assert direct and not any(direct)
    for f in sorted((tmp_path / "a").rglob("*.pt")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f


def test_model_json_beside_the_output_describes_it(ckpts, tmp_path):
    """hf_to_mm and resplit write `model.json` (reference schema) at the layout they wrote: the HF model with
    each module's pipeline_num_layers, flat without VPP, one list per virtual stage with it."""
    from mindspeed_mm.config.model_spec import architecture_differences, load_model_spec

    hf = ckpts["tp4_native"]
    _to_mm(hf, tmp_path / "a", _pc(2, [[1, 1], [0, 0]], [[0, 0], [1, 1]]))
    resplit(ResplitConfig(mm_dir=str(tmp_path / "a"), save_mm_dir=str(tmp_path / "b"),
                          parallel_config=_pc(1, [[2, 0]], [[1, 1]]), progress=False))
    want = spec_from_hf_dir(hf)
    for out, vit, llm in (("a", ((1, 1), (0, 0)), ((0, 0), (1, 1))), ("b", (2, 0), (1, 1))):
        got = load_model_spec(tmp_path / out / "model.json")
        assert architecture_differences(got, want) == []
        assert got.vision.pipeline_num_layers == vit and got.text.pipeline_num_layers == llm


@pytest.mark.parametrize("name", ["qwen3_native", "internlm3_original", "tied_native"])
def test_other_llm_kinds_in_mindspeed_layout_round_trip(ckpts, tmp_path, name):
    """Each LLM kind in MindSpeed-MM's layout (TP2 x PP2: replicated projector, uneven vocabulary rows, the
    tied copy on the last stage), back to HF directly (without metadata) and through a resplit to ours:
    bit-exact both ways."""
    hf = ckpts[name]
    _, fmt, state = load_hf_checkpoint(hf)
    _to_mm(hf, tmp_path / "ms", _pc(2, [[2, 0]], [[1, 1]]), target_format="mindspeed")
    resplit(ResplitConfig(mm_dir=str(tmp_path / "ms"), save_mm_dir=str(tmp_path / "mm"), parallel_config=_pc(1),
                          progress=False))
    (tmp_path / "ms" / META_FILE).unlink()  # as MindSpeed-MM writes it: the layout is read off the files
    for src in ("ms", "mm"):
        mm_to_hf(MMToHFConfig(mm_dir=str(tmp_path / src), save_hf_dir=str(tmp_path / f"back_{src}"), hf_format=fmt,
                              hf_config=HFConfig(str(hf)), progress=False))
        _assert_same(load_hf_checkpoint(tmp_path / f"back_{src}")[2], state)
