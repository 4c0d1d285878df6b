"""Inference pieces without a model comparison: the inference JSON (errors naming the key), sampling filters,
the padding mask, prompts (template, multi-image and frame prefixes), checkpoint layout checks, the sequence
limit, and the CLI end to end at one rank."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mindspeed_mm.inference.config import (
    GenerationConfig,
    InferenceConfigError,
    RequestSpec,
    config_from_dict,
    load_inference_config,
)
from mindspeed_mm.inference.generate import PromptTooLong, _budgets, _mask, padded_batch
from mindspeed_mm.inference.sampling import filter_logits

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "internvl3"


def base(**kw) -> dict:
    raw = {"from_pretrained": "ckpt", "tokenizer": {"from_pretrained": "hf"}, "prompts": "hi", "infer_data_type": "text"}
    raw.update(kw)
    return raw


# ------------------------------------------------------------------------------------------------ config
def test_example_jsons_parse():
    cfg = load_inference_config(EXAMPLES / "inference_8B.json", check_files=False)
    assert cfg.requests[0].infer_data_type == "image" and cfg.generation_config.eos_token_id == (151645,)
    assert cfg.dtype == "bf16" and cfg.generation_config.use_cache
    tiny = load_inference_config(EXAMPLES / "inference_tiny.json", check_files=False)
    assert [r.prompt for r in tiny.requests] == ["What colour is this picture?", "Describe this image."]


def test_reference_schema_with_model_keys_and_alias():
    """The reference's inference JSON carries the model keys and names the LLM "Qwen2.5llm"."""
    model = json.loads((EXAMPLES / "model_tiny.json").read_text())
    model["text_decoder"]["model_id"] = "Qwen2.5llm"
    cfg = config_from_dict(base(**model), check_files=False)
    assert cfg.model["text_decoder"]["model_id"] == "internllm"


@pytest.mark.parametrize("raw, key", [
    (base(infer_data_type="audio"), "infer_data_type"),
    (base(generation_config={"num_beams": 4}), "generation_config.num_beams"),
    (base(generation_config={"max_new_token": 4}), "generation_config.max_new_token"),
    (base(generation_config={"top_p": 0.0}), "generation_config.top_p"),
    (base(generation_config={"do_sample": True, "temperature": 0}), "generation_config.temperature"),
    (base(device="tpu"), "device"),
    (base(generation_config={"num_return_sequences": 2}), "generation_config.num_return_sequences"),
    (base(generation_config={"typical_p": 0.9}), "generation_config.typical_p"),
    (base(generation_config={"renormalize_logits": True}), "generation_config.renormalize_logits"),
    (base(generation_config={"bad_words_ids": [[3]]}), "generation_config.bad_words_ids"),
    (base(generation_config={"repetition_penalty": 0.0}), "generation_config.repetition_penalty"),
    (base(dtype="int8"), "dtype"),
    (base(tokenizer={}), "tokenizer.from_pretrained"),
    (base(tokenizer={"from_pretrained": "hf", "use_fast": "no"}), "tokenizer.use_fast"),
    (base(num_segment=8), "num_segment"),
    (base(prompts=None, file_path="x.png"), "prompts"),
    ({"tokenizer": {"from_pretrained": "hf"}, "prompts": "hi"}, "from_pretrained"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(InferenceConfigError) as e:
        config_from_dict(raw, check_files=False)
    assert e.value.key_path == key and str(e.value).startswith(key + ":")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(InferenceConfigError, match=r"^file_path: file not found: .*nope\.png"):
        config_from_dict(base(infer_data_type="image", file_path=str(tmp_path / "nope.png")))
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"prompt": "x", "infer_data_type": "image", "file_path": [str(img), "gone.png"]}) + "\n")
    with pytest.raises(InferenceConfigError, match=r"^requests_file line 1\.file_path\[1\]: file not found"):
        config_from_dict(base(requests_file=str(reqs)))
    reqs.write_text('{"prompt": "x", "infer_data_type": "video", "file_path": ["a.mp4", "b.mp4"]}\n')
    with pytest.raises(InferenceConfigError, match="a video request takes one file"):
        config_from_dict(base(requests_file=str(reqs)))
    with pytest.raises(InferenceConfigError, match="requests_file: file not found"):
        config_from_dict(base(requests_file=str(tmp_path / "none.jsonl")))
    with pytest.raises(InferenceConfigError, match="takes no files"):
        config_from_dict(base(file_path=str(img)))


