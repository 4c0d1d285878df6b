"""VLMEvalKit's InternVL prompts: what its `InternVLChat` wrapper (version V2.0, the one VLMEvalKit's config
uses for InternVL3) sends as the user text for a benchmark item, how many tiles an image gets, and the
generation settings.

The rules follow VLMEvalKit's `vlmeval/vlm/internvl/internvl_chat.py` and `utils.py` (build_prompt,
build_multi_choice_prompt, reorganize_prompt, build_video_prompt, set_max_num) and the dataset-type tables
of `vlmeval/dataset/`. VLMEvalKit itself is not imported: it pulls in several GB of dependencies.

Not reproduced: chain-of-thought prompts (USE_COT=1), the MPO prompt, GUI benchmarks, MUIRBench's inline
image references, and the per-dataset text templates of video benchmarks (Video-MME's frame preamble and
so on): a video item's question is used as the TSV writes it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

MCQ = "MCQ"
YORN = "Y/N"
VQA = "VQA"
VIDEO_MCQ = "Video-MCQ"
VIDEO_VQA = "Video-VQA"
KINDS = (MCQ, YORN, VQA, VIDEO_MCQ, VIDEO_VQA)

VQA_METRICS = ("vqa_acc", "anls", "relaxed_acc", "exact_match")

# VLMEvalKit decides a dataset's type by exact membership in a dataset class's table; ours match by family
# prefix so that a split VLMEvalKit added later (MMBench_DEV_EN_V12, ...) still lands in its family.
# Video families come first: "MMBench-Video" and "Video-MME" would otherwise match MMBench and MME.
_VIDEO_FAMILIES = (
    ("MMBench-Video", VIDEO_VQA),
    ("Video-MME", VIDEO_MCQ),
    ("Video_MME", VIDEO_MCQ),
    ("MVBench", VIDEO_MCQ),
    ("MLVU", VIDEO_MCQ),
    ("LongVideoBench", VIDEO_MCQ),
    ("TempCompass", VIDEO_MCQ),
    ("Video-Holmes", VIDEO_MCQ),
    ("WorldSense", VIDEO_MCQ),
    ("VideoMMLU", VIDEO_VQA),
)
# ImageYORNDataset's names, exactly: "MME-RealWorld" is a multiple-choice benchmark, not MME.
_YORN_NAMES = ("MME", "HallusionBench", "POPE", "AMBER", "VSR-zeroshot")
_MCQ_FAMILIES = (
    "MMBench", "MMMB", "CCBench", "SEEDBench", "ScienceQA", "MMT-Bench", "AesBench", "Q-Bench1", "A-Bench",
    "R-Bench", "AI2D", "MMStar", "RealWorldQA", "MLLMGuard", "BLINK", "TaskMeAnything", "A-OKVQA",
    "WorldMedQA", "VisOnlyQA", "MMCR", "MMSci_DEV_MCQ", "MMVP", "K-DTCBench", "VStarBench", "PathMMU",
    "CMMU_MCQ", "MicroVQA", "MMSIBench", "SpatialEval", "StaticEmbodiedBench", "MMMU", "MME-RealWorld",
    "HRBench", "CV-Bench", "MUIRBench",
)
_VQA_FAMILIES = (
    "OCRVQA", "TextVQA", "DocVQA", "InfoVQA", "ChartQA", "GQA", "VQAv2", "OKVQA", "VizWiz", "OCRBench",
    "MathVista", "MathVision", "MathVerse", "LLaVABench", "MMVet", "DynaMath", "LogicVista", "WeMath",
    "CRPE", "MTVQA", "DUDE", "SLIDEVQA", "MMLongBench_DOC", "QSpatial", "WildVision", "MIA-Bench",
)

_CJK = re.compile("[\u4e00-\u9fff]")

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
LETTER_PROMPT_CN = "请直接回答选项字母。"
DIRECT_PROMPT = "Answer the question directly."
DIRECT_PROMPT_CN = "请直接回答问题。"
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def has_chinese(text: str) -> bool:
    """VLMEvalKit's cn_string: any CJK unified ideograph switches the MCQ suffix to Chinese."""
    return bool(_CJK.search(text))


