"""VLMEvalKit's scoring rules, without a judge model: answer extraction and per-benchmark scores.

Pure functions on plain records (dicts), no torch or pandas. Each record has `index`, `prediction`,
`answer` and `category` (may be None); MCQ records also `options` ({letter: text}), MME records
`image_path` (MME's TSV column, which pairs the two questions of an image).

Scale: per-item scores are 0..1 (a bool for MCQ and Y/N); every aggregate (`overall`, `per_category`) is a
percentage, 0..100, as VLMEvalKit prints its VQA, Y/N and MME tables. (Its MCQ table keeps fractions;
multiply by 100 to compare.)

The rules follow VLMEvalKit's `vlmeval/utils/matching_util.py` (can_infer), `vlmeval/dataset/utils/`
(`multiple_choice.py`, `yorn.py`, `vqa_eval.py`) and the `evaluate` methods of its image MCQ, Y/N and VQA
datasets, under its `exact_matching` judge setting.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from .benchmark import cell_list
from .prompts import MCQ, VIDEO_MCQ, VIDEO_VQA, VQA, VQA_METRICS, YORN, clean_options, uses_circular_eval

# ------------------------------------------------------------------------------------------------- MCQ

# Refusals VLMEvalKit maps to its "Z" (no option) before looking for letters.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_LETTER_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}\s]+")


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text prediction names, or None where exact matching cannot decide.

    VLMEvalKit's can_infer: first a letter, then an option's text.
    - letter: split the prediction into words at whitespace and `.()[],:;!*#{}`; exactly one of the option
      letters must occur as a word, and among the last four words (so "A" in "A cat sits on the mat" is an
      article, not a choice); two letters ("A or B") name none;
    - text: failing that, exactly one option's text (lower-cased) must be a substring of the lower-cased
      prediction, and the prediction no longer than twice all option texts together.
    A refusal, or a "Z" with no option letter, is VLMEvalKit's "Z" (no text matching follows): None here,
    like an undecided prediction; both score wrong.

    (The last-four-words and length rules are current VLMEvalKit's, as in ms-vlmeval 0.0.20; the older copy in
    nvidia-vlmeval 26.3 has neither.)

    VLMEvalKit would then ask a judge model (ChatGPT) to map an undecided prediction to an option, and
    finally pick one at random; neither is done here, so an undecided prediction is simply wrong.
    """
    text = "" if prediction is None else str(prediction)
    opts = clean_options(options)
    letter = _choice_by_letter(text, opts)
    if letter == "Z":
        return None
    return letter or _choice_by_text(text, opts)


def _choice_by_letter(text: str, opts: Mapping[str, str]) -> str | None:
    if "Failed to obtain answer via API" in text:
        return None
    if any(r in text for r in _REFUSALS):
        return "Z"
    words = [w for w in _LETTER_SEPARATORS.split(text) if w]
    named = [letter for letter in opts if letter in words]
    if len(named) == 1:
        return named[0] if words.index(named[0]) > len(words) - 5 else None
    if not named and "Z" in words:
        return "Z"
    return None


