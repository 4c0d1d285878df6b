"""Generation against transformers' `generate` on the same tiny random checkpoint: greedy token ids equal for
one image (one tile and many tiles), two images, video frames and text only, inputs prepared by our inference
pipeline (tiling, frames, template) and handed to both models. Then the KV cache against recomputation, and
batching against one request at a time (other layouts: tests/multirank/test_inference_layouts.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config, spec_from_hf_dir
from mindspeed_mm.inference.config import GenerationConfig, RequestSpec
from mindspeed_mm.inference.generate import generate
from mindspeed_mm.inference.pipeline import prepare_request
from mindspeed_mm.inference.stages import StageRunner
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict
from tests.helpers.oracle import load_native_model, use_dynamic_ntk_rope
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

NEW_TOKENS = 20


def write_inputs(root, image_size: int) -> dict[str, str]:
    """A square image (one tile), a wide one (3x1 tiles + thumbnail) and a 12-frame video, from seeded noise."""
    from mindspeed_mm.testing.tiny_dataset import write_video

    rng = np.random.default_rng(0)
    paths = {"square": root / "square.png", "wide": root / "wide.png", "video": root / "clip.mp4"}
    Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(paths["square"])
    Image.fromarray(rng.integers(0, 256, (image_size, 3 * image_size + 5, 3), dtype=np.uint8)).save(paths["wide"])
    write_video(paths["video"], [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from mindspeed_mm.distributed import (
        destroy_distributed,
        init_distributed,
        initialize_model_parallel,
    )

    root = tmp_path_factory.mktemp("generate")
    hf_dir = write_tiny_checkpoint(root / "hf", fmt="native", preset="vit300m", seed=0)
    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    config, fmt, state = load_hf_checkpoint(hf_dir)
    spec = spec_from_hf_config(config)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, hf_to_mm(state, spec, fmt))
    ours.eval()
    files = write_inputs(root, spec.vision.image_size)
    yield {"runner": StageRunner([ours]), "hf": load_native_model(hf_dir), "spec": spec,
           "tokenizer": AutoTokenizer.from_pretrained(str(hf_dir)), "files": files}
    destroy_distributed()


CASES = {
    "one_tile": RequestSpec("Describe the picture.", "image", ("square",)),
    "many_tiles": RequestSpec("What is in the image?", "image", ("wide",)),
    "two_images": RequestSpec("Compare them.", "image", ("wide", "square")),
    "video": RequestSpec("What happens in the video?", "video", ("video",)),
    "text_only": RequestSpec("Tell me about rockets.", "text", ()),
}


def prepared(setup, case: str):
    r = CASES[case]
    r = RequestSpec(r.prompt, r.infer_data_type, tuple(setup["files"][f] for f in r.file_path))
    return prepare_request(r, setup["spec"], setup["tokenizer"], max_tiles=6, num_segments=4)


def ours(setup, prompts, pixels, stop_ids=(), new_tokens=NEW_TOKENS, **kw):
    config = GenerationConfig(max_new_tokens=new_tokens, **kw)
    return generate(setup["runner"], prompts, pixels, config, stop_ids=list(stop_ids), pad_id=0, max_length=2048,
                    keep_logits=True)


def transformers_generate(setup, p, eos: int, new_tokens=NEW_TOKENS) -> list[int]:
    ids = p.input_ids[None]
    images = {} if p.pixel_values is None else {"pixel_values": p.pixel_values}
    with torch.no_grad():
        out = setup["hf"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=eos, pad_token_id=0, **images)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(setup, case):
    p = prepared(setup, case)
    expected_tiles = {"one_tile": [1], "many_tiles": [4], "two_images": [4, 1], "video": [1] * 4, "text_only": []}
    assert p.tiles_per_image == expected_tiles[case]
    got = ours(setup, [p.input_ids], p.pixel_values)
    tokens = got.tokens[0]
    assert len(tokens) == NEW_TOKENS and got.finish_reasons == ["length"]
    # transformers stops only at a token neither model produced, so both run the full NEW_TOKENS.
    unused = next(t for t in range(setup["spec"].text.vocab_size) if t not in tokens)
    assert transformers_generate(setup, p, eos=unused) == tokens
    assert len(set(tokens)) > 3, "degenerate output would make the comparison weak"


def test_stops_where_transformers_stops(setup):
    """A stop token ends the request after it is emitted, at the same step as transformers' eos."""
    p = prepared(setup, "many_tiles")
    full = ours(setup, [p.input_ids], p.pixel_values).tokens[0]
    stop = full[7]
    got = ours(setup, [p.input_ids], p.pixel_values, stop_ids=[stop])
    assert got.tokens[0] == full[: full.index(stop) + 1] and got.finish_reasons == ["stop"]
    assert transformers_generate(setup, p, eos=stop) == got.tokens[0]


