"""The reference's inference files as written: its `inference_8B.json` (a copy in examples/internvl3/reference/,
as it ships) with only paths and model sizes changed, run by its launcher's command line
(`inference_internvl.sh reference`: torchrun, its Megatron flags, tee) on the tiny model, from a single TP1 x PP1
rank file, device "npu" and bf16 on CPU; its greedy tokens equal transformers' `generate` with the file's
generation_config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "examples" / "internvl3" / "reference" / "inference_8B.json"
NEW_TOKENS = 8


def _changed(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), path
        return [p for k in a for p in _changed(a[k], b[k], f"{path}.{k}" if path else k)]
    return [] if a == b else [path]


@pytest.mark.slow
def test_reference_inference_files_as_written(tmp_path):
    out = tmp_path / "ref"
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(out), "MAX_NEW_TOKENS": str(NEW_TOKENS),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "examples/internvl3/inference_internvl.sh"), "reference"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device 'npu' asked for; running on cpu" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["finish_reason"] == "length" and len(rows[0]["token_ids"]) == NEW_TOKENS

    # Only paths and model sizes differ from the reference's file.
    ref, tiny = json.loads(REFERENCE.read_text()), json.loads((out / "inference_reference.json").read_text())
    sizes = {f"text_decoder.{k}" for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                          "ffn_hidden_size", "kv_channels", "vocab_size")}
    sizes |= {f"image_encoder.vision_encoder.{k}" for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                           "num_attention_heads", "image_size")}
    sizes |= {"image_encoder.vision_projector.vit_hidden_size", "image_encoder.vision_projector.llm_hidden_size",
              "img_context_token_id"}
    paths = {"from_pretrained", "file_path", "tokenizer.from_pretrained"}
    assert set(_changed(ref, tiny)) <= sizes | paths | {"generation_config.max_new_tokens"}
    assert tiny["from_pretrained"].endswith("model_optim_rng.pt") and Path(tiny["from_pretrained"]).is_file()

    from transformers import AutoTokenizer

    from mindspeed_mm.inference.config import RequestSpec, load_inference_config
    from mindspeed_mm.inference.pipeline import prepare_request
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from tests.helpers.oracle import load_native_model

    cfg = load_inference_config(out / "inference_reference.json")
    hf_dir = out / "hf"
    spec, tok = spec_from_hf_dir(hf_dir), AutoTokenizer.from_pretrained(str(hf_dir))
    p = prepare_request(RequestSpec(tiny["prompts"], "image", (tiny["file_path"],)), spec, tok,
                        max_tiles=cfg.max_tiles, num_segments=cfg.num_segments)
    g = cfg.generation_config
    hf = load_native_model(hf_dir).to(torch.bfloat16)
    ids = p.input_ids[None]
    with torch.no_grad():
        expect = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values.to(
            torch.bfloat16), do_sample=g.do_sample, max_new_tokens=g.max_new_tokens, eos_token_id=list(g.eos_token_id),
            pad_token_id=0, repetition_penalty=g.repetition_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
            min_length=g.min_length)
    assert expect[0, ids.shape[1]:].tolist() == rows[0]["token_ids"]

    # A failing run fails the launcher too, through its `| tee` (pipefail).
    proc = subprocess.run(["bash", str(REPO / "examples/internvl3/inference_internvl.sh"), "reference"], cwd=REPO,
                          env={**env, "MAX_NEW_TOKENS": "0"}, capture_output=True, text=True, timeout=600,
                          check=False)
    # torchrun turns the status 2 of its worker into 1
    assert proc.returncode != 0 and "generation_config.max_new_tokens: must be >= 1" in proc.stderr, proc.stderr[-2000:]
