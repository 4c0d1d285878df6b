"""LoRA through `pretrain_vlm.py` end to end: adapter saves (the adapters and trainable parameters only, the
frozen base named and fingerprinted), resuming them bit-exactly at the same layout and within 1e-5 at others
(TP2 over 5 ViT heads with SP, PP2), InternVL's flags, and a wrong base refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import run_torchrun
from tests.helpers.torch_files import saved_tensors
from mindspeed_mm.testing.tiny_run import pretrain_args, prepare_tiny_run, write_model_json

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "pretrain_vlm.py"
LOSS_RTOL = 1e-5
LORA = ["--use-llm-lora", "4", "--use-backbone-lora", "2", "--lora-dropout", "0", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_run(tmp_path_factory.mktemp("lora_finetune"), preset="deep", seed=3)


def model_json(tiny, tmp_path: Path, name: str, vit=None, llm=None) -> Path:
    # the reference's freezing: the ViT frozen, the LLM's freeze left unsaid (LoRA then freezes its base)
    path = write_model_json(tiny.hf_dir, tmp_path / f"model_{name}.json", vit, llm, freeze_vit=True)
    raw = json.loads(path.read_text())
    raw["text_decoder"].pop("freeze", None)
    path.write_text(json.dumps(raw))
    return path


def records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def train(tiny, tmp_path: Path, name: str, nproc: int, model: Path, iters: int, extra=(), **kw) -> list[dict]:
    metrics = tmp_path / f"{name}.jsonl"
    run_torchrun(PRETRAIN, nproc, pretrain_args(tiny, model, iters=iters, metrics=metrics,
                                                extra=tuple(LORA) + tuple(extra), **kw), timeout=600)
    return records(metrics)




@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    model = model_json(tiny, tmp, "one")
    return tmp, train(tiny, tmp, "full", 1, model, 4, load=tiny.mm_dir, save=tmp / "full")


def test_adapter_save_holds_adapters_and_names_its_base(tiny, uninterrupted):
    tmp, full = uninterrupted
    assert [r["iteration"] for r in full] == [1, 2, 3, 4]
    obj = torch.load(tmp / "full" / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    names = set(obj["model"])
    # the adapters and the (trainable) projector, nothing of the frozen ViT or LLM
    assert names and all(".lora_" in n or n.startswith("image_encoder.projector.") for n in names), sorted(names)[:5]
    assert any(n.startswith("image_encoder.") and ".lora_" in n for n in names)
    assert set(obj["optimizer"]["chunks"][0]["exp_avg"]) == names
    meta = json.loads((tmp / "full" / "iter_0000004" / "mm_convert_meta.json").read_text())
    assert meta["base"]["dir"] == str(Path(tiny.mm_dir).absolute()) and meta["base"]["iteration"] == "release"
    assert "text_decoder.decoder.layers.0.mlp.linear_fc1.weight" in meta["base"]["fingerprint"]
    assert meta["model_spec"]["text_decoder"]["lora"]["rank"] == 4
    assert meta["model_spec"]["image_encoder"]["vision_encoder"]["lora"]["alpha"] == 4.0  # 2 x rank


def test_resume_is_bit_exact_at_the_same_layout(tiny, tmp_path, uninterrupted):
    base_tmp, full = uninterrupted
    model = model_json(tiny, tmp_path, "resume")
    first = train(tiny, tmp_path, "first", 1, model, 4, load=tiny.mm_dir, save=tmp_path / "half",
                  extra=["--exit-interval", "2"])
    second = train(tiny, tmp_path, "second", 1, model, 4, load=tmp_path / "half", save=tmp_path / "half")
    assert [r["iteration"] for r in first + second] == [1, 2, 3, 4]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    a, b = saved_tensors(base_tmp / "full", 4), saved_tensors(tmp_path / "half", 4)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_resume_at_other_layouts(tiny, tmp_path, uninterrupted):
    """Saved at TP1 after 2 iterations, resumed at TP2 + SP (5 ViT heads: 3 + 2) and at PP2."""
    _, full = uninterrupted
    single = model_json(tiny, tmp_path, "one")
    pp2 = model_json(tiny, tmp_path, "pp2", [[4, 0]], [[1, 3]])
    train(tiny, tmp_path, "a", 1, single, 4, load=tiny.mm_dir, save=tmp_path / "a", extra=["--exit-interval", "2"])
    for name, model, extra in (("tp2sp", single, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                               ("pp2", pp2, ["--pipeline-model-parallel-size", "2"])):
        rec = train(tiny, tmp_path, f"b_{name}", 2, model, 4, load=tmp_path / "a", save=tmp_path / f"b_{name}",
                    extra=extra)
        assert [r["iteration"] for r in rec] == [3, 4]
        for r, w in zip(rec, full[2:]):
            assert abs(r["loss"] - w["loss"]) <= LOSS_RTOL * abs(w["loss"]), (name, r["loss"], w["loss"])


def test_a_base_other_than_the_adapters_one_is_refused(tiny, tmp_path, uninterrupted):
    base_tmp, _ = uninterrupted
    model = model_json(tiny, tmp_path, "wrong")
    # another base: one full-finetune step away from the adapters' base
    other = write_model_json(tiny.hf_dir, tmp_path / "model_full.json")
    run_torchrun(PRETRAIN, 1, pretrain_args(tiny, other, iters=1, load=tiny.mm_dir, save=tmp_path / "other"))
    args = pretrain_args(tiny, model, iters=5, load=tmp_path / "other", save=tmp_path / "never",
                         extra=("--load-adapter", str(base_tmp / "full")) + tuple(LORA))
    r = subprocess.run([sys.executable, str(PRETRAIN), *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "is not the one its adapters were trained on" in last and "differs" in last, last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()


def _peft_adapter_of(hf_dir: Path, out: Path, rank: int = 4) -> Path:
    """A PEFT adapter directory (transformers' native names) for the model at `hf_dir`, random matrices."""
    import dataclasses

    from safetensors.torch import save_file

    from mindspeed_mm.config.model_spec import lora_spec
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.models.internvl.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, to_peft
    from mindspeed_mm.models.internvl.params import params

    spec = spec_from_hf_dir(hf_dir)
    spec = dataclasses.replace(spec, text=dataclasses.replace(
        spec.text, lora=lora_spec("text", {"rank": rank, "dropout": 0.0}, "text_decoder.lora")))
    g = torch.Generator().manual_seed(0)
    adapters = {p.name: torch.randn(p.shape, generator=g) * 0.05 for p in params(spec, adapters=True) if p.adapter}
    out.mkdir(parents=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(spec, str(hf_dir))))
    save_file({k: v.contiguous() for k, v in to_peft(adapters, spec).items()}, str(out / ADAPTER_WEIGHTS))
    return out


