"""Benchmark runs on one rank against transformers and against hand counts.

- Every prediction of every kind of benchmark (multiple choice with MMBench's circular copies, MME's yes/no,
  open VQA with three metrics, video files and frame lists, several images in one item), answered four at a
  time (left padding in play), equals transformers' greedy `generate` on the same prompt ids and tiles.
- Scores: part files holding chosen predictions are scored by the runner, and the scores equal counts
  worked out by hand from VLMEvalKit's rules (written beside each number).
- Bad rows are counted skips; the VLMEvalKit adapter answers as the runner does.
(Instances, TP, PP and resuming: tests/multirank/test_evaluation_instances.py.)
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from mindspeed_mm.evaluation import prompts
from mindspeed_mm.evaluation.benchmark import load_benchmark
from mindspeed_mm.evaluation.runner import EvalOptions, Evaluator, prepare_item
from mindspeed_mm.testing.tiny_benchmarks import corrupt_copies, write_eval_json, write_tiny_benchmarks
from tests.helpers.oracle import load_native_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mindspeed_mm.data.tokenizer import load_tokenizer
    from mindspeed_mm.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.inference.config import load_inference_config
    from mindspeed_mm.inference.loading import build_runner, inspect_checkpoint
    from mindspeed_mm.inference.pipeline import InternVLPipeline
    from mindspeed_mm.testing.tiny_run import prepare_tiny_run

    root = tmp_path_factory.mktemp("evaluation")
    run = prepare_tiny_run(root / "run", preset="vit300m")
    benches = write_tiny_benchmarks(root / "bench")
    cfg = load_inference_config(write_eval_json(root / "eval.json", run.mm_dir, run.hf_dir), need_requests=False)
    init_distributed()
    info = inspect_checkpoint(cfg.from_pretrained)
    tokenizer = load_tokenizer(cfg.tokenizer, info.spec.img_context_token_id)
    pipeline = InternVLPipeline(build_runner(info, cfg.dtype), tokenizer, cfg, info.spec.text.max_position_embeddings)
    yield {"root": root, "run": run, "benches": benches, "cfg": cfg, "pipeline": pipeline,
           "hf": load_native_model(run.hf_dir)}
    destroy_distributed()


def evaluator(setup, work: str, **kw) -> Evaluator:
    return Evaluator(setup["pipeline"], setup["cfg"], EvalOptions(setup["root"] / work, batch_size=4,
                                                                  progress=False, **kw))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def hf_prediction(setup, prepared) -> str:
    pipe = setup["pipeline"]
    ids = prepared.input_ids[None]
    images = {} if prepared.pixel_values is None else {"pixel_values": prepared.pixel_values}
    with torch.no_grad():
        out = setup["hf"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=setup["cfg"].generation_config.max_new_tokens,
                                   eos_token_id=pipe.stop_ids, pad_token_id=pipe.pad_id, **images)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] in pipe.stop_ids:
        new = new[:-1]
    return pipe.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["MMBench_DEV_EN", "MME", "TextVQA_VAL", "DocVQA_VAL", "ChartQA_TEST",
                                  "MVBench_tiny"])
def test_predictions_equal_transformers_generate(setup, name):
    ev = evaluator(setup, "generated")
    result = ev.evaluate(name, setup["benches"][name])
    preds = read_jsonl(setup["root"] / "generated" / name / "predictions.jsonl")
    bench = load_benchmark(setup["benches"][name], name, image_dir=setup["root"] / "generated" / name / "images")
    assert [p["index"] for p in preds] == [it.index for it in bench.items]  # every item, in file order
    assert result.answered_now == len(bench.items)
    kind = prompts.benchmark_kind(name, ["A", "B"] if bench.items[0].options else [])
    spec, tok, cfg = setup["pipeline"].spec, setup["pipeline"].tokenizer, setup["cfg"]
    for item, pred in zip(bench.items, preds):
        p = prepare_item(item, name, kind, spec, tok, max_tiles=None, num_segments=cfg.num_segments)
        assert pred["prediction"] == hf_prediction(setup, p), f"{name} index {item.index}"
    assert len({p["prediction"] for p in preds}) > 1, "identical outputs would make the comparison weak"


def test_prompts_and_tiles_are_vlmevalkit_s(setup):
    """The items' prompts as VLMEvalKit builds them for InternVL, and the tiles it gives each image."""
    name = "MMBench_DEV_EN"
    item = load_benchmark(setup["benches"][name], name, image_dir=setup["root"] / "p").items[0]
    spec, tok = setup["pipeline"].spec, setup["pipeline"].tokenizer
    p = prepare_item(item, name, "MCQ", spec, tok, max_tiles=None, num_segments=4)
    assert p.request.prompt == ("<image>\nThe picture was taken at NASA.\nWhat is the person wearing?\n"
                                "A. a space suit\nB. a dress\nC. a uniform\nD. nothing\n"
                                "Answer with the option's letter from the given choices directly.")
    assert p.tiles_per_image == [3]  # 112x60: a 2x1 grid within MMBench's 6 tiles, plus the thumbnail
    two = load_benchmark(setup["benches"]["TextVQA_VAL"], "TextVQA_VAL").items[2]
    p = prepare_item(two, "TextVQA_VAL", "VQA", spec, tok, max_tiles=None, num_segments=4)
    assert p.request.prompt.startswith("Image-1: <image>\nImage-2: <image>\nWhich picture has a cat?\n")
    video = load_benchmark(setup["benches"]["MVBench_tiny"], "MVBench_tiny").items[0]
    p = prepare_item(video, "MVBench_tiny", "Video-MCQ", spec, tok, max_tiles=None, num_segments=4)
    assert p.request.prompt.startswith("Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\n")
    assert p.tiles_per_image == [1, 1, 1, 1]


