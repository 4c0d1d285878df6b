"""The inference CLI's `run` under torchrun on converted checkpoints at other layouts (TP2 with the ViT's 5
heads split unevenly and an odd vocabulary, PP2 with each kind of stage boundary, PP2 x VPP2, TP2 x PP2):
every rank gets the same results, and the greedy tokens of every request (images, two images, video, text;
batched two at a time, so left padding is in play) equal transformers' `generate` on the HF checkpoint the
conversion read."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.launch import run_torchrun
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

WORKER = Path(__file__).parent / "workers" / "inference_worker.py"
NEW_TOKENS = 16

LAYOUTS = {
    # name: (preset, tp, vit_pp_layers, llm_pp_layers)
    "tp2_odd_vit_heads": ("vit6b", 2, [[2]], [[2]]),
    "pp2_vit_then_llm_split": ("vit300m", 1, [[2, 0]], [[1, 1]]),
    "pp2_vit_split_features_cross": ("vit300m", 1, [[1, 1]], [[0, 2]]),
    "pp2_vpp2": ("vit6b", 1, [[1, 1], [0, 0]], [[0, 0], [1, 1]]),
    "tp2_pp2": ("vit6b", 2, [[2, 0]], [[1, 1]]),
    # MindSpeed-MM's own rank files (projector whole per rank, uneven vocabulary rows), without our metadata:
    # the layout is read off the files, the model from the JSON's model keys
    "tp2_mindspeed_files": ("vit6b", 2, [[2]], [[2]]),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mindspeed_mm.testing.tiny_dataset import write_video

    root = tmp_path_factory.mktemp("inference_inputs")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (56, 120, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / "square.png")
    write_video(root / "clip.mp4", [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(9)])
    return root


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_hf")
    return {p: write_tiny_checkpoint(root / p, fmt="native", preset=p, seed=3) for p in ("vit300m", "vit6b")}


def requests_file(inputs: Path) -> Path:
    path = inputs / "requests.jsonl"
    rows = [
        {"prompt": "What is in the image?", "infer_data_type": "image", "file_path": str(inputs / "wide.png")},
        {"prompt": "Compare them.", "infer_data_type": "image",
         "file_path": [str(inputs / "wide.png"), str(inputs / "square.png")]},
        {"prompt": "What happens?", "infer_data_type": "video", "file_path": str(inputs / "clip.mp4")},
        {"prompt": "Tell me about rockets.", "infer_data_type": "text"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Applied by the last pipeline stage alone, whose tokens every rank then takes: the same under any split.
PENALTIES = {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}


def transformers_tokens(hf_dir: Path, result: dict) -> list[int]:
    """transformers' greedy continuation of the same prompt ids and tiles; it may stop only at a token our
    output does not hold, so a difference cannot hide behind an early stop."""
    from transformers import AutoTokenizer

    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.inference.config import RequestSpec
    from mindspeed_mm.inference.pipeline import prepare_request
    from tests.helpers.oracle import load_native_model

    spec = spec_from_hf_dir(hf_dir)
    request = RequestSpec(result["prompt"], result["infer_data_type"], tuple(result["file_path"]))
    p = prepare_request(request, spec, AutoTokenizer.from_pretrained(str(hf_dir)), max_tiles=6, num_segments=3)
    assert len(p.input_ids) == result["num_prompt_tokens"]
    ids = p.input_ids[None]
    unused = next(t for t in range(spec.text.vocab_size) if t not in result["token_ids"])
    images = {} if p.pixel_values is None else {"pixel_values": p.pixel_values}
    with torch.no_grad():
        out = load_native_model(hf_dir).generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=NEW_TOKENS, eos_token_id=unused, pad_token_id=0,
                                                 **PENALTIES, **images)
    return out[0, ids.shape[1]:].tolist()


def convert(hf_dir: Path, mm_dir: Path, tp: int, vit, llm, target_format: str = "mm") -> None:
    from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm

    hf_to_mm(HFToMMConfig(mm_dir=str(mm_dir), hf_config=HFConfig(hf_dir=str(hf_dir)), progress=False,
                          parallel_config=ParallelConfig(tp_size=tp, vit_pp_layers=vit, llm_pp_layers=llm),
                          target_format=target_format))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_generates_transformers_tokens(name, hf_dirs, inputs, tmp_path):
    from mindspeed_mm.checkpoint.mm_format import META_FILE
    from mindspeed_mm.testing.tiny_run import write_model_json

    preset, tp, vit, llm = LAYOUTS[name]
    mindspeed = name.endswith("_mindspeed_files")
    convert(hf_dirs[preset], tmp_path / "mm", tp, vit, llm, "mindspeed" if mindspeed else "mm")
    nproc = tp * len(vit[0])  # tp x pp
    model_keys = {}
    if mindspeed:
        (tmp_path / "mm" / META_FILE).unlink()
        model_keys = json.loads(write_model_json(hf_dirs[preset], tmp_path / "model.json").read_text())
    config = {
        **model_keys,
        "requests_file": str(requests_file(inputs)), "from_pretrained": str(tmp_path / "mm"),
        "tokenizer": {"from_pretrained": str(hf_dirs[preset])}, "dtype": "fp32", "device": "cpu",
        "max_tiles": 6, "num_segments": 3, "batch_size": 2,
        "generation_config": {"max_new_tokens": NEW_TOKENS, "eos_token_id": [], **PENALTIES},
    }
    (tmp_path / "infer.json").write_text(json.dumps(config))
    run_torchrun(WORKER, nproc, [str(tmp_path / "infer.json"), str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for r in ranks[1:]:
        assert [x["token_ids"] for x in r] == [x["token_ids"] for x in ranks[0]]
    for result in ranks[0]:
        assert len(result["token_ids"]) == NEW_TOKENS
        assert result["token_ids"] == transformers_tokens(hf_dirs[preset], result), result["prompt"]