def _choice_by_text(text: str, opts: Mapping[str, str]) -> str | None:
    lowered = text.lower()
    if not opts or len(lowered) > 2 * sum(len(v) for v in opts.values()):
        return None
    hits = [letter for letter, value in opts.items() if value.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def circular_group(index) -> int:
    """MMBench's circular variants share `index % 1e6` (the variant with index == group is the original)."""
    return int(int(index) % 1_000_000)


def score_mcq(records: list[dict], circular: bool = False) -> dict:
    """Accuracy (%) overall, per `category` and per `l2-category` (where records carry one).

    Circular (MMBench, CCBench, ...): a question counts once, under its original's category, and only if
    every variant present (same circular_group) is answered correctly; groups whose original is missing are
    left out, as VLMEvalKit does.
    """
    hits: list[tuple[dict, bool]] = []
    if circular:
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in records:
            groups[circular_group(r["index"])].append(r)
        for g, members in sorted(groups.items()):
            main = next((r for r in members if int(r["index"]) == g), None)
            if main is None:
                continue
            hits.append((main, all(_mcq_correct(r) for r in members)))
    else:
        hits = [(r, _mcq_correct(r)) for r in records]
    out = _aggregate([(r, float(h)) for r, h in hits])
    out["items"] = len(records)
    out["circular"] = circular
    return out


def _mcq_correct(record: dict) -> bool:
    choice = record.get("extracted") if "extracted" in record else extract_choice(
        record.get("prediction"), record.get("options") or {})
    return choice is not None and choice == str(record["answer"]).strip()


# ------------------------------------------------------------------------------------------------- Y/N

# VQAv2's punctuation rule (VLMEvalKit's process_punctuation), shared with the yes/no extraction.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """A mark next to a space (or anywhere, once the text has a "1,000"-style number) is deleted, otherwise
    it becomes a space; periods not between digits go.

    VLMEvalKit passes re.UNICODE where re.sub takes its count, so at most 32 periods are removed; kept.
    """
    out = text
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _LONE_PERIOD.sub("", out, count=32)


def extract_yes_no(prediction: str) -> str:
    """"Yes", "No" or "Unknown": YOrN_Extraction, on the lower-cased words after strip_punctuation.

    Exactly one of the words "yes" and "no" must occur. VLMEvalKit would ask a judge model about an
    "Unknown"; here it stays Unknown and scores wrong.
    """
    words = strip_punctuation(("" if prediction is None else str(prediction)).lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return "Unknown"


MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                  "posters", "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def _yorn_correct(record: dict) -> bool:
    got = record.get("extracted") if "extracted" in record else extract_yes_no(record.get("prediction"))
    # VLMEvalKit compares case-sensitively (AMBER aside); its TSVs write "Yes"/"No", so folding case only
    # matters for a hand-made TSV with "yes", which VLMEvalKit would always score wrong.
    return got != "Unknown" and got.lower() == str(record["answer"]).strip().lower()


def score_yorn(records: list[dict], dataset_name: str = "") -> dict:
    """Y/N benchmarks. MME: its score; any other: accuracy (%) overall and per category.

    MME (MME_rating): per category, acc (% of questions right) + acc+ (% of images with both questions
    right), so each category scores 0..200; `perception` and `reasoning` (MME's cognition) sum their
    categories, and `overall` is their sum. `per_category_acc` and `per_category_acc_plus` give the parts.
    HallusionBench's and POPE's own tables (question-pair and F1 scores) are not reproduced: plain accuracy.
    """
    if "MME" in (dataset_name or "") and not _is_mme_variant(dataset_name):
        return _score_mme(records)
    out = _aggregate([(r, float(_yorn_correct(r))) for r in records])
    out["items"] = len(records)
    return out


def _is_mme_variant(name: str) -> bool:
    # Multiple-choice and video benchmarks with "MME" in the name are never typed Y/N; a Y/N TSV named
    # like them is scored as plain accuracy rather than by MME's image pairs.
    return any(v in name for v in ("MME-RealWorld", "Video-MME", "MME-Reasoning"))


def _score_mme(records: list[dict]) -> dict:
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("image_path") in (None, ""):
            raise ValueError(
                f"MME record {r.get('index')!r} has no image_path: MME's acc+ pairs the two questions of an "
                "image by MME.tsv's image_path column")
        by_image[str(r.get("category"))][str(r["image_path"])].append(_yorn_correct(r))
    acc, acc_plus, per_category = {}, {}, {}
    for cat in sorted(by_image):
        images = by_image[cat]
        answers = [h for hs in images.values() for h in hs]
        acc[cat] = 100.0 * sum(answers) / len(answers)
        # VLMEvalKit multiplies an image's first two hits; an image needs both right
        acc_plus[cat] = 100.0 * sum(all(hs[:2]) and len(hs) >= 2 for hs in images.values()) / len(images)
        per_category[cat] = acc[cat] + acc_plus[cat]
    perception = sum(per_category.get(c, 0.0) for c in MME_PERCEPTION)
    reasoning = sum(per_category.get(c, 0.0) for c in MME_COGNITION)
    return {
        "overall": perception + reasoning,
        "perception": perception,
        "reasoning": reasoning,
        "per_category": per_category,
        "per_category_acc": acc,
        "per_category_acc_plus": acc_plus,
        "count": len(records),
        "items": len(records),
        "metric": "mme_score",
    }


# ------------------------------------------------------------------------------------------------- VQA

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# VQAv2's contraction table (word written without apostrophes -> the contraction), as the official VQA
# evaluation and VLMEvalKit spell it; entries VLMEvalKit keys in upper case never match its lower-cased
# words and are left out.
_CONTRACTIONS = dict(pair.split("=", 1) for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't
mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def normalize_vqa_answer(text: str) -> str:
    """VQAv2's answer normalisation (VLMEvalKit's process_answer): newlines and tabs to spaces, strip,
    punctuation (strip_punctuation), lower case, number words to digits, articles dropped, contractions
    restored."""
    text = strip_punctuation(str(text).replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy, 0..1: for each human answer left out, min(1, matches among the others / 3), averaged.

    With ten answers of which k equal the (normalised) prediction: the k left-out subsets hold k-1 matches,
    the other 10-k hold k; e.g. k=2 gives (2 * 1/3 + 8 * 2/3) / 10 = 0.6, and k>=4 gives 1.

    One deviation: a single reference answer is scored by normalised exact match. VLMEvalKit's leave-one-out
    leaves nothing to match there and scores every such item 0, which no VLMEvalKit VQA-accuracy benchmark
    hits (TextVQA and VQAv2 have ten answers) but a custom one-answer TSV would.
    """
    gts = [normalize_vqa_answer(a) for a in answers]
    pred = normalize_vqa_answer("" if prediction is None else prediction)
    if not gts:
        return 0.0
    if len(gts) == 1:
        return float(gts[0] == pred)
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        total += min(1.0, matches / 3)
    return total / len(gts)


def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        prev, row[0] = row[0], j
        for i, ca in enumerate(a, 1):
            prev, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, prev + (ca != cb))
    return row[-1]


