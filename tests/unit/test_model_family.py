"""The InternVL3 / InternVL3.5 family: every shipped model JSON parses, has the published parameter count, and its
recipe's layout is valid, sizes its rank files in a converter dry run and fits 80 GB GPUs by estimate.

Expected values are published ones (docs/model_family.md lists where each comes from), never our own output:
* PUBLISHED_TOTAL: the "#Param" / "#Total Param" columns of the InternVL docs' model tables, given to 2-3
  significant digits; a count within half a unit of the last digit is a match;
* HF_SHAPES: the published config.json numbers; `count_from_config` turns them into the exact parameter count
  with the InternVL architecture's formula, written here independently of the parameter registry, and the
  registry's count must equal it (the published totals being too coarse for a 0.5% check).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.checkpoint.convert import dry_run
from mindspeed_mm.config.model_spec import load_model_spec
from mindspeed_mm.config.parallel import ParallelConfig, ParallelSizes
from mindspeed_mm.models.internvl.params import param_shapes
from mindspeed_mm.parallel.layout import plan_layout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

_spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "tools" / "memory_estimate.py")
memory_estimate = importlib.util.module_from_spec(_spec)
sys.modules["memory_estimate"] = memory_estimate  # its dataclasses look their module up
_spec.loader.exec_module(memory_estimate)  # type: ignore[union-attr]

# (total in billions, its last published digit's unit): InternVL docs, quick_start.md of internvl3.0 / internvl3.5
PUBLISHED_TOTAL = {
    "internvl3/1B": (0.9, 0.1), "internvl3/2B": (2.1, 0.1), "internvl3/8B": (7.9, 0.1), "internvl3/9B": (9.1, 0.1),
    "internvl3/14B": (15.1, 0.1), "internvl3/38B": (38.4, 0.1), "internvl3/78B": (78.4, 0.1),
    "internvl3_5/1B": (1.1, 0.1), "internvl3_5/2B": (2.3, 0.1), "internvl3_5/4B": (4.7, 0.1),
    "internvl3_5/8B": (8.5, 0.1), "internvl3_5/14B": (15.1, 0.1), "internvl3_5/38B": (38.4, 0.1),
}
# Published config.json numbers (docs/model_family.md): ViT (hidden, layers, ffn, qkv bias, qk norm, norm type) and
# LLM (hidden, layers, heads, kv heads, head_dim, ffn, vocab, qkv bias, q/k norm, tied).
VIT_300M = (1024, 24, 4096, True, False, "layer_norm")
VIT_6B = (3200, 45, 12800, False, True, "rms_norm")
HF_SHAPES = {
    "internvl3/1B": (VIT_300M, (896, 24, 14, 2, 64, 4864, 151674, True, False, False)),
    "internvl3/2B": (VIT_300M, (1536, 28, 12, 2, 128, 8960, 151674, True, False, False)),
    "internvl3/8B": (VIT_300M, (3584, 28, 28, 4, 128, 18944, 151674, True, False, False)),
    "internvl3/9B": (VIT_300M, (4096, 48, 32, 2, 128, 10240, 128512, False, False, False)),
    "internvl3/14B": (VIT_300M, (5120, 48, 40, 8, 128, 13824, 151674, True, False, False)),
    "internvl3/38B": (VIT_6B, (5120, 64, 40, 8, 128, 27648, 151674, True, False, False)),
    "internvl3/78B": (VIT_6B, (8192, 80, 64, 8, 128, 29568, 151674, True, False, False)),
    "internvl3_5/1B": (VIT_300M, (1024, 28, 16, 8, 128, 3072, 151936, False, True, False)),
    "internvl3_5/2B": (VIT_300M, (2048, 28, 16, 8, 128, 6144, 151936, False, True, False)),
    "internvl3_5/4B": (VIT_300M, (2560, 36, 32, 8, 128, 9728, 151936, False, True, False)),
    "internvl3_5/8B": (VIT_300M, (4096, 36, 32, 8, 128, 12288, 151936, False, True, False)),
    "internvl3_5/14B": (VIT_300M, (5120, 40, 40, 8, 128, 17408, 151936, False, True, False)),
    "internvl3_5/38B": (VIT_6B, (5120, 64, 64, 8, 128, 25600, 151936, False, True, False)),
}


def count_from_config(vit, llm) -> int:
    """Parameters of InternVLChatModel from config.json numbers: InternViT (448px, patch 14, layer scale),
    pixel-shuffle MLP projector, decoder LLM."""
    c, n_vit, f_vit, qkv_bias, qk_norm, norm = vit
    h, n, heads, kv, d, f, vocab, llm_bias, llm_qk_norm, tied = llm
    norm_params = 2 * c if norm == "layer_norm" else c
    vit_layer = (3 * c * c + (3 * c if qkv_bias else 0) + c * c + c  # qkv, proj
                 + (2 * c if qk_norm else 0) + 2 * c + 2 * norm_params  # q/k norms, ls1/ls2, two norms
                 + 2 * c * f_vit + f_vit + c)  # fc1, fc2
    vit_embed = c + (1 + (448 // 14) ** 2) * c + c * 3 * 14 * 14 + c
    projector = 2 * 4 * c + 4 * c * h + h + h * h + h
    llm_layer = (h * heads * d + 2 * h * kv * d + ((heads + 2 * kv) * d if llm_bias else 0) + heads * d * h
                 + (2 * d if llm_qk_norm else 0) + 3 * h * f + 2 * h)
    return vit_embed + n_vit * vit_layer + projector + vocab * h * (1 if tied else 2) + n * llm_layer + h


def _json(key: str) -> Path:
    family, size = key.split("/")
    return EXAMPLES / family / f"model_{size}.json"


MODELS = sorted(PUBLISHED_TOTAL)
# the mixture-of-experts sizes: tests/unit/test_moe_recipes.py (the registry has no expert rows to count here)
MOE_MODELS = ("internvl3_5/30B_A3B", "internvl3_5/241B_A28B")


def test_every_model_json_is_listed():
    shipped = {f"{p.parent.name}/{p.stem[len('model_'):]}" for d in ("internvl3", "internvl3_5")
               for p in (EXAMPLES / d).glob("model_*.json") if p.stem != "model_tiny"}
    assert shipped == set(MODELS) | set(MOE_MODELS)


def test_the_independent_count_agrees_with_the_published_totals():
    # The formula is checked against the published totals first, so that matching it means something.
    for key, (total, unit) in PUBLISHED_TOTAL.items():
        assert abs(count_from_config(*HF_SHAPES[key]) / 1e9 - total) <= unit / 2 + 1e-9, key


def _recipe(key: str):
    """TP, PP, world size, accumulation steps and SP of the size's finetune wrapper script."""
    family, size = key.split("/")
    src = (EXAMPLES / family / f"finetune_{family}_{size}.sh").read_text()
    env = {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=\$\{\w+:-([^}]*)\}", src)}
    sp = "--sequence-parallel" in env.get("EXTRA_ARGS", "")
    return memory_estimate.Recipe(int(env["TP"]), int(env["PP"]), 8 * int(env["NNODES"]), int(env["GRAD_ACC_STEP"]),
                                  sequence_parallel=sp)


