"""VLMEvalKit's prompts and scoring rules, on worked examples.

VLMEvalKit (the ms-vlmeval / nvidia-vlmeval wheels) imports offline on CPU but drags in ~7 GB (a CUDA torch,
openai, sentence-transformers, ...) and ~10 s of import, so it is no test dependency: each expected value
below is derived by hand from its rule, written beside it. They were also checked once against
vlmeval's own can_infer, YOrN_Extraction, MME_rating, process_line/hit_calculate and InternVL prompt
builders.
"""
from __future__ import annotations

import math

import pytest

from mindspeed_mm.evaluation import prompts, scoring
from mindspeed_mm.evaluation.prompts import MCQ, VIDEO_MCQ, VIDEO_VQA, VQA, YORN

OPTS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


# ------------------------------------------------------------------------------------------ MCQ choice

@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"),                                # a lone letter
    ("The answer is (C) cat", "C"),            # "(C)" splits to the word C, 2nd of the last 4 words
    ("B. cat", "B"),
    ("cat", "B"),                              # no letter: the one option text inside the prediction
    ("I think it is a Bird.", "C"),            # "a" is lower case, not the letter A; text match "bird"
    ("A or B", None),                          # two letters; no option text inside either
    ("dog or cat", None),                      # two option texts match
    ("C is right, as the picture shows a small bird", None),  # C is the 1st of 10 words: not the last 4
    ("Z", None),                               # VLMEvalKit's "no option" answer
    ("Cannot determine the answer", None),     # a refusal: "Z"
    ("", None),
])
def test_extract_choice(prediction, expected):
    assert scoring.extract_choice(prediction, OPTS) == expected


def test_extract_choice_text_match_is_bounded_by_the_option_lengths():
    # can_infer_text: a prediction longer than twice the options' total length (5 letters here) is rejected
    assert scoring.extract_choice("well, yes", {"A": "no", "B": "yes"}) == "B"               # 9 <= 10
    assert scoring.extract_choice("well, I'd say yes", {"A": "no", "B": "yes"}) is None      # 17 > 10


def test_extract_choice_ignores_empty_option_cells():
    # an empty TSV cell is NaN in VLMEvalKit and dropped; kept, "" would be inside every prediction
    assert scoring.extract_choice("cat", {"A": "dog", "B": "cat", "C": "", "D": None}) == "B"


def _mcq(index, answer, prediction, category="cat1"):
    return {"index": index, "answer": answer, "prediction": prediction, "category": category, "options": OPTS}


def test_score_mcq_vanilla_per_category():
    recs = [_mcq(1, "A", "A"), _mcq(2, "B", "C"), _mcq(3, "C", "bird", "cat2"), _mcq(4, "D", "A or B", "cat2")]
    out = scoring.score(MCQ, None, recs, dataset_name="SEEDBench_IMG")
    assert out["overall"] == pytest.approx(50.0)                 # 2 of 4 right
    assert out["per_category"] == {"cat1": pytest.approx(50.0), "cat2": pytest.approx(50.0)}
    assert out["count"] == 4 and out["circular"] is False


def test_score_mcq_circular_groups():
    # index % 1e6 groups the rotated variants with their original (index == group); a group counts once,
    # under its original's category, and only if every variant is right
    recs = [
        _mcq(7, "A", "A", "x"), _mcq(1_000_007, "B", "B", "?"), _mcq(2_000_007, "C", "C", "?"),  # all right
        _mcq(8, "B", "B", "x"), _mcq(1_000_008, "C", "D", "?"),                                  # one wrong
        _mcq(9, "A", "A", "y"), _mcq(1_000_009, "D", "A or B", "?"),                             # undecided
        _mcq(2_000_010, "A", "A", "y"),                                                          # no original
    ]
    out = scoring.score(MCQ, None, recs, dataset_name="MMBench_DEV_EN")
    assert out["circular"] is True
    assert out["count"] == 3 and out["items"] == 8
    assert out["overall"] == pytest.approx(100 / 3)
    assert out["per_category"] == {"x": pytest.approx(50.0), "y": pytest.approx(0.0)}
    # the same records vanilla: 6 of 8 right
    assert scoring.score(MCQ, None, recs, circular=False)["overall"] == pytest.approx(75.0)


def test_circular_is_chosen_by_name():
    assert prompts.uses_circular_eval("MMBench_DEV_CN_V11")
    assert prompts.uses_circular_eval("CCBench")
    assert prompts.uses_circular_eval("BLINK_circular")
    assert not prompts.uses_circular_eval("SEEDBench_IMG")


# ------------------------------------------------------------------------------------------------ Y/N

