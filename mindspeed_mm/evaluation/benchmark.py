"""Benchmark files in VLMEvalKit's TSV format, read into items; nothing is downloaded.

Columns (VLMEvalKit's names): ``index`` and ``question`` always; ``answer`` to score; options ``A``, ``B``, ...
(multiple choice); ``hint``, ``category``, ``split`` and ``l2-category`` when present; the picture as ``image``
(base64, or a JSON/Python list of base64 strings for several images; a cell of at most 64 characters naming
another row's ``index`` reuses that row's image, as MMBench's circular copies do) or ``image_path`` (a path or a
list of paths, relative to the TSV's folder); a video as ``video`` (a video file, or a list of frame images).

A file that cannot be a benchmark (no such file, a missing column, no rows) is a :class:`BenchmarkError` naming
the file and the column. A row that cannot be answered or scored is skipped and counted under a reason:
undecodable base64 or an unreadable picture (``bad_image``), a missing picture or video file
(``missing_file``), an answer letter outside the row's options (``answer_not_an_option``), an empty question
(``empty_question``), a duplicated index (``duplicate_index``).
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mindspeed_mm.errors import UserError

__all__ = ["Benchmark", "BenchmarkError", "Item", "cell_list", "load_benchmark", "parse_benchmark_arg", "read_columns"]

OPTION_LETTERS = tuple(string.ascii_uppercase)
_REFERENCE_MAX = 64  # VLMEvalKit: an image cell this short is the index of the row that holds the picture


class BenchmarkError(UserError):
    """A benchmark file that cannot be read as one."""


@dataclass(frozen=True)
class Item:
    index: str
    question: str
    row: int  # 0-based position in the file: the order of predictions.jsonl
    answer: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # letter -> text, letters in order
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    image_path: str | None = None  # the image_path cell as written: MME pairs an image's two questions by it
    images: tuple[str, ...] = ()  # picture files, in question order
    video: str | None = None  # a video file
    frames: tuple[str, ...] = ()  # or a video as frame image files

    @property
    def data_type(self) -> str:
        return "video" if self.video or self.frames else "image" if self.images else "text"


@dataclass
class Benchmark:
    name: str  # the dataset name VLMEvalKit would use (the file stem unless given): it picks prompts and metrics
    path: Path
    items: list[Item]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)  # (index, reason), the first few
    has_answers: bool = True


def parse_benchmark_arg(arg: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the name is the file's stem, as VLMEvalKit names its TSVs)."""
    name, sep, rest = arg.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, Path(rest)
    return Path(arg).stem, Path(arg)


def _cell(row: dict, key: str) -> str | None:
    """A cell's text, None when absent, empty or pandas' NaN spelled out."""
    value = row.get(key)
    if value is None:
        return None
    value = value.strip("\r")
    return None if value == "" or value.lower() == "nan" and key not in ("question", "answer") else value