@pytest.mark.parametrize("key", MODELS)
def test_model_json_parses_with_the_published_parameter_count(key):
    spec = load_model_spec(_json(key))
    count = sum(math.prod(s) for s in param_shapes(spec).values())
    assert count == count_from_config(*HF_SHAPES[key])
    total, unit = PUBLISHED_TOTAL[key]
    assert abs(count / 1e9 - total) <= unit / 2


@pytest.mark.parametrize("key", MODELS)
def test_recipe_layout_is_valid_and_fits_80gb_by_estimate(key):
    spec = load_model_spec(_json(key))
    r = _recipe(key)
    plan_layout(spec, ParallelSizes(tp=r.tp, pp=r.pp), r.world)
    ranks = memory_estimate.estimate(spec, memory_estimate.plan_for(spec, r), r)
    assert memory_estimate.fits(ranks), memory_estimate.report(spec, r)


@pytest.mark.parametrize("key", MODELS)
def test_converter_dry_run_sizes_every_rank_file(key):
    spec = load_model_spec(_json(key))
    r = _recipe(key)
    plan = memory_estimate.plan_for(spec, r)
    pc = ParallelConfig(tp_size=r.tp, llm_pp_layers=[list(x) for x in plan.llm_pp_layers],
                        vit_pp_layers=[list(x) for x in plan.vit_pp_layers])
    report = dry_run(spec, pc)
    assert sorted(report.ranks) == [(t, p) for t in range(r.tp) for p in range(r.pp)]
    # every parameter in bf16 once over the PP stages of one TP rank set; TP pads the vocabulary rows
    padding = 2 * (plan.padded_vocab_size - spec.text.vocab_size) * spec.text.hidden_size
    replicated = sum(n for (t, _), (n, _) in report.ranks.items()) - count_from_config(*HF_SHAPES[key]) - padding // 2
    assert replicated >= 0 and report.bytes == 2 * sum(n for n, _ in report.ranks.values())
    assert report.line().count("tp_rank") == r.tp * r.pp


def test_dry_run_from_the_command_line_reads_no_weights(tmp_path):
    """`mm-convert ... hf_to_mm --cfg.dry_run true` with only a model JSON: sizes printed, nothing written."""
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "mindspeed_mm.cli.mm_convert", "InternVLConverter", "hf_to_mm", "--cfg.dry_run", "true",
         "--cfg.model_json", str(EXAMPLES / "internvl3" / "model_8B.json"), "--cfg.mm_dir", str(out),
         "--cfg.parallel_config.llm_pp_layers", "[[6,8,8,6]]", "--cfg.parallel_config.vit_pp_layers", "[[24,0,0,0]]"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TP1 PP4" in proc.stdout and proc.stdout.count("tp_rank") == 4
    assert not out.exists()


@pytest.mark.parametrize("key", MODELS)
def test_meta_device_model_has_the_published_parameter_count(key, megatron_single_rank):
    """InternVLModel built on torch's meta device (one rank, TP1: no memory for the weights), its parameters
    counted: the model megatron builds, not only the registry, has the published size."""
    import torch

    from mindspeed_mm.models.internvl.model import InternVLModel

    spec = load_model_spec(_json(key))
    one_stage = dataclasses.replace(spec, text=dataclasses.replace(spec.text, pipeline_num_layers=None),
                                    vision=dataclasses.replace(spec.vision, pipeline_num_layers=None))
    with torch.device("meta"):
        model = InternVLModel(one_stage)
    count = sum(p.numel() for p in model.parameters())
    assert count == count_from_config(*HF_SHAPES[key])
    total, unit = PUBLISHED_TOTAL[key]
    assert abs(count / 1e9 - total) <= unit / 2