@pytest.mark.parametrize("prediction, expected", [
    ("Yes", "Yes"), ("no.", "No"), ("Yes, there is a dog.", "Yes"),
    ("Yes and no", "Unknown"),        # both words
    ("Nope", "Unknown"),              # neither word
    ("No!", "No"),                    # "!" without a space beside it becomes a space
])
def test_extract_yes_no(prediction, expected):
    assert scoring.extract_yes_no(prediction) == expected


def _mme(index, cat, image, answer, prediction):
    return {"index": index, "category": cat, "image_path": image, "answer": answer, "prediction": prediction}


def test_mme_score_acc_plus_and_sums():
    recs = [
        # existence: 2 images, 3 of 4 questions right (acc 75), 1 image with both right (acc+ 50) -> 125
        _mme(0, "existence", "e/1.jpg", "Yes", "Yes"), _mme(1, "existence", "e/1.jpg", "No", "No"),
        _mme(2, "existence", "e/2.jpg", "Yes", "Yes"), _mme(3, "existence", "e/2.jpg", "No", "Yes"),
        # count: 1 image, both right -> 100 + 100
        _mme(4, "count", "c/1.jpg", "Yes", "yes"), _mme(5, "count", "c/1.jpg", "No", "No, there are two."),
        # code_reasoning (cognition): 1 image, 1 of 2 right ("Unknown" is wrong) -> 50 + 0
        _mme(6, "code_reasoning", "r/1.png", "Yes", "Yes"), _mme(7, "code_reasoning", "r/1.png", "No", "Hmm"),
    ]
    out = scoring.score(YORN, None, recs, dataset_name="MME")
    assert out["per_category"] == {"code_reasoning": pytest.approx(50.0), "count": pytest.approx(200.0),
                                   "existence": pytest.approx(125.0)}
    assert out["per_category_acc_plus"]["existence"] == pytest.approx(50.0)
    assert out["perception"] == pytest.approx(325.0)
    assert out["reasoning"] == pytest.approx(50.0)
    assert out["overall"] == pytest.approx(375.0)


def test_mme_needs_image_path():
    with pytest.raises(ValueError, match="image_path"):
        scoring.score(YORN, None, [{"index": 0, "category": "count", "answer": "Yes", "prediction": "Yes"}],
                      dataset_name="MME")


def test_other_yorn_is_accuracy():
    recs = [{"index": i, "category": c, "answer": a, "prediction": p} for i, (c, a, p) in enumerate(
        [("adv", "Yes", "Yes"), ("adv", "No", "Yes"), ("pop", "No", "no"), ("pop", "Yes", "maybe")])]
    out = scoring.score(YORN, None, recs, dataset_name="POPE")
    assert out["overall"] == pytest.approx(50.0)
    assert out["per_category"] == {"adv": pytest.approx(50.0), "pop": pytest.approx(50.0)}


# ------------------------------------------------------------------------------------------------ VQA

def test_vqa_normalisation():
    # punctuation, lower case, number words, articles, contractions (VQAv2's process_answer)
    assert scoring.normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert scoring.normalize_vqa_answer("dont know.") == "don't know"
    assert scoring.normalize_vqa_answer("1,000") == "1000"          # a digit comma deletes every mark
    assert scoring.normalize_vqa_answer("red-blue") == "red blue"   # "-" without a space: a space
    assert scoring.normalize_vqa_answer("3.5") == "3.5"             # a period between digits stays


def test_vqa_accuracy_leave_one_out():
    ten = ["cat", "cat"] + ["dog"] * 8
    # 2 answers match: the 2 subsets without one of them hold 1 match (1/3), the 8 others 2 (2/3):
    # (2/3 + 16/3) / 10 = 0.6
    assert scoring.vqa_accuracy("Cat.", ten) == pytest.approx(0.6)
    # 8 match: every subset holds >= 7 matches -> 1
    assert scoring.vqa_accuracy("a dog", ten) == pytest.approx(1.0)
    # 3 match: 3 subsets hold 2 (2/3), 7 hold 3 (1): (2 + 7) / 10 = 0.9
    assert scoring.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert scoring.vqa_accuracy("fish", ten) == 0.0
    # one reference answer: exact match after normalisation (our guard; VLMEvalKit's leave-one-out gives 0)
    assert scoring.vqa_accuracy("Two", ["2"]) == 1.0


def test_anls():
    # distance over the longer raw length; similarity below 0.5 counts 0
    assert scoring.anls("Hello  World", ["hello world"]) == 1.0                        # case, spaces
    assert scoring.anls("Hello World!", ["hello  world"]) == pytest.approx(1 - 1 / 12)  # 1 edit, raw len 12
    assert scoring.anls("1995", ["1996"]) == pytest.approx(0.75)                       # 1 edit in 4
    assert scoring.anls("ab", ["abcd"]) == pytest.approx(0.5)                          # exactly 0.5 stays
    assert scoring.anls("a", ["abcd"]) == 0.0                                          # 0.25 < 0.5
    assert scoring.anls("london", ["Paris", "London"]) == pytest.approx(1.0)           # best answer counts


