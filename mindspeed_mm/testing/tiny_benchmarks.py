"""Small benchmark files of every kind in VLMEvalKit's TSV format, offline: photos from the scikit-image wheel
(its sample data; synthetic pictures when it is not installed), shrunk so that a tiny model tiles them cheaply.

    MMBench_DEV_EN   multiple choice with hints, categories and MMBench's circular copies (image by reference)
    MME              yes/no, two questions per image, perception and cognition categories
    TextVQA_VAL      open VQA, ten answers per question (VQAv2 accuracy), pictures as image_path, one with two
    DocVQA_VAL       open VQA scored by ANLS
    ChartQA_TEST     open VQA scored by relaxed accuracy
    MVBench_tiny     video multiple choice: video files and frame lists
"""
from __future__ import annotations

import base64
import csv
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PHOTOS", "corrupt_copies", "write_eval_json", "write_photos", "write_tiny_benchmarks"]

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png", "motorcycle_left.png")


def write_photos(out_dir: str | os.PathLike, width: int = 112, height: int = 60) -> list[Path]:
    """The sample photos as small RGB files (JPEG and PNG alternately)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("skimage")
    data_dir = Path(spec.origin).parent / "data" if spec and spec.origin else None
    rng = np.random.default_rng(0)
    paths = []
    for k, name in enumerate(PHOTOS):
        src = data_dir / name if data_dir is not None else None
        if src is not None and src.is_file():
            with Image.open(src) as im:
                picture = im.convert("RGB")
        else:
            picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        picture = picture.resize((width + 8 * k, height), Image.BICUBIC)
        path = out_dir / (Path(name).stem + (".jpg" if k % 2 else ".png"))
        picture.save(path)
        paths.append(path)
    return paths


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _write_tsv(path: Path, header: list[str], rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in header})
    return path


def _mmbench(photos: list[Path]) -> tuple[list[str], list[dict]]:
    """Three questions, each with its circular copies (options rotated, index + k * 1e6, the image given as the
    first copy's index, as MMBench's TSVs do)."""
    base = [
        (0, "What is the person wearing?", ["a space suit", "a dress", "a uniform", "nothing"], "A",
         "The picture was taken at NASA.", "attribute_recognition"),
        (1, "Which animal is this?", ["a dog", "a cat", "a horse"], "B", None, "object_localization"),
        (2, "What is in the cup?", ["coffee", "tea"], "A", None, "attribute_recognition"),
    ]
    rows = []
    for q, question, options, answer, hint, category in base:
        n = len(options)
        right = options["ABCD".index(answer)]
        for c in range(n):
            rotated = options[c:] + options[:c]
            row = {"index": str(q + c * 1_000_000), "question": question, "answer": "ABCD"[rotated.index(right)],
                   "hint": hint or "", "category": category, "l2-category": "perception", "split": "dev",
                   "image": _b64(photos[q]) if c == 0 else str(q)}
            row.update({"ABCD"[k]: v for k, v in enumerate(rotated)})
            rows.append(row)
    return ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split",
            "image"], rows


def _mme(photos: list[Path]) -> tuple[list[str], list[dict]]:
    qs = [
        (0, "existence", "Is there a person in this image?", "Yes", "Is there a dog in this image?", "No"),
        (1, "color", "Is the cat orange?", "Yes", "Is the cat blue?", "No"),
        (2, "commonsense_reasoning", "Is this a drink?", "Yes", "Is this drink frozen?", "No"),
    ]
    rows = []
    for k, (p, category, q1, a1, q2, a2) in enumerate(qs):
        for j, (question, answer) in enumerate(((q1, a1), (q2, a2))):
            rows.append({"index": str(2 * k + j), "question": question, "answer": answer, "category": category,
                         "image_path": f"{category}/{photos[p].name}",
                         "image": _b64(photos[p]) if j == 0 else str(2 * k)})
    return ["index", "question", "answer", "category", "image", "image_path"], rows


def _textvqa(photos: list[Path]) -> tuple[list[str], list[dict]]:
    ten = lambda *a: str(list(a))  # noqa: E731  VLMEvalKit's TSVs hold answer lists as Python literals
    rows = [
        {"index": "0", "question": "What is written on the rocket?",
         "answer": ten(*(["usa"] * 4 + ["nasa"] * 3 + ["united states"] * 3)), "image_path": photos[3].name},
        {"index": "1", "question": "How many horses are there?",
         "answer": ten(*(["1"] * 8 + ["single"] * 2)), "image_path": photos[4].name},
        {"index": "2", "question": "Which picture has a cat?",
         "answer": ten(*(["the second"] * 6 + ["second"] * 4)),
         "image_path": str([photos[0].name, photos[1].name])},
    ]
    for r in rows:
        r["category"] = "ocr" if r["index"] == "0" else "counting" if r["index"] == "1" else "multi-image"
    return ["index", "question", "answer", "category", "image_path"], rows


def _docvqa(photos: list[Path]) -> tuple[list[str], list[dict]]:
    rows = [
        {"index": "0", "question": "What is the title of the page?", "answer": str(["Astronaut", "astronaut photo"]),
         "image": _b64(photos[0])},
        {"index": "1", "question": "What brand is the motorcycle?", "answer": str(["Honda"]),
         "image": _b64(photos[5])},
        {"index": "2", "question": "What is served?", "answer": str(["coffee"]), "image": _b64(photos[2])},
    ]
    return ["index", "question", "answer", "image"], rows


def _chartqa(photos: list[Path]) -> tuple[list[str], list[dict]]:
    rows = [
        {"index": "0", "question": "What is the highest value?", "answer": "42", "category": "human",
         "image": _b64(photos[4])},
        {"index": "1", "question": "What share is blue, in percent?", "answer": "12.5", "category": "augmented",
         "image": _b64(photos[3])},
        {"index": "2", "question": "Which year is the peak?", "answer": "2019", "category": "human",
         "image": _b64(photos[1])},
    ]
    return ["index", "question", "answer", "category", "image"], rows


def _mvbench(out_dir: Path, photos: list[Path]) -> tuple[list[str], list[dict]]:
    from mindspeed_mm.testing.tiny_dataset import write_video

    rng = np.random.default_rng(1)
    clip = write_video(out_dir / "clip.mp4", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)])
    rows = [
        {"index": "0", "question": "What moves in the video?", "A": "a car", "B": "noise", "C": "a bird",
         "answer": "B", "category": "action", "video": clip.name},
        {"index": "1", "question": "What is shown last?", "A": "a horse", "B": "a cat", "answer": "B",
         "category": "order", "video": str([photos[4].name, photos[1].name, photos[2].name])},
    ]
    return ["index", "question", "A", "B", "C", "answer", "category", "video"], rows


def write_tiny_benchmarks(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The TSVs above in `out_dir` (photos beside them); returns name -> path."""
    out_dir = Path(out_dir)
    photos = write_photos(out_dir)
    out = {}
    for name, (header, rows) in {"MMBench_DEV_EN": _mmbench(photos), "MME": _mme(photos),
                                 "TextVQA_VAL": _textvqa(photos), "DocVQA_VAL": _docvqa(photos),
                                 "ChartQA_TEST": _chartqa(photos), "MVBench_tiny": _mvbench(out_dir, photos)}.items():
        out[name] = _write_tsv(out_dir / f"{name}.tsv", header, rows)
    return out