def test_requests_from_prompts_and_file(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"prompt": "t", "id": "q7", "max_new_tokens": 3}\n\n{"prompt": "u", "infer_data_type": "image",'
                    f' "file_path": "{img}"}}\n')
    cfg = config_from_dict(base(infer_data_type="image", file_path=[str(img), str(img)], prompts=["a", "b"],
                                requests_file=str(reqs), generation_config={"eos_token_id": [1, 2]}))
    # A line without files is text; one with files takes the top-level infer_data_type unless it says its own.
    assert [(r.id, r.infer_data_type, len(r.file_path), r.max_new_tokens) for r in cfg.requests] == [
        ("0", "image", 2, None), ("1", "image", 2, None), ("q7", "text", 0, 3), ("3", "image", 1, None)]
    assert cfg.generation_config.eos_token_id == (1, 2)



def test_generation_key_table_covers_transformers():
    """Every key of the installed transformers' GenerationConfig is honoured, inert or neutral-only, and its
    default for a neutral-only key is neutral (the table is static so the config loads without transformers)."""
    import transformers

    from mindspeed_mm.inference.generation_keys import HONOURED, INERT, NEUTRAL, _is_neutral

    assert not (HONOURED & set(INERT)) and not (HONOURED & set(NEUTRAL)) and not (set(INERT) & set(NEUTRAL))
    assert {f.name for f in dataclasses.fields(GenerationConfig)} == HONOURED
    keys = set(transformers.GenerationConfig().to_dict())
    assert keys - HONOURED - set(INERT) - set(NEUTRAL) == set()
    defaults = transformers.GenerationConfig._get_default_generation_params()
    for key in NEUTRAL:
        assert _is_neutral(defaults.get(key), NEUTRAL[key]), key
    ours = GenerationConfig()
    for key in HONOURED - {"max_length", "eos_token_id", "bos_token_id", "pad_token_id"}:
        if key in defaults:  # our default where transformers has one (not max_length: see DEFAULT_MAX_NEW_TOKENS)
            assert getattr(ours, key) == defaults[key], key


def test_reference_generation_config_as_written(caplog):
    """The reference's generation_config (all 49 keys of transformers 4.x): accepted, the unused keys listed in
    one line, max_new_tokens winning over max_length."""
    raw = json.loads((EXAMPLES / "reference" / "inference_8B.json").read_text())["generation_config"]
    with caplog.at_level("INFO", logger="mindspeed_mm.inference"):
        g = GenerationConfig.from_dict(raw)
    lines = [r.getMessage() for r in caplog.records if "generation_config" in r.getMessage()]
    assert len(lines) == 1 and "typical_p" in lines[0] and "use_cache (false" in lines[0]
    assert g.new_token_budget(300) == 1024 and g.use_cache and g.eos_token_id == (151645,)
    assert GenerationConfig.from_dict({"max_length": 20}).new_token_budget(15) == 5
    with pytest.raises(PromptTooLong, match="generation_config.max_length is 20"):
        _budgets([torch.ones(20, dtype=torch.long)], GenerationConfig(max_length=20), 100, None)


def test_processors_follow_transformers():
    """Repetition penalty, no-repeat n-grams and min lengths on random logits, step by step, against
    transformers' processors over the whole sequence."""
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    from mindspeed_mm.inference.processors import LogitsProcessors

    g = torch.Generator().manual_seed(0)
    vocab, prompts = 12, [torch.randint(0, 12, (9,), generator=g), torch.randint(0, 12, (5,), generator=g)]
    for n in (1, 2, 3):
        config = GenerationConfig(repetition_penalty=1.7, no_repeat_ngram_size=n, min_length=8, min_new_tokens=3)
        ours = LogitsProcessors(config, prompts, [4, 7], vocab, "cpu")
        seqs = [p.clone() for p in prompts]
        for _ in range(6):
            logits = torch.randn(2, vocab, generator=g)
            got = ours(logits)
            for i, seq in enumerate(seqs):
                ref = logits[i:i + 1]
                for proc in (RepetitionPenaltyLogitsProcessor(1.7), NoRepeatNGramLogitsProcessor(n),
                             MinLengthLogitsProcessor(8, [4, 7]), MinNewTokensLengthLogitsProcessor(len(prompts[i]), 3, [4, 7])):
                    ref = proc(seq[None], ref)
                assert torch.equal(got[i], ref[0]), (n, i)
            tokens = [int(torch.randint(0, vocab, (1,), generator=g)) for _ in seqs]
            ours.append(tokens, [True, True])
            seqs = [torch.cat([s, torch.tensor([t])]) for s, t in zip(seqs, tokens)]