def _has(names: Iterable[str], dataset_name: str) -> bool:
    # VLMEvalKit's listinstr: substring, case-sensitive
    return any(n in dataset_name for n in names)


def benchmark_kind(dataset_name: str, columns: Iterable[str] = ()) -> str:
    """"MCQ", "Y/N", "VQA", "Video-MCQ" or "Video-VQA", as VLMEvalKit's DATASET_TYPE types the dataset.

    An unknown name is typed from its TSV columns: option columns A and B make it multiple choice, anything
    else open-ended (VLMEvalKit would default an unknown name to MCQ unless it says "openended"; the columns
    are the better witness for a TSV we did not name).
    """
    name = dataset_name or ""
    for family, kind in _VIDEO_FAMILIES:
        if name.startswith(family):
            return kind
    if name in _YORN_NAMES:
        return YORN
    if any(name.startswith(f) for f in _MCQ_FAMILIES):
        return MCQ
    if any(name.startswith(f) for f in _VQA_FAMILIES):
        return VQA
    if "openended" in name.lower():
        return VQA
    cols = set(columns)
    video = "video" in name.lower() or "video" in cols
    if {"A", "B"} <= cols:
        return VIDEO_MCQ if video else MCQ
    return VIDEO_VQA if video else VQA


def is_video(kind: str) -> bool:
    return kind in (VIDEO_MCQ, VIDEO_VQA)


def vqa_metric(dataset_name: str) -> str:
    """The per-item score ImageVQADataset.evaluate picks for an open-ended benchmark.

    DocVQA and InfoVQA: ANLS; ChartQA: relaxed accuracy; OCRVQA and GQA: case-insensitive exact match;
    TextVQA and everything else: VQAv2's accuracy against its (usually ten) human answers.
    """
    name = dataset_name or ""
    if _has(["TextVQA"], name):
        return "vqa_acc"
    if _has(["ChartQA"], name):
        return "relaxed_acc"
    if _has(["OCRVQA", "GQA"], name):
        return "exact_match"
    if _has(["DocVQA", "InfoVQA"], name):
        return "anls"
    return "vqa_acc"


def question_text(dataset_name: str, kind: str, question: str, options: Mapping[str, str] | None = None,
                  hint: str | None = None) -> str:
    """The text part of the prompt, before any image placeholder (InternVLChat.build_prompt)."""
    name = dataset_name or ""
    if kind == YORN:
        if _has(["MME"], name):
            return f"{question} {SHORT_ANSWER}"
        if _has(["HallusionBench", "AMBER"], name):
            return f"{question} {YES_NO} {SHORT_ANSWER}"
        return question
    if kind in (MCQ, VIDEO_MCQ):
        return multi_choice_text(question, options or {}, hint)
    if kind == VQA:
        if _has(["LLaVABench", "WildVision"], name):
            return f"{question}\nAnswer this question in detail."
        if _has(["MathVerse"], name):
            return question.replace("please directly answer the question and", "please")
        # math and free-form benchmarks are scored by a judge on the full answer: no length instruction
        if _has(["MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MMDU", "CRPE", "MIA-Bench", "MM-Math",
                 "DynaMath", "QSpatial", "WeMath", "LogicVista", "MM-IFEval", "ChartMimic", "MMReason"], name):
            return question
        return f"{question}\n{SHORT_ANSWER}"
    return question