@pytest.mark.parametrize("case", ["two_images", "text_only"])
def test_kv_cache_equals_recomputation(setup, case):
    p = prepared(setup, case)
    cached = ours(setup, [p.input_ids], p.pixel_values)
    full = ours(setup, [p.input_ids], p.pixel_values, use_cache=False)
    assert cached.tokens == full.tokens
    diff = max((a - b).abs().max().item() for a, b in zip(cached.step_logits, full.step_logits))
    assert diff <= 1e-4, f"max |logits diff| over {len(full.step_logits)} steps: {diff:.3g}"


def test_batch_of_different_lengths_equals_one_at_a_time(setup):
    """Left padding: the batch gives every request its own tokens (and, up to rounding, logits)."""
    cases = ["text_only", "two_images", "one_tile", "video"]
    ps = [prepared(setup, c) for c in cases]
    assert len({len(p.input_ids) for p in ps}) == len(ps)
    pixels = torch.cat([p.pixel_values for p in ps if p.pixel_values is not None])
    for use_cache in (True, False):
        batch = ours(setup, [p.input_ids for p in ps], pixels, use_cache=use_cache)
        for i, p in enumerate(ps):
            alone = ours(setup, [p.input_ids], p.pixel_values)
            assert batch.tokens[i] == alone.tokens[0], cases[i]
            diff = max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.step_logits, alone.step_logits))
            assert diff <= 1e-4, f"{cases[i]}: max |logits diff| {diff:.3g}"


def test_per_request_budgets_and_stops_in_a_batch(setup):
    ps = [prepared(setup, "text_only"), prepared(setup, "one_tile")]
    pixels = ps[1].pixel_values
    full = [ours(setup, [p.input_ids], p.pixel_values).tokens[0] for p in ps]
    stop = full[1][4]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    got = generate(setup["runner"], [p.input_ids for p in ps], pixels, config, stop_ids=[stop], pad_id=0,
                   max_length=2048, max_new_tokens=[6, None])
    first = full[0][:6]
    if stop in first:
        first = first[: first.index(stop) + 1]
    assert got.tokens[0] == first
    assert got.tokens[1] == full[1][: full[1].index(stop) + 1] and got.finish_reasons[1] == "stop"


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(setup):
    p = prepared(setup, "one_tile")

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        config = GenerationConfig(max_new_tokens=12, do_sample=True, **kw)
        return generate(setup["runner"], [p.input_ids], p.pixel_values, config, [], 0, 2048, generator=g).tokens[0]

    a, b, c = sample(1, temperature=1.5), sample(1, temperature=1.5), sample(2, temperature=1.5)
    assert a == b and a != c
    assert sample(5, top_k=1) == ours(setup, [p.input_ids], p.pixel_values, new_tokens=12).tokens[0]
    assert sample(5, top_p=1e-6) == sample(6, top_k=1)


# rope_scaling dynamic NTK: the frequencies follow the total length at every step, as in transformers' generate
@pytest.fixture(scope="module", params=["crosses_during_decode", "prompt_above"])
def dynamic_rope(request, setup, tmp_path_factory):
    prompt_len = len(prepared(setup, "text_only").input_ids)
    max_pos = prompt_len + 5 if request.param == "crosses_during_decode" else prompt_len - 8
    hf_dir = use_dynamic_ntk_rope(write_tiny_checkpoint(tmp_path_factory.mktemp("rope") / "hf", fmt="native",
                                                        preset="vit300m", seed=0), max_pos, 2.0)
    config, fmt, state = load_hf_checkpoint(hf_dir)
    spec = spec_from_hf_config(config)
    assert spec.text.rope_scaling is not None and spec.text.max_position_embeddings == max_pos
    model = InternVLModel(spec)
    load_full_state_dict(model, hf_to_mm(state, spec, fmt))
    return {**setup, "runner": StageRunner([model.eval()]), "spec": spec, "hf_dir": hf_dir}