def normalized_distance(answer: str, prediction: str) -> float:
    """VLMEvalKit's anls_compute: edit distance of the lower-cased, whitespace-collapsed strings over the
    longer raw length (the raw strings, spaces and all, as VLMEvalKit measures them)."""
    a = " ".join(answer.strip().lower().split())
    p = " ".join(prediction.strip().lower().split())
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(a, p) / length


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS, 0..1 (DocVQA, InfoVQA): 1 - the smallest normalized distance to any answer, or 0 when that
    similarity is below `threshold` (a similarity of exactly 0.5 is kept)."""
    pred = "" if prediction is None else str(prediction)
    if not answers:
        return 0.0
    similarity = 1.0 - min(normalized_distance(str(a), pred) for a in answers)
    return 0.0 if similarity < threshold else similarity


def _to_number(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness (pix2struct's, as VLMEvalKit uses it): numbers within 5% of a non-zero
    target ("12%" reads as 0.12), anything else a case-insensitive exact match."""
    pred, target = str(prediction), str(target)
    p, t = _to_number(pred), _to_number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return pred.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str]) -> float:
    """1.0 if the stripped prediction relaxed-matches any answer, else 0.0."""
    pred = ("" if prediction is None else str(prediction)).strip()
    return float(any(relaxed_match(pred, a) for a in answers))


def exact_match(prediction: str, answers: list[str]) -> float:
    """OCRVQA's and GQA's rule: 1.0 if the prediction equals an answer, stripped and case-folded."""
    pred = ("" if prediction is None else str(prediction)).strip().lower()
    return float(any(str(a).strip().lower() == pred for a in answers))


_VQA_SCORERS = {"vqa_acc": vqa_accuracy, "anls": anls, "relaxed_acc": relaxed_accuracy,
                "exact_match": exact_match}