# ------------------------------------------------------------------------------------------------- scores

def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _write_parts(work: Path, name: str, predictions: dict[str, str]) -> None:
    parts = work / name / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "instance-0-of-1.jsonl").write_text("".join(
        json.dumps({"index": i, "prediction": p, "finish_reason": "stop"}) + "\n" for i, p in predictions.items()))


def _wrong(answer: str, letters: str) -> str:
    return next(c for c in letters if c != answer)


def test_scores_equal_hand_counts(setup):
    work = setup["root"] / "scored"
    rows = {n: _rows(p) for n, p in setup["benches"].items()}
    answers = {r["index"]: r["answer"] for r in rows["MMBench_DEV_EN"]}
    # MMBench: question 0 right in all 4 circular copies (in three spellings), question 1 wrong in its copy
    # 1000001, question 2 right in both.
    mm = {}
    for index, answer in answers.items():
        q = int(index) % 1_000_000
        letters = "ABCD"[: {0: 4, 1: 3, 2: 2}[q]]
        mm[index] = {0: f"The answer is ({answer}).", 1: answer, 2: f"{answer}."}[int(index) // 1_000_000 % 3]
        if index == "1000001":
            mm[index] = _wrong(answer, letters)
    _write_parts(work, "MMBench_DEV_EN", mm)
    # MME: image 1 both right, image 2 one right, image 3 both wrong.
    _write_parts(work, "MME", {"0": "Yes", "1": "No", "2": "Yes", "3": "Yes", "4": "No", "5": "Yes"})
    _write_parts(work, "TextVQA_VAL", {"0": "NASA", "1": "single", "2": "the third"})
    _write_parts(work, "DocVQA_VAL", {"0": "astronaut", "1": "Hondo", "2": "tea"})
    _write_parts(work, "ChartQA_TEST", {"0": "43", "1": "14", "2": "2019"})
    _write_parts(work, "MVBench_tiny", {"0": "B", "1": "(A) a horse"})
    ev = evaluator(setup, "scored")
    scores = {n: ev.evaluate(n, p) for n, p in setup["benches"].items()}
    assert all(s.answered_now == 0 for s in scores.values())  # scoring only: every item had an answer

    mmb = scores["MMBench_DEV_EN"].score
    # circular: a question counts if all its copies are right: 2 of 3
    assert mmb["circular"] is True and mmb["count"] == 3 and mmb["overall"] == pytest.approx(200 / 3)
    assert mmb["per_category"] == pytest.approx({"attribute_recognition": 100.0, "object_localization": 0.0})
    plain = evaluator(setup, "scored", circular=False).evaluate("MMBench_DEV_EN", setup["benches"]["MMBench_DEV_EN"])
    assert plain.score["overall"] == pytest.approx(800 / 9)  # 8 of the 9 rows

    mme = scores["MME"].score
    # per category acc + acc+: existence 100 + 100, color 50 + 0, commonsense 0 + 0; perception = existence +
    # color, cognition ("reasoning") = commonsense reasoning
    assert mme["per_category"] == pytest.approx({"existence": 200.0, "color": 50.0, "commonsense_reasoning": 0.0})
    assert mme["perception"] == pytest.approx(250.0) and mme["reasoning"] == 0.0 and mme["overall"] == 250.0

    # VQAv2 accuracy, mean over the 10 leave-one-out subsets of min(1, matches / 3): "nasa" has 3 matches:
    # (3 x 2/3 + 7 x 1) / 10 = 0.9; "single" 2 of 10: (2 x 1/3 + 8 x 2/3) / 10 = 0.6; "the third" 0 (the
    # article goes, "third" matches nothing). (Number words become digits: "one" would match all eight "1"s.)
    tv = scores["TextVQA_VAL"].score
    assert tv["overall"] == pytest.approx(50.0) and tv["metric"] == "vqa_acc"
    # ANLS: 1 - edit distance / longer length, 0 below 0.5: "astronaut" 1, "Hondo" 1 - 1/5 = 0.8, "tea" 0
    assert scores["DocVQA_VAL"].score["overall"] == pytest.approx(60.0)
    # relaxed accuracy (5%): 43 vs 42 right, 14 vs 12.5 wrong, 2019 right
    chart = scores["ChartQA_TEST"].score
    assert chart["overall"] == pytest.approx(200 / 3)
    assert chart["per_category"] == pytest.approx({"human": 100.0, "augmented": 0.0})
    # video multiple choice, not circular: "B" right, "(A) a horse" wrong
    assert scores["MVBench_tiny"].score["overall"] == pytest.approx(50.0)

    preds = read_jsonl(work / "ChartQA_TEST" / "predictions.jsonl")
    assert [(p["index"], p["prediction"], p["correct"]) for p in preds] == [("0", "43", 1.0), ("1", "14", 0.0),
                                                                             ("2", "2019", 1.0)]
    mcq = {p["index"]: p for p in read_jsonl(work / "MMBench_DEV_EN" / "predictions.jsonl")}
    assert mcq["0"]["extracted"] == answers["0"] and mcq["1000001"]["correct"] is False


def test_bad_rows_are_counted_skips(setup):
    bad = corrupt_copies(setup["benches"]["MMBench_DEV_EN"], setup["root"] / "bad")
    r = evaluator(setup, "bad").evaluate("MMBench_DEV_EN", bad["bad_rows"])
    # question 0's picture is not base64, so its four copies go; one copy of question 1 answers "F"
    assert r.score["skipped"] == {"answer_not_an_option": 1, "bad_image": 4}
    assert r.score["items"] == 4 and r.answered_now == 4
    assert not math.isnan(r.score["overall"])


def test_vlmevalkit_adapter_answers_as_the_runner(setup):
    from mindspeed_mm.evaluation.vlmeval_model import MindSpeedInternVL

    name = "MMBench_DEV_EN"
    model = MindSpeedInternVL.from_pipeline(setup["pipeline"], setup["cfg"])
    assert model.use_custom_prompt(name) and model.use_custom_prompt("DocVQA_VAL")
    bench = load_benchmark(setup["benches"][name], name, image_dir=setup["root"] / "adapter")
    preds = {p["index"]: p["prediction"]
             for p in read_jsonl(setup["root"] / "generated" / name / "predictions.jsonl")}
    tsv = {r["index"]: r for r in _rows(setup["benches"][name])}
    for item in bench.items[:3]:
        line = dict(tsv[item.index])
        model.set_dump_image(lambda _line, images=item.images: list(images))
        message = model.build_prompt(line, name)
        assert model.generate(message, name) == preds[item.index]