@pytest.mark.parametrize("case", ["text_only", "one_tile"])
def test_dynamic_ntk_rope_greedy_tokens_equal_transformers(dynamic_rope, case):
    # a fresh transformers model per case: its rotary module keeps the longest length's frequencies
    run = {**dynamic_rope, "hf": load_native_model(dynamic_rope["hf_dir"])}
    p = prepared(run, case)
    assert len(p.input_ids) + NEW_TOKENS > run["spec"].text.max_position_embeddings
    got = ours(run, [p.input_ids], p.pixel_values)
    tokens = got.tokens[0]
    unused = next(t for t in range(run["spec"].text.vocab_size) if t not in tokens)
    ids = p.input_ids[None]
    images = {} if p.pixel_values is None else {"pixel_values": p.pixel_values}
    with torch.no_grad():
        ref = run["hf"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=unused, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True, **images)
    assert ref.sequences[0, ids.shape[1]:].tolist() == tokens
    # every step's logits, as the tokens alone may not change when the base grows only a little past max_pos
    diff = max((a - b).abs().max().item() for a, b in zip(got.step_logits, ref.logits))
    assert diff <= 1e-4, f"max |logits diff| over {NEW_TOKENS} steps: {diff:.3g}"
    assert len(set(tokens)) > 3, "degenerate output would make the comparison weak"
    full = ours(run, [p.input_ids], p.pixel_values, use_cache=False)
    assert full.tokens == got.tokens


@pytest.mark.parametrize("case", ["one_tile", "text_only"])
def test_penalties_and_min_new_tokens_equal_transformers(setup, case):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens as transformers' generate applies them: a
    stop token the unconstrained run emits early is held back until min_new_tokens."""
    p = prepared(setup, case)
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    free = ours(setup, [p.input_ids], p.pixel_values, **kw).tokens[0]
    stop = free[2]
    got = ours(setup, [p.input_ids], p.pixel_values, stop_ids=[stop], min_new_tokens=8, **kw).tokens[0]
    assert stop not in got[:7] and got != free[:3]
    ids = p.input_ids[None]
    images = {} if p.pixel_values is None else {"pixel_values": p.pixel_values}
    with torch.no_grad():
        out = setup["hf"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, eos_token_id=stop, pad_token_id=0, min_new_tokens=8, **kw,
                                   **images)
    assert out[0, ids.shape[1]:].tolist() == got


# the other LLM kinds (and tied embeddings): greedy tokens as transformers' generate gives them
@pytest.fixture(scope="module", params=["qwen3_vit6b", "internlm3_vit300m", "qwen3_tied", "qwen3_moe_vit6b"])
def llm_kind(request, setup, tmp_path_factory):
    hf_dir = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", fmt="original",
                                   preset=request.param, seed=0)
    config, fmt, state = load_hf_checkpoint(hf_dir)
    spec = spec_from_hf_dir(hf_dir)
    model = InternVLModel(spec)
    load_full_state_dict(model, hf_to_mm(state, spec, fmt))
    return {**setup, "runner": StageRunner([model.eval()]), "spec": spec, "hf": load_native_model(hf_dir)}


@pytest.mark.parametrize("case", ["many_tiles", "text_only"])
def test_greedy_tokens_equal_transformers_per_llm_kind(llm_kind, case):
    p = prepared(llm_kind, case)
    tokens = ours(llm_kind, [p.input_ids], p.pixel_values).tokens[0]
    unused = next(t for t in range(llm_kind["spec"].text.vocab_size) if t not in tokens)
    assert transformers_generate(llm_kind, p, eos=unused) == tokens
    assert len(set(tokens)) > 3, "degenerate output would make the comparison weak"