# ------------------------------------------------------------------------------------------------ sampling
def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.8: 0.5 + 0.3 reach it, the rest go; top_p 0.81 needs the third.
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=1e-9)).sum() == 3  # the most likely always stays
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.8)).tolist() == [[True, False, True, False]]
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


# ------------------------------------------------------------------------------------------------ batching
def test_left_padding_and_mask():
    ids, pads = padded_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and pads.tolist() == [0, 2]
    m = _mask(pads, 3, 3)[:, 0]  # True = masked
    assert m[0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # request 1: its pads attend to themselves only; its token ignores them
    assert m[1].tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    step = _mask(pads, 1, 5)[:, 0]
    assert step[1].tolist() == [[True, True, False, False, False]] and not step[0].any()
    assert _mask(torch.tensor([0, 0]), 3, 3) is None


def test_prompt_longer_than_the_sequence_is_an_error():
    config = GenerationConfig(max_new_tokens=10)
    assert _budgets([torch.ones(90, dtype=torch.long)], config, 95, None) == [5]
    assert _budgets([torch.ones(10, dtype=torch.long)] * 2, config, 95, [3, None]) == [3, 10]
    with pytest.raises(PromptTooLong, match="request 1: the prompt has 95 tokens .* sequence length is 95"):
        _budgets([torch.ones(4, dtype=torch.long), torch.ones(95, dtype=torch.long)], config, 95, None)


# ------------------------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF checkpoint, its TP1 and TP2 x PP2 conversions, two images and a video."""
    from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
    from mindspeed_mm.testing.tiny_dataset import write_video

    root = tmp_path_factory.mktemp("inference_unit")
    hf = write_tiny_checkpoint(root / "hf", fmt="native", preset="vit6b", seed=2)
    for name, tp, vit, llm in (("mm", 1, [[2]], [[2]]), ("mm_tp2pp2", 2, [[2, 0]], [[1, 1]])):
        hf_to_mm(HFToMMConfig(mm_dir=str(root / name), hf_config=HFConfig(hf_dir=str(hf)), progress=False,
                              parallel_config=ParallelConfig(tp_size=tp, vit_pp_layers=vit, llm_pp_layers=llm)))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 130, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / "square.png")
    write_video(root / "clip.mp4", [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(10)])
    return root