def parse_answers(answer) -> list[str]:
    """A VQA record's reference answers: a list, or a TSV cell holding a Python or JSON list literal
    ("['2', 'two']"), or one answer."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    if answer is None:
        return []
    return cell_list(str(answer))


def vqa_score(prediction: str, answers, metric: str) -> float:
    if metric not in _VQA_SCORERS:
        raise ValueError(f"unknown VQA metric {metric!r}; expected one of {', '.join(VQA_METRICS)}")
    return _VQA_SCORERS[metric](prediction, parse_answers(answers))


def score_vqa(records: list[dict], metric: str) -> dict:
    """Mean per-item score (%) overall and per category."""
    out = _aggregate([(r, _vqa_item(r, metric)) for r in records])
    out["items"] = len(records)
    out["metric"] = metric
    return out


def _vqa_item(record: dict, metric: str) -> float:
    if "correct" in record and isinstance(record["correct"], (int, float)) and not isinstance(
            record["correct"], bool):
        return float(record["correct"])
    return vqa_score(record.get("prediction"), record.get("answer"), metric)


# ------------------------------------------------------------------------------------------- one entry


def judge(kind: str, metric: str | None, record: Mapping) -> tuple[str | None, bool | float]:
    """(extracted, correct) for one item, as predictions.jsonl records them.

    MCQ: (the option letter or None, bool); Y/N: ("Yes"/"No"/"Unknown", bool); VQA: (the normalised
    prediction VLMEvalKit compares for vqa_acc, else the stripped prediction; the item's score, 0..1).
    An MCQ item is judged on its own here: circular groups are decided in score().
    """
    pred = record.get("prediction")
    if kind in (MCQ, VIDEO_MCQ):
        choice = extract_choice(pred, record.get("options") or {})
        return choice, choice is not None and choice == str(record["answer"]).strip()
    if kind == YORN:
        got = extract_yes_no(pred)
        return got, _yorn_correct({**record, "extracted": got})
    if kind in (VQA, VIDEO_VQA):
        metric = metric or "vqa_acc"
        text = "" if pred is None else str(pred)
        shown = normalize_vqa_answer(text) if metric == "vqa_acc" else text.strip()
        return shown, vqa_score(text, record.get("answer"), metric)
    raise ValueError(f"unknown benchmark kind {kind!r}")


def score(kind: str, metric: str | None, records: list[dict], dataset_name: str = "",
          circular: bool | None = None) -> dict:
    """{"overall": %, "per_category": {category: %}, "count": n, ...} for a benchmark's records.

    `count` is the number of scored units (questions; circular groups for a circular MCQ; items otherwise),
    `items` the records given. Records judged already (with `extracted`/`correct`) are not re-judged.
    `circular` defaults to VLMEvalKit's choice from the dataset name (MMBench, CCBench, *circular*, MMCR).
    """
    if kind in (MCQ, VIDEO_MCQ):
        if circular is None:
            circular = kind == MCQ and uses_circular_eval(dataset_name)
        return score_mcq(records, circular=circular)
    if kind == YORN:
        return score_yorn(records, dataset_name)
    if kind in (VQA, VIDEO_VQA):
        return score_vqa(records, metric or "vqa_acc")
    raise ValueError(f"unknown benchmark kind {kind!r}")


def _aggregate(scored: Iterable[tuple[dict, float]]) -> dict:
    scored = list(scored)
    by_cat: dict[str, list[float]] = defaultdict(list)
    by_l2: dict[str, list[float]] = defaultdict(list)
    for r, s in scored:
        cat = r.get("category")
        if _known(cat):
            by_cat[str(cat)].append(s)
        l2 = r.get("l2-category", r.get("l2_category"))
        if _known(l2):
            by_l2[str(l2)].append(s)
    out = {
        "overall": _pct([s for _, s in scored]),
        "per_category": {c: _pct(v) for c, v in sorted(by_cat.items())},
        "count": len(scored),
    }
    if by_l2:
        out["per_l2_category"] = {c: _pct(v) for c, v in sorted(by_l2.items())}
    return out


def _known(value) -> bool:
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def _pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")
