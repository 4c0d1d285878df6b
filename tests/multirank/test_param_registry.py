"""The parameter registry (models/internvl/params.py) is the model megatron builds: names, per-rank shapes at
TP1, TP2 and unaligned TP2 (5 ViT heads), and which dim each tensor-parallel layer splits; the Qwen3 and
InternLM3 LLMs at TP2, tied embeddings at TP2 and at PP2 (the last stage's copy of the embedding); LoRA on
both modules at TP2 (the adapter rows, `params(spec, adapters=True)`), its A drawn the same at TP1 and TP2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.launch import run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = Path(__file__).parent / "workers" / "param_registry_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("registry") / "out"
    run_torchrun(WORKER, 2, [str(prefix)], timeout=300)
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(2)]


LORA_CASES = ["vit300m+lora/tp2", "vit6b+lora/tp2"]


@pytest.mark.parametrize("case", ["vit300m/tp1", "vit300m/tp2", "vit6b/tp1", "vit6b/tp2", "qwen3_vit6b/tp2",
                                  "internlm3_vit300m/tp2", "qwen3_tied/tp2", "qwen3_tied/pp2", *LORA_CASES])
@pytest.mark.parametrize("rank", [0, 1])
def test_registry_is_what_megatron_builds(results, case, rank):
    built, registry = results[rank][case]["built"], results[rank][case]["registry"]
    assert sorted(built) == sorted(registry)
    for name, want in registry.items():
        got = built[name]
        assert got["shape"] == want["shape"], (name, want["kind"])
        assert (got["split"], got["dim"], got["stride"]) == (want["split"], want["dim"], want["stride"]), \
            (name, want["kind"], got)


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_matrices_at_tp2(results, case):
    """Every adapter of every layer is there (A and B of each HF linear: 6 ViT, 7 LLM per layer); the ViT's q
    B rows and projection A columns follow its heads (vit6b: 3 + 2)."""
    built = [results[r][case]["built"] for r in range(2)]
    names = [n for n in built[0] if ".lora_" in n]
    assert len(names) == 2 * 2 * (6 + 7), names
    b_q = "image_encoder.encoder.encoder.layers.1.self_attention.linear_qkv.lora_b_q"
    a_proj = "image_encoder.encoder.encoder.layers.1.self_attention.linear_proj.lora_a"
    rows = [built[r][b_q]["shape"][0] for r in range(2)]
    cols = [built[r][a_proj]["shape"][1] for r in range(2)]
    assert rows == cols == ([24, 16] if case.startswith("vit6b") else [16, 16]), (rows, cols)


@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("rank", [0, 1])
def test_lora_init_is_layout_independent(results, case, rank):
    """Each rank's A is `shard_tensor` of the TP1 model's A, exactly; every B starts at zero."""
    a, b = results[rank][case]["lora_a_init"], results[rank][case]["lora_b_init"]
    assert len(a) == len(b) == 2 * (6 + 7)
    assert {n: d for n, d in a.items() if d != 0} == {}
    assert {n: d for n, d in b.items() if d != 0} == {}


def test_unaligned_heads_differ_per_rank(results):
    """vit6b's 5 heads at TP2: rank 0 holds 3, rank 1 holds 2, so their ViT qkv rows differ."""
    name = "image_encoder.encoder.encoder.layers.0.self_attention.linear_qkv.weight"
    rows = [results[r]["vit6b/tp2"]["built"][name]["shape"][0] for r in range(2)]
    assert rows[0] > rows[1] and rows[0] * 2 == rows[1] * 3, rows


def test_tied_copy_is_the_output_layer_on_the_last_stage(results):
    emb, out = "text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight"
    first, last = (results[r]["qwen3_tied/pp2"]["built"] for r in range(2))
    assert emb in first and out not in first and out in last and emb not in last
    assert out not in results[0]["qwen3_tied/tp2"]["built"]