def corrupt_copies(src: Path, out_dir: Path) -> dict[str, Path]:
    """Broken variants of a base64 benchmark for the bad-input tests: a missing column, undecodable base64
    in one row, an answer letter outside the options in one row, an empty file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
        header = list(rows[0].keys())
    missing = _write_tsv(out_dir / "MMBench_DEV_EN_noquestion.tsv", [h for h in header if h != "question"], rows)
    bad = [dict(r) for r in rows]
    bad[0]["image"] = "not base64 at all!" * 5
    bad[4]["answer"] = "F"
    broken = _write_tsv(out_dir / "MMBench_DEV_EN_broken.tsv", header, bad)
    empty = out_dir / "MMBench_DEV_EN_empty.tsv"
    empty.write_text("")
    return {"missing_column": missing, "bad_rows": broken, "empty": empty}


def write_eval_json(path: str | os.PathLike, mm_dir: str | os.PathLike, hf_dir: str | os.PathLike, *,
                    batch_size: int = 4, max_new_tokens: int = 12, num_segments: int = 4) -> Path:
    """An inference JSON for evaluate_vlm.py: the checkpoint, its tokenizer, fp32 on CPU, greedy; no prompts."""
    import json

    raw = {"from_pretrained": str(mm_dir), "tokenizer": {"from_pretrained": str(hf_dir)}, "dtype": "fp32",
           "device": "cpu", "batch_size": batch_size, "num_segments": num_segments, "seed": 1234,
           "generation_config": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens}}
    Path(path).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return Path(path)