def _fails_with_one_line(args) -> str:
    r = subprocess.run([sys.executable, str(PRETRAIN), *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_a_peft_adapter_loads_and_a_foreign_one_is_refused(tiny, tmp_path):
    """--load BASE --load-adapter PEFT_DIR with a model JSON without LoRA: the run takes the adapter's LoRA (rank 4
    on the LLM); its first loss differs from the base's alone, and is the same at TP2 + SP as at one rank. An adapter of another model is one line, exit 2."""
    model = model_json(tiny, tmp_path, "peft")
    peft_dir = _peft_adapter_of(tiny.hf_dir, tmp_path / "peft")
    plain = pretrain_args(tiny, model, iters=1, load=tiny.mm_dir, metrics=tmp_path / "base.jsonl")
    run_torchrun(PRETRAIN, 1, plain)
    run_torchrun(PRETRAIN, 1, pretrain_args(tiny, model, iters=1, load=tiny.mm_dir, metrics=tmp_path / "one.jsonl",
                                            extra=("--load-adapter", str(peft_dir))))
    with_adapter = pretrain_args(tiny, model, iters=1, load=tiny.mm_dir, metrics=tmp_path / "adapter.jsonl",
                                 save=tmp_path / "saved", extra=("--load-adapter", str(peft_dir)))
    run_torchrun(PRETRAIN, 2, with_adapter + ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    base_loss, adapter_loss = records(tmp_path / "base.jsonl")[0]["loss"], records(tmp_path / "adapter.jsonl")[0]["loss"]
    one_rank = records(tmp_path / "one.jsonl")[0]["loss"]
    assert abs(base_loss - adapter_loss) > 1e-4 * base_loss
    assert abs(adapter_loss - one_rank) <= LOSS_RTOL * one_rank, (adapter_loss, one_rank)
    meta = json.loads((tmp_path / "saved" / "iter_0000001" / "mm_convert_meta.json").read_text())
    assert meta["model_spec"]["text_decoder"]["lora"]["rank"] == 4 and meta["base"]["iteration"] == "release"

    other = prepare_tiny_run(tmp_path / "other", preset="small", seed=1, convert=False)
    foreign = _peft_adapter_of(other.hf_dir, tmp_path / "foreign")
    last = _fails_with_one_line(pretrain_args(tiny, model, iters=1, load=tiny.mm_dir,
                                              extra=("--load-adapter", str(foreign))))
    assert "has shape" in last and "the model's is" in last, last
    last = _fails_with_one_line(pretrain_args(tiny, model, iters=1, load=tiny.mm_dir,
                                              extra=("--load-adapter", str(peft_dir), "--use-llm-lora", "8")))
    assert "rank 4" in last and "rank 8" in last, last
