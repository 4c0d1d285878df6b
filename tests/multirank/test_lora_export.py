"""Exporting LoRA adapter saves: merged into an HF checkpoint (either format), as a PEFT adapter, resplit; checked
in transformers' and PEFT's own terms.

Two tiny LoRA runs (2 iterations, lr 1e-2 so that B is clearly non-zero) on one TP1 base, shared by every test:
`a` at TP1 with LoRA on the ViT (rank 2, alpha 8) and the LLM (rank 4, alpha 8), the projector frozen (adapters
only: a PEFT export exists); `b` at TP2 (two ranks) with LoRA on the LLM only and the projector trainable (a
non-adapter trainable parameter: merged export only), its base at another layout than itself.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_mm.checkpoint import convert
from mindspeed_mm.cli.mm_convert import main as mm_convert_main
from mindspeed_mm.testing.tiny_run import prepare_tiny_run, pretrain_args, write_model_json
from tests.helpers.launch import run_torchrun
from tests.helpers.oracle import load_native_model

pytestmark = [pytest.mark.multirank, pytest.mark.slow]  # two pretrain_vlm.py runs, one of them on 2 ranks

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
PROMPT = "Describe the picture."


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def _lora_json(run, path: Path, vit_lora, projector_frozen: bool, **text) -> Path:
    write_model_json(run.hf_dir, path, freeze_vit=True, **text)
    raw = json.loads(path.read_text())
    if vit_lora:
        raw["image_encoder"]["vision_encoder"]["lora"] = vit_lora
    raw["image_encoder"]["vision_projector"]["freeze"] = projector_frozen
    path.write_text(json.dumps(raw, indent=2))
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    run = prepare_tiny_run(root, preset="vit300m")
    json_a = _lora_json(run, root / "model_a.json", {"rank": 2, "alpha": 8, "dropout": 0.0}, True,
                        lora={"rank": 4, "dropout": 0.0})
    json_b = _lora_json(run, root / "model_b.json", None, False,
                        lora={"rank": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj",
                                                                                        "down_proj"]})
    a, b = root / "save_a", root / "save_b"
    # the two runs at once: start-up (imports, the model build) is most of their time
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain_vlm.py"),
                             *pretrain_args(run, json_a, iters=2, lr=1e-2, save=a, load=run.mm_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    run_torchrun(REPO / "pretrain_vlm.py", 2, pretrain_args(
        run, json_b, iters=2, lr=1e-2, save=b, load=run.mm_dir, extra=("--tensor-model-parallel-size", "2")))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    image = root / "square.png"
    size = json.loads((run.hf_dir / "config.json").read_text())["vision_config"]["image_size"]
    size = size[0] if isinstance(size, list) else size
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    out = {"root": root, "run": run, "a": a, "b": b, "image": image}
    for name, save, kw in (("merged_a", a, {}), ("original_a", a, {"hf_format": "original"}),
                           ("peft_a", a, {"lora_format": "peft"}), ("merged_b", b, {})):
        convert.mm_to_hf(str(save), str(root / name), progress=False, **kw)
        out[name] = root / name
    return out


def _cli(*args: str) -> int:
    return mm_convert_main(["InternVLConverter", *args, "--cfg.progress", "false"])


def _native(hf_dir):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                            attn_implementation="eager").eval()


def _peft_pairs(peft_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """HF module name -> (A, B, alpha / r) read off the PEFT export (PEFT's own rank_pattern rule)."""
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model."):].split(".lora_A.")[0]
        r = next((v for k, v in cfg["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)), cfg["r"])
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)),
                     cfg["lora_alpha"])
        out[module] = (a, state[key.replace(".lora_A.", ".lora_B.")], alpha / r)
    return out


def _prompt(lora):
    from transformers import AutoTokenizer

    from mindspeed_mm.inference.config import RequestSpec
    from mindspeed_mm.inference.pipeline import prepare_request
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir

    hf_dir = lora["run"].hf_dir
    return prepare_request(RequestSpec(PROMPT, "image", (str(lora["image"]),)), spec_from_hf_dir(hf_dir),
                           AutoTokenizer.from_pretrained(str(hf_dir)))


def _greedy(model, p, ours: list[int]) -> list[int]:
    """transformers' greedy tokens, stopping only at a token `ours` (our tokens) lacks, so both run in full."""
    ids = p.input_ids[None]
    eos = next(t for t in range(1000) if t not in ours)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values,
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _logits(model, p) -> torch.Tensor:
    ids = p.input_ids[None]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values).logits[0, -1]