def test_relaxed_accuracy():
    assert scoring.relaxed_accuracy("104", ["100"]) == 1.0     # 4% off
    assert scoring.relaxed_accuracy("106", ["100"]) == 0.0     # 6% off
    assert scoring.relaxed_accuracy("95", ["100"]) == 1.0      # exactly 5%
    assert scoring.relaxed_accuracy("12%", ["0.12"]) == 1.0    # a percentage reads as a fraction
    assert scoring.relaxed_accuracy("0.0", ["0"]) == 0.0       # zero target: string match, "0.0" != "0"
    assert scoring.relaxed_accuracy(" Yes ", ["yes"]) == 1.0   # non-numeric: stripped, case-folded
    assert scoring.relaxed_accuracy("no", ["yes", "No"]) == 1.0


def test_answers_come_as_list_literals():
    assert scoring.parse_answers("['2', 'two']") == ["2", "two"]
    assert scoring.parse_answers('["a", "b"]') == ["a", "b"]
    assert scoring.parse_answers("[not a list") == ["[not a list"]
    assert scoring.parse_answers("Paris") == ["Paris"]
    assert scoring.parse_answers(["x", 3]) == ["x", "3"]


def test_score_vqa_and_judge():
    recs = [
        {"index": 0, "category": "ocr", "answer": str(["cat", "cat"] + ["dog"] * 8), "prediction": "cat"},
        {"index": 1, "category": "ocr", "answer": str(["dog"] * 10), "prediction": "dog"},
        {"index": 2, "category": None, "answer": str(["x"] * 10), "prediction": "y"},
    ]
    out = scoring.score(VQA, "vqa_acc", recs)
    assert out["overall"] == pytest.approx((0.6 + 1 + 0) / 3 * 100)
    assert out["per_category"] == {"ocr": pytest.approx(80.0)}
    assert out["count"] == 3
    assert scoring.judge(VQA, "vqa_acc", {**recs[0], "prediction": "The Cat."}) == ("cat", pytest.approx(0.6))
    assert scoring.judge(VQA, "anls", {"answer": "['1995']", "prediction": " 1996 "}) == (
        "1996", pytest.approx(1 - 1 / 6))  # raw length 6 (" 1996 "), 1 edit
    assert scoring.judge(MCQ, None, _mcq(0, "C", "(C)")) == ("C", True)
    assert scoring.judge(YORN, None, {"answer": "No", "prediction": "Yes"}) == ("Yes", False)


def test_score_uses_judged_records():
    # the runner stores extracted/correct per item; scoring them again must not re-judge
    recs = [{**_mcq(0, "A", "garbage"), "extracted": "A"}, {**_mcq(1, "B", "B"), "extracted": None}]
    assert scoring.score(MCQ, None, recs)["overall"] == pytest.approx(50.0)
    assert math.isnan(scoring.score(VQA, "anls", [])["overall"])


# -------------------------------------------------------------------------------------------- kinds

@pytest.mark.parametrize("name, kind", [
    ("MMBench_DEV_EN", MCQ), ("MMBench_TEST_CN_V11", MCQ), ("CCBench", MCQ), ("MMStar", MCQ),
    ("SEEDBench_IMG", MCQ), ("AI2D_TEST", MCQ), ("MMMU_DEV_VAL", MCQ), ("MME-RealWorld", MCQ),
    ("MME", YORN), ("HallusionBench", YORN), ("POPE", YORN),
    ("DocVQA_VAL", VQA), ("InfoVQA_TEST", VQA), ("ChartQA_TEST", VQA), ("TextVQA_VAL", VQA),
    ("OCRVQA_TESTCORE", VQA), ("GQA_TestDev_Balanced", VQA), ("VQAv2_VAL", VQA), ("OCRBench", VQA),
    ("Video-MME", VIDEO_MCQ), ("MVBench", VIDEO_MCQ), ("MMBench-Video", VIDEO_VQA),
])
def test_benchmark_kind_by_name(name, kind):
    assert prompts.benchmark_kind(name, ()) == kind


def test_benchmark_kind_of_an_unknown_name_from_its_columns():
    assert prompts.benchmark_kind("my_bench", ["index", "question", "A", "B", "answer"]) == MCQ
    assert prompts.benchmark_kind("my_bench", ["index", "question", "answer"]) == VQA
    assert prompts.benchmark_kind("my_video_bench", ["video", "question", "A", "B"]) == VIDEO_MCQ
    assert prompts.benchmark_kind("my_openended_set", ["A", "B"]) == VQA  # VLMEvalKit's "openended" rule