def cell_list(value: str) -> list[str]:
    """A cell holding one string or a JSON/Python list literal of them (VLMEvalKit writes lists with str())."""
    if value.lstrip().startswith("["):
        for parse in (ast.literal_eval, json.loads):
            try:
                out = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(out, list):
                return [str(x) for x in out]
    return [value]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _image_suffix(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = (im.format or "png").lower()
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise _Skip("bad_image", f"the image is not a readable picture ({type(e).__name__})") from None
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _decoded(b64: str, out_dir: Path, stem: str) -> str:
    """The picture of a base64 cell as a file under `out_dir`: its bytes as they are (no re-encoding), named by
    row and content so a rerun reuses it and two rows never share a name."""
    try:
        data = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _Skip("bad_image", "the image cell is not valid base64") from None
    suffix = _image_suffix(data)
    digest = hashlib.sha1(data).hexdigest()[:12]
    path = out_dir / f"{stem}-{digest}.{suffix}"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _file(value: str, base: Path, kind: str) -> str:
    path = Path(value) if os.path.isabs(value) else base / value
    if not path.is_file():
        raise _Skip("missing_file", f"{kind} file not found: {path}")
    if kind == "image":
        _image_suffix(path.read_bytes())
    return str(path)


def _safe_stem(index: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", index)[:80] or "item"


REQUIRED_COLUMNS = ("index", "question")


def read_columns(path: str | os.PathLike) -> list[str]:
    """The header line's column names, checked: a missing file, an empty one or a missing required column is
    a BenchmarkError (read before any model is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    if not first.strip():
        raise BenchmarkError(f"{path}: empty file (expected a header line with {', '.join(REQUIRED_COLUMNS)}, ...)")
    columns = [c.strip() for c in first.rstrip("\r\n").split("\t")]
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise BenchmarkError(f"{path}: missing column {column!r} (the header has {', '.join(columns)})")
    return columns


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 pictures are megabytes per cell
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkError(f"{path}: not a UTF-8 TSV file ({type(e).__name__}: {e})") from None
    if not rows:
        raise BenchmarkError(f"{path}: no rows after the header")
    return header, rows


def load_benchmark(path: str | os.PathLike, name: str | None = None, image_dir: str | os.PathLike | None = None,
                   kind: str | None = None) -> Benchmark:
    """Read a VLMEvalKit TSV. Base64 pictures are written to `image_dir` (default: beside the file, in
    `<name>_images/`). `kind`: multiple choice ("MCQ", "Video-MCQ") checks every answer against the row's options."""
    path = Path(path)
    name = name or path.stem
    read_columns(path)
    header, rows = _read_rows(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / f"{name}_images"
    has_answers = "answer" in header
    letters = [c for c in OPTION_LETTERS if c in header]
    pictures = {r["index"]: r.get("image") for r in rows if r.get("image") and len(r["image"]) > _REFERENCE_MAX}
    bench = Benchmark(name, path, [], has_answers=has_answers)
    seen: set[str] = set()
    for n, row in enumerate(rows):
        index = (row.get("index") or "").strip()
        try:
            item = _item(row, n, index, letters, pictures, path.parent, image_dir, kind, seen)
        except _Skip as skip:
            bench.skipped[skip.reason] += 1
            if len(bench.skipped_rows) < 20:
                bench.skipped_rows.append((index, f"{skip.reason}: {skip}"))
            continue
        seen.add(index)
        bench.items.append(item)
    return bench


def _item(row: dict, n: int, index: str, letters: list[str], pictures: dict, base: Path, image_dir: Path,
          kind: str | None, seen: set[str]) -> Item:
    if not index:
        raise _Skip("empty_index", f"row {n + 2} has no index")
    if index in seen:
        raise _Skip("duplicate_index", f"index {index} appears twice")
    question = _cell(row, "question")
    if question is None:
        raise _Skip("empty_question", f"index {index}: empty question")
    options = {c: v for c in letters if (v := _cell(row, c)) is not None}
    answer = _cell(row, "answer")
    if kind in ("MCQ", "Video-MCQ") and answer is not None and answer.strip() not in options:
        raise _Skip("answer_not_an_option", f"index {index}: answer {answer!r} is not one of its options "
                                            f"{''.join(options) or '(none)'}")
    images: list[str] = []
    stem = _safe_stem(index)
    if (cell := _cell(row, "image")) is not None:
        if len(cell) <= _REFERENCE_MAX:
            if cell not in pictures:
                raise _Skip("bad_image", f"index {index}: image {cell!r} is neither base64 nor another row's index")
            cell = pictures[cell]
            stem = _safe_stem(row["image"])
        for k, b64 in enumerate(cell_list(cell)):
            images.append(_decoded(b64, image_dir, stem if k == 0 else f"{stem}_{k}"))
    elif (cell := _cell(row, "image_path")) is not None:
        images = [_file(p, base, "image") for p in cell_list(cell)]
    video, frames = None, ()
    if (cell := _cell(row, "video")) is not None:
        listed = cell_list(cell)
        if len(listed) == 1 and not cell.strip().startswith("["):
            video = _file(listed[0], base, "video")
        else:
            frames = tuple(_file(p, base, "image") for p in listed)
    return Item(index=index, question=question, row=n, answer=answer, options=options, hint=_cell(row, "hint"),
                category=_cell(row, "category"), l2_category=_cell(row, "l2-category"), image_path=_cell(row, "image_path"), split=_cell(row, "split"), images=tuple(images), video=video,
                frames=frames)