def multi_choice_text(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """build_multi_choice_prompt: the hint line, the question, one "X. text" line per option, the suffix.

    The suffix is Chinese when anything in the text so far (hint, question or options) is.
    """
    text = f"{hint}\n{question}" if _present(hint) else question
    opts = clean_options(options)
    for letter, value in opts.items():
        text += f"\n{letter}. {value}"
    if opts:
        return text + "\n" + (LETTER_PROMPT_CN if has_chinese(text) else LETTER_PROMPT)
    return text + "\n" + (DIRECT_PROMPT_CN if has_chinese(text) else DIRECT_PROMPT)


def clean_options(options: Mapping[str, object] | None) -> dict[str, str]:
    """The options a TSV row really has, in letter order.

    pandas reads an empty TSV cell as NaN and VLMEvalKit drops those; None and "" are the same absence here.
    """
    out = {}
    for letter in sorted(options or {}):
        value = options[letter]
        if not _present(value):
            continue
        out[letter] = str(value)
    return out


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def image_placeholders(n_images: int, label: str = "Image") -> str:
    """reorganize_prompt's image block: "<image>\\n" for one image; "Image-1: <image>\\n" ... for several.

    Videos are frames with the label "Frame" (build_video_prompt renames Image-i to Frame-i).
    """
    if n_images <= 0:
        return ""
    if n_images == 1:
        return "<image>\n"
    return "".join(f"{label}-{i}: <image>\n" for i in range(1, n_images + 1))


def build_prompt(dataset_name: str, kind: str, question: str, options: Mapping[str, str] | None = None,
                 hint: str | None = None, n_images: int = 1, n_frames: int = 0) -> str:
    """The full user text the wrapper hands to InternVL's chat template, `<image>` placeholders included.

    Images come first, then the text: the wrapper puts the text message before the images and
    reorganize_prompt moves every placeholder to the front. A video's frames take the images' place
    (`n_frames` > 0 wins over `n_images`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; expected one of {', '.join(KINDS)}")
    text = question_text(dataset_name, kind, question, options, hint)
    if n_frames > 0:
        return image_placeholders(n_frames, "Frame") + _video_suffix(dataset_name, text)
    return image_placeholders(n_images) + text


def _video_suffix(dataset_name: str, text: str) -> str:
    # build_video_prompt's dataset rules; our MCQ text already ends with the letter prompt, so only the
    # "Answer:" cue VLMEvalKit strips needs removing.
    name = dataset_name or ""
    if _has(["MMBench-Video", "Video-MME", "WorldSense"], name):
        text = text.replace("\nAnswer:", "")
    elif _has(["MVBench"], name):
        text = text.replace("Best option:(", "")
    return text


# set_max_num's tables: dense documents and charts get more tiles per image.
_TILES_12 = ("ChartQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST", "MME-RealWorld", "VCR_EN", "VCR_ZH", "OCRVQA", "BMMR")
_TILES_18 = ("DocVQA_VAL", "DocVQA_TEST", "DUDE", "MMLongBench_DOC", "SLIDEVQA")
_TILES_24 = ("InfoVQA_VAL", "InfoVQA_TEST", "OCRBench", "HRBench4K", "HRBench8K")
TOTAL_MAX_TILES = 64  # the wrapper's cap on all tiles of one item, against out-of-memory


def max_tiles(dataset_name: str | None, n_images: int = 1, kind: str | None = None) -> int:
    """Tiles per image (thumbnail excluded) for a dataset, as set_max_num and generate_v2 choose them.

    Video frames get one tile each; several images share a total of 64 tiles, at least one each.
    """
    if dataset_name is None:
        per_image = 6
    else:
        kind = kind or benchmark_kind(dataset_name)
        if is_video(kind) or "video" in dataset_name.lower():
            per_image = 1
        elif _has(_TILES_12, dataset_name):
            per_image = 12
        elif _has(_TILES_18, dataset_name):
            per_image = 18
        elif _has(_TILES_24, dataset_name):
            per_image = 24
        else:
            per_image = 6
    return max(1, min(per_image, TOTAL_MAX_TILES // max(1, n_images)))


def generation_kwargs(dataset_name: str | None = None) -> dict:
    """The wrapper's generation config: greedy, up to 4096 new tokens (8196 for BMMR).

    generate_v2 also sets temperature 0.6 and top_p 0.95, which do nothing while do_sample is False.
    """
    max_new = 4096
    if dataset_name and _has(["BMMR"], dataset_name):
        max_new = 8196
    return {"do_sample": False, "max_new_tokens": max_new}


def uses_circular_eval(dataset_name: str) -> bool:
    """MMBench-style circular evaluation: VLMEvalKit's test on the lower-cased name."""
    return _has(["mmbench", "ccbench", "circular", "mmcr"], (dataset_name or "").lower())