def test_prompts_follow_training(tiny):
    from transformers import AutoTokenizer

    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.data.template import build_conversation
    from mindspeed_mm.inference.pipeline import prepare_request

    spec, tok = spec_from_hf_dir(tiny / "hf"), AutoTokenizer.from_pretrained(str(tiny / "hf"))
    two = prepare_request(RequestSpec("Compare.", "image", (str(tiny / "wide.png"), str(tiny / "square.png"))),
                          spec, tok, max_tiles=6)
    assert two.tiles_per_image == [3, 1]  # 6 tiles split in 3 each: the wide one gets 2x1 + thumbnail
    assert two.pixel_values.shape[0] == 4
    text = tok.decode(two.input_ids)
    assert "Image-1: <img>" in text and "</img>\nImage-2: <img>" in text and text.endswith(
        "Compare.<|im_end|>\n<|im_start|>assistant\n")
    # The prompt is the training conversation's tokens up to its answer.
    train_ids, _ = build_conversation([{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nCompare."},
                                       {"from": "gpt", "value": "ok"}], [3, 1], spec.tokens_per_tile, tok)
    assert train_ids[: len(two.input_ids)].tolist() == two.input_ids.tolist()
    video = prepare_request(RequestSpec("What happens?", "video", (str(tiny / "clip.mp4"),)), spec, tok,
                            num_segments=3)
    assert video.tiles_per_image == [1, 1, 1] and "Frame-1: <img>" in tok.decode(video.input_ids)
    assert "\nFrame-3: <img>" in tok.decode(video.input_ids)
    placed = prepare_request(RequestSpec("Look: <video>\nWhat happens?", "video", (str(tiny / "clip.mp4"),)), spec,
                             tok, num_segments=2)
    assert "Look: Frame-1: <img>" in tok.decode(placed.input_ids)
    text_only = prepare_request(RequestSpec("Hi", "text"), spec, tok)
    assert text_only.pixel_values is None and "<img>" not in tok.decode(text_only.input_ids)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_layout_and_model_checks(tiny):
    from mindspeed_mm.inference.loading import (
        LayoutMismatch,
        check_world,
        inspect_checkpoint,
    )

    info = inspect_checkpoint(tiny / "mm_tp2pp2")
    assert (info.tp, info.pp, info.world_size) == (2, 2, 4)
    with pytest.raises(LayoutMismatch, match=r"split TP2 x PP2 \(4 process\(es\)\), but this run has 1: launch "
                                             r"`torchrun --nproc_per_node 4"):
        check_world(info, 1)
    model = json.loads((EXAMPLES / "model_tiny.json").read_text())
    with pytest.raises(InferenceConfigError, match=r"^[\w.]+: \S+ in the inference JSON, but the "
                                                   "checkpoint .* has"):
        inspect_checkpoint(tiny / "mm", model)
    with pytest.raises(InferenceConfigError, match="^text_decoder: from_pretrained is a single file"):
        inspect_checkpoint(tiny / "mm" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        inspect_checkpoint(tiny / "missing")


def test_model_keys_may_differ_in_run_settings_only(tiny):
    """The inference JSON's model keys may differ from the checkpoint's in run settings (freeze, layout, dtype,
    recompute, context length), not in the architecture."""
    from mindspeed_mm.checkpoint.mm_format import checkpoint_meta
    from mindspeed_mm.config.model_spec import to_dict
    from mindspeed_mm.inference.loading import inspect_checkpoint

    model = to_dict(checkpoint_meta(tiny / "mm").spec())
    model["text_decoder"].update(freeze=True, params_dtype="bf16", pipeline_num_layers=None, init_method_std=0.5,
                                 recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
                                 max_position_embeddings=64, rope_scaling={"type": "dynamic", "factor": 2.0})
    model["image_encoder"]["vision_encoder"].update(freeze=False, drop_path_rate=0.1, sequence_parallel=False)
    model.update(pre_process=False)
    info = inspect_checkpoint(tiny / "mm", model)
    assert info.spec.text.max_position_embeddings == 64 and info.spec.text.params_dtype == "fp32"
    model["text_decoder"]["rotary_base"] = 10.0
    with pytest.raises(InferenceConfigError, match=r"^text_decoder\.rotary_base: 10\.0 in the inference JSON"):
        inspect_checkpoint(tiny / "mm", model)


def _cli(tiny, tmp_path, nproc_ok=True, **extra) -> subprocess.CompletedProcess:
    cfg = {"infer_data_type": "image", "file_path": str(tiny / "wide.png"), "prompts": ["What is it?", "Again?"],
           "from_pretrained": str(tiny / "mm"), "tokenizer": {"from_pretrained": str(tiny / "hf")},
           "dtype": "fp32", "device": "cpu", "batch_size": 2, "output_path": str(tmp_path / "out.jsonl"),
           "generation_config": {"max_new_tokens": 6, "eos_token_id": []}, **extra}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "inference_vlm.py"), "--mm-model", str(tmp_path / "c.json")],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end_and_its_errors(tiny, tmp_path):
    """The entry point at one rank: results JSONL from a converted checkpoint; a single-rank .pt file with the
    model keys in the JSON; the sequence limit and a layout needing 4 processes fail with their messages."""
    proc = _cli(tiny, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"] and all(len(r["token_ids"]) == 6 for r in rows)
    assert rows[0]["num_tiles"] == 11 and rows[0]["timings"]["batch_size"] == 2
    assert set(rows[0]) >= {"prompt", "response", "token_ids", "finish_reason", "timings", "num_prompt_tokens"}

    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.config.model_spec import to_dict

    pt = tiny / "mm" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    proc = _cli(tiny, tmp_path, from_pretrained=str(pt), **to_dict(spec_from_hf_dir(tiny / "hf")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    same = [json.loads(line)["token_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert same == [r["token_ids"] for r in rows]

    proc = _cli(tiny, tmp_path, seq_length=100)
    assert proc.returncode != 0 and "PromptTooLong: request 0: the prompt has" in proc.stderr
    proc = _cli(tiny, tmp_path, from_pretrained=str(tiny / "mm_tp2pp2"))
    assert proc.returncode != 0 and "LayoutMismatch" in proc.stderr and "--nproc_per_node 4" in proc.stderr


# ------------------------------------------------------------------------------------------------ reference files
def test_reference_files_parse():
    """Every key of the reference's five example JSONs (examples/internvl3/reference/, as they ship) parses: the
    model and inference JSONs as written, the data JSONs with their placeholder data_path replaced."""
    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.inference.config import _model_dict

    ref = EXAMPLES / "reference"
    assert load_inference_config(ref / "inference_8B.json", check_files=False).device == "npu"
    for name, layers in (("model_8B", 28), ("model_78B", 80), ("inference_8B", 28)):
        raw = json.loads((ref / f"{name}.json").read_text())
        assert load_model_spec(_model_dict(raw) if "generation_config" in raw else raw).text.num_layers == layers
    for name in ("data_8B", "data_78B"):
        raw = json.loads((ref / f"{name}.json").read_text())
        assert raw["dataset_param"]["basic_parameters"]["data_path"] == "/path/json_path"
        raw["dataset_param"]["basic_parameters"]["data_path"] = "/path/data.jsonl"
        load_data_spec(raw)


def test_model_switches_at_another_models_value_are_errors():
    """An implementation switch at a value that describes another model is an error naming it."""
    from mindspeed_mm.config.model_spec import load_model_spec
    from mindspeed_mm.inference.config import _model_dict

    raw = _model_dict(json.loads((EXAMPLES / "reference" / "inference_8B.json").read_text()))
    for key, value in (("qk_layernorm", True), ("layernorm_zero_centered_gamma", True), ("is_encoder_decoder", True),
                       ("masked_softmax_fusion", "no")):
        bad = {**raw, "text_decoder": {**raw["text_decoder"], key: value}}
        with pytest.raises(InferenceConfigError, match=rf"^text_decoder\.{key}: "):
            load_model_spec(bad)


def test_megatron_flags_against_json_and_checkpoint(tiny):
    """The reference launcher's flags: layout flags against the checkpoint, model flags against the JSON, training
    flags noted; a contradiction names both."""
    from mindspeed_mm.config.model_flags import ArgumentError
    from mindspeed_mm.inference.cli import _parse, reconcile_flags, resolve_device
    from mindspeed_mm.inference.loading import inspect_checkpoint

    cfg = config_from_dict(base(from_pretrained=str(tiny / "mm"), dtype="bf16"), check_files=False)
    info = inspect_checkpoint(tiny / "mm")
    good = ["--mm-model", "x.json", "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--context-parallel-size", "1", "--micro-batch-size", "1", "--global-batch-size", "1", "--seq-length",
            "512", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(info.spec.text.vocab_size),
            "--position-embedding-type", "rope", "--rotary-base", "1000000", "--swiglu", "--no-masked-softmax-fusion",
            "--use-distributed-optimizer", "--bf16", "--use-flash-attn", "--log-interval", "1", "--save-interval",
            "5000", "--eval-interval", "5000", "--eval-iters", "5000", "--distributed-backend", "nccl"]
    out, noted = reconcile_flags(_parse(good), cfg, info)
    assert out.seq_length == 512 and "--micro-batch-size" in noted and "--tokenizer-type" in noted
    for flags, message in (
            (["--tensor-model-parallel-size", "2"], r"--tensor-model-parallel-size 2 contradicts the run's 1: the "
                                                     r"checkpoint .* is split TP1 x PP1"),
            (["--context-parallel-size", "2"], "without context parallelism"),
            (["--vocab-size", "7"], r"--vocab-size 7 contradicts text_decoder.vocab_size"),
            (["--fp16"], r"--fp16 contradicts dtype 'bf16'"),
            (["--seq-length", "99999"], "exceeds text_decoder.max_position_embeddings")):
        with pytest.raises(ArgumentError, match=message):
            reconcile_flags(_parse(["--mm-model", "x.json", *flags]), cfg, info)
    with pytest.raises(ArgumentError, match="--seq-length 512 contradicts seq_length 100"):
        reconcile_flags(_parse(["--mm-model", "x.json", "--seq-length", "512"]),
                        config_from_dict(base(seq_length=100), check_files=False), info)
    cuda = torch.cuda.is_available()
    assert resolve_device("npu") == ("cuda", "device 'npu' asked for; running on cuda") if cuda else (
        resolve_device("npu") == ("cpu", "device 'npu' asked for; running on cpu (torch sees no CUDA device)"))
    assert resolve_device("cpu") == ("cpu", None) and resolve_device("auto")[1] is None