def _ours(lora, tmp: Path, checkpoint: Path, nproc: int) -> list[int]:
    cfg = {"infer_data_type": "image", "file_path": str(lora["image"]), "prompts": [PROMPT],
           "from_pretrained": str(checkpoint), "tokenizer": {"from_pretrained": str(lora["run"].hf_dir)},
           "dtype": "fp32", "device": "cpu", "output_path": str(tmp / "out.jsonl"),
           "generation_config": {"max_new_tokens": NEW_TOKENS, "eos_token_id": []}}
    (tmp / "infer.json").write_text(json.dumps(cfg))
    args = ["--mm-model", str(tmp / "infer.json")]
    if nproc == 1:
        proc = subprocess.run([sys.executable, str(REPO / "inference_vlm.py"), *args], capture_output=True,
                              text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        run_torchrun(REPO / "inference_vlm.py", nproc, args)
    (row,) = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    return row["token_ids"]


# ------------------------------------------------------------------------------------------------ merged
def test_merged_export_is_base_plus_scaled_BA_per_hf_linear(lora):
    """Every adapted HF linear of the merged export is the base's W + alpha/r B A (the adapters as the PEFT export
    holds them) within fp32 rounding, every other tensor the base's; both formats hold the same weights."""
    base, merged = _native(lora["run"].hf_dir), _native(lora["merged_a"])
    pairs = _peft_pairs(lora["peft_a"])
    assert len(pairs) == 2 * 6 + 2 * 7  # every linear of the ViT's and the LLM's 2 layers
    for module, (a, b, scaling) in pairs.items():
        assert b.abs().max() > 1e-3, f"{module}: B is still ~0, the merge would prove nothing"
        w = base.get_submodule(module).weight
        torch.testing.assert_close(merged.get_submodule(module).weight, w + scaling * (b.float() @ a.float()),
                                   rtol=1e-6, atol=1e-6, msg=module)
    adapted = {f"{m}.weight" for m in pairs}
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()
    for k in base_sd:
        if k not in adapted:
            assert torch.equal(base_sd[k], merged_sd[k]), k
    original = load_native_model(lora["original_a"]).state_dict()
    assert all(torch.equal(original[k], v) for k, v in merged_sd.items())


def test_resplit_of_an_adapter_save_stays_one(lora, tmp_path):
    """resplit writes an adapter save at the new layout naming the same base; merged, it is the same checkpoint."""
    from safetensors.torch import load_file

    from mindspeed_mm.checkpoint.mm_format import checkpoint_meta, read_rank_file

    out = tmp_path / "tp2"
    assert _cli("resplit", "--cfg.mm_dir", str(lora["a"]), "--cfg.save_mm_dir", str(out),
                "--cfg.parallel_config.tp_size", "2") == 0
    assert checkpoint_meta(out).base == checkpoint_meta(lora["a"]).base and checkpoint_meta(out).tp == 2
    keys = set(read_rank_file(out / "release" / "mp_rank_01" / "model_optim_rng.pt").chunks[0])
    assert keys and all(".lora_" in k for k in keys)
    assert _cli("mm_to_hf", "--cfg.mm_dir", str(out), "--cfg.save_hf_dir", str(tmp_path / "hf")) == 0
    want = load_file(str(lora["merged_a"] / "model.safetensors"))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------------------------ PEFT
def test_peft_export_loads_in_peft_and_generates_like_merged_and_ours(lora, tmp_path):
    """PEFT loads the adapter on transformers' base model with no missing or unexpected keys; its greedy tokens
    are the merged export's and inference_vlm.py's on the adapter save itself."""
    from peft import PeftModel

    cfg = json.loads((lora["peft_a"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lora["run"].hf_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(_native(lora["run"].hf_dir), str(lora["peft_a"])).eval()
    bad = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert not bad, bad
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if ".lora_" in n)
    assert n_lora == 2 * len(_peft_pairs(lora["peft_a"]))
    p = _prompt(lora)
    merged = _native(lora["merged_a"])
    base_logits, lora_logits = _logits(_native(lora["run"].hf_dir), p), _logits(peft_model, p)
    assert (lora_logits - base_logits).abs().max() > 1e-3, "the adapters change nothing: a weak comparison"
    torch.testing.assert_close(_logits(merged, p), lora_logits, rtol=1e-4, atol=1e-4)
    ours = _ours(lora, tmp_path, lora["a"], 1)
    assert len(ours) == NEW_TOKENS and len(set(ours)) > 2
    assert _greedy(peft_model, p, ours) == ours
    assert _greedy(merged, p, ours) == ours


def test_peft_adapter_imports_back_as_the_save(lora, megatron_single_rank):
    """The PEFT export loaded on the base by --load-adapter's path (`load_adapter_dir`, the LoRA taken from the
    adapter) gives the model the adapter save itself loads into: every tensor equal."""
    from mindspeed_mm.checkpoint.adapters import adapter_loras, with_loras
    from mindspeed_mm.checkpoint.mm_format import checkpoint_meta
    from mindspeed_mm.models.internvl.model import load_full_state_dict
    from mindspeed_mm.runtime.chunks import (
        build_model_chunks, checkpoint_weights, load_adapter_dir, load_converted_weights, open_checkpoint,
    )

    spec = checkpoint_meta(lora["run"].mm_dir).spec()
    spec = with_loras(spec, adapter_loras(lora["peft_a"]), str(lora["peft_a"]))
    plan = checkpoint_meta(lora["run"].mm_dir).plan(spec)
    via_peft = build_model_chunks(spec, plan, seed=7)
    (base,), _ = checkpoint_weights(open_checkpoint(lora["run"].mm_dir, spec, "--load"), spec, plan)
    fresh = {n: p.detach() for n, p in via_peft[0].named_parameters() if ".lora_" in n}
    load_full_state_dict(via_peft[0], {**fresh, **base})  # as --load of a full checkpoint under LoRA does
    load_adapter_dir(lora["peft_a"], via_peft, log=lambda _: None)
    saved = build_model_chunks(checkpoint_meta(lora["a"]).spec(), plan)
    load_converted_weights(saved, lora["a"])
    got, want = via_peft[0].state_dict(), saved[0].state_dict()
    assert sum(".lora_" in k for k in want) == 52
    for k, v in want.items():
        if not k.endswith("_extra_state"):
            assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------------------------ layouts
def test_tp2_save_on_a_tp1_base_merged_and_generated(lora, tmp_path):
    """`b` (TP2, its base TP1, the projector trainable): inference_vlm.py at two ranks generates what transformers
    does on its merged export, whose projector is the save's and adapted linears carry the adapters."""
    base, merged = _native(lora["run"].hf_dir), _native(lora["merged_b"])
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(base.state_dict()[proj], merged.state_dict()[proj])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    k = "model.language_model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(base.state_dict()[q], merged.state_dict()[q])
    assert torch.equal(base.state_dict()[k], merged.state_dict()[k])  # not a target
    p = _prompt(lora)
    ours = _ours(lora, tmp_path, lora["b"], 2)
    assert _greedy(merged, p, ours) == ours


# ------------------------------------------------------------------------------------------------ errors
def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def _with_base(save: Path, to: Path, base_dir: Path) -> Path:
    shutil.copytree(save, to)
    for meta in to.rglob("mm_convert_meta.json"):
        raw = json.loads(meta.read_text())
        raw["base"]["dir"] = str(base_dir)
        meta.write_text(json.dumps(raw))
    return to


def test_wrong_or_missing_base_and_misused_peft_are_one_line(lora, tmp_path, capsys):
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

    other = tmp_path / "other"
    write_tiny_checkpoint(tmp_path / "other_hf", fmt="native", preset="vit300m", seed=5)
    convert.hf_to_mm(str(tmp_path / "other_hf"), str(other), progress=False)
    wrong = _with_base(lora["a"], tmp_path / "wrong", other)
    assert _cli("mm_to_hf", "--cfg.mm_dir", str(wrong), "--cfg.save_hf_dir", str(tmp_path / "o1")) == 2
    line = _one_error_line(capsys)
    assert "is not the one its adapters were trained on" in line and re.search(r": image_encoder\.\S+ differs", line)
    assert not (tmp_path / "o1").exists()

    gone = _with_base(lora["a"], tmp_path / "gone", tmp_path / "deleted_base")
    assert _cli("mm_to_hf", "--cfg.mm_dir", str(gone), "--cfg.save_hf_dir", str(tmp_path / "o2")) == 2
    assert f"its base {tmp_path / 'deleted_base'} is gone" in _one_error_line(capsys)

    assert _cli("mm_to_hf", "--cfg.mm_dir", str(lora["run"].mm_dir), "--cfg.save_hf_dir", str(tmp_path / "o3"),
                "--cfg.lora_format", "peft") == 2
    assert "is not a LoRA adapter save" in _one_error_line(capsys)

    assert _cli("mm_to_hf", "--cfg.mm_dir", str(lora["b"]), "--cfg.save_hf_dir", str(tmp_path / "o4"),
                "--cfg.lora_format", "peft") == 2
    line = _one_error_line(capsys)
    assert "image_encoder.projector." in line and "lora_format merged" in line

    # a PEFT export naming an HF base whose weights are not the adapters' base
    assert _cli("mm_to_hf", "--cfg.mm_dir", str(lora["a"]), "--cfg.save_hf_dir", str(tmp_path / "o5"),
                "--cfg.lora_format", "peft", "--cfg.hf_config.hf_dir", str(tmp_path / "other_hf")) == 2
    assert "differs" in _one_error_line(capsys)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