def test_vqa_metric():
    assert prompts.vqa_metric("DocVQA_VAL") == "anls"
    assert prompts.vqa_metric("InfoVQA_VAL") == "anls"
    assert prompts.vqa_metric("ChartQA_TEST") == "relaxed_acc"
    assert prompts.vqa_metric("TextVQA_VAL") == "vqa_acc"
    assert prompts.vqa_metric("VQAv2_VAL") == "vqa_acc"
    assert prompts.vqa_metric("OCRVQA_TEST") == "exact_match"
    assert prompts.vqa_metric("anything") == "vqa_acc"


# ------------------------------------------------------------------------------------------- prompts

def test_mmbench_prompt_with_hint_and_options():
    # build_multi_choice_prompt: hint line, question, "X. text" lines, the letter instruction; one image
    # goes first as "<image>\n" (reorganize_prompt)
    got = prompts.build_prompt("MMBench_DEV_EN", MCQ, "What animal is shown?", {"A": "dog", "B": "cat"},
                               hint="Look at the animal.", n_images=1)
    assert got == ("<image>\nLook at the animal.\nWhat animal is shown?\nA. dog\nB. cat\n"
                   "Answer with the option's letter from the given choices directly.")


def test_chinese_mcq_prompt():
    got = prompts.build_prompt("MMBench_DEV_CN", MCQ, "图中是什么动物?", {"A": "狗", "B": "猫"}, None, 1)
    assert got == "<image>\n图中是什么动物?\nA. 狗\nB. 猫\n请直接回答选项字母。"
    # no options: the direct-answer instruction
    assert prompts.build_prompt("X", MCQ, "Why?", {}, None, 0) == "Why?\nAnswer the question directly."


def test_mme_docvqa_chartqa_prompts():
    assert prompts.build_prompt("MME", YORN, "Is there a dog in the image? Please answer yes or no.", {},
                                None, 1) == ("<image>\nIs there a dog in the image? Please answer yes or no."
                                             " Answer the question using a single word or phrase.")
    assert prompts.build_prompt("HallusionBench", YORN, "Is it red?", {}, None, 1) == (
        "<image>\nIs it red? Please answer yes or no. Answer the question using a single word or phrase.")
    assert prompts.build_prompt("DocVQA_VAL", VQA, "What is the date?", {}, None, 1) == (
        "<image>\nWhat is the date?\nAnswer the question using a single word or phrase.")
    assert prompts.build_prompt("ChartQA_TEST", VQA, "What is the peak value?", {}, None, 1) == (
        "<image>\nWhat is the peak value?\nAnswer the question using a single word or phrase.")
    assert prompts.build_prompt("MathVista_MINI", VQA, "Solve it.", {}, None, 1) == "<image>\nSolve it."


def test_multi_image_and_video_prompts():
    # several images: "Image-i: <image>\n" lines, then the text
    got = prompts.build_prompt("MMMU_DEV_VAL", MCQ, "Which image is brighter?", {"A": "first", "B": "second"},
                               None, n_images=2)
    assert got == ("Image-1: <image>\nImage-2: <image>\nWhich image is brighter?\nA. first\nB. second\n"
                   "Answer with the option's letter from the given choices directly.")
    # video frames: build_video_prompt renames Image-i to Frame-i
    got = prompts.build_prompt("Video-MME", VIDEO_MCQ, "What happens?", {"A": "x", "B": "y"}, None,
                               n_images=0, n_frames=3)
    assert got == ("Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?\nA. x\nB. y\n"
                   "Answer with the option's letter from the given choices directly.")
    assert prompts.build_prompt("my_video", VIDEO_VQA, "Describe.", None, None, 0, 1) == "<image>\nDescribe."
    assert prompts.build_prompt("X", VQA, "Text only?", {}, None, 0) == (
        "Text only?\nAnswer the question using a single word or phrase.")


def test_max_tiles_and_generation():
    assert prompts.max_tiles("MMBench_DEV_EN") == 6
    assert prompts.max_tiles("ChartQA_TEST") == 12
    assert prompts.max_tiles("DocVQA_VAL") == 18
    assert prompts.max_tiles("InfoVQA_TEST") == 24
    assert prompts.max_tiles("OCRBench") == 24
    assert prompts.max_tiles("Video-MME") == 1
    assert prompts.max_tiles(None) == 6
    assert prompts.max_tiles("DocVQA_VAL", n_images=8) == 8      # 64 tiles shared: min(18, 64 // 8)
    assert prompts.max_tiles("MMBench", n_images=100) == 1       # at least one each
    assert prompts.generation_kwargs("MMBench_DEV_EN") == {"do_sample": False, "max_new_tokens": 4096}
