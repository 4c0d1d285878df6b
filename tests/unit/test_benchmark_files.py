"""VLMEvalKit TSVs read into items: base64 and path pictures, MMBench's by-reference copies, list cells, empty
cells, and what is skipped or refused (tests/oracle/test_evaluation_vs_transformers.py runs them)."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mindspeed_mm.evaluation.benchmark import BenchmarkError, load_benchmark, parse_benchmark_arg, read_columns


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pictures_references_lists_and_empty_cells(tmp_path):
    red, blue = (base64.b64encode(_png(c)).decode() for c in ("red", "blue"))
    (tmp_path / "a.png").write_bytes(_png("green"))
    (tmp_path / "b.png").write_bytes(_png("white"))
    path = _tsv(tmp_path / "Bench.tsv", ["index", "question", "A", "B", "C", "answer", "image", "image_path"], [
        ["1", "q1", "x", "y", "", "A", red, ""],
        ["1000001", "q1", "y", "x", "nan", "B", "1", ""],  # a circular copy: the picture by reference
        ["2", "q2", "x", "y", "z", "C", str([red, blue]), ""],
        ["3", "q3", "x", "y", "", "A", "", "['a.png', 'b.png']"],
        ["4", "q4", "x", "y", "", "B", "", "a.png"],
    ])
    bench = load_benchmark(path, image_dir=tmp_path / "img", kind="MCQ")
    assert bench.name == "Bench" and not bench.skipped
    one, copy, two, paths, single = bench.items
    assert one.options == {"A": "x", "B": "y"} and copy.options == {"A": "y", "B": "x"}  # "" and NaN dropped
    assert copy.images == one.images and open(one.images[0], "rb").read() == _png("red")  # bytes as they are
    assert len(two.images) == 2 and two.options == {"A": "x", "B": "y", "C": "z"}
    assert [p.rsplit("/", 1)[1] for p in paths.images] == ["a.png", "b.png"]
    assert single.images == (str(tmp_path / "a.png"),) and single.row == 4


def test_skips_are_counted_by_reason(tmp_path):
    red = base64.b64encode(_png("red")).decode()
    path = _tsv(tmp_path / "Bench.tsv", ["index", "question", "A", "B", "answer", "image", "image_path"], [
        ["1", "q", "x", "y", "A", "!!notbase64!!" * 8, ""],
        ["2", "q", "x", "y", "D", red, ""],
        ["3", "", "x", "y", "A", red, ""],
        ["3", "q", "x", "y", "A", red, ""],
        ["5", "q", "x", "y", "A", "", "missing.png"],
        ["6", "q", "x", "y", "A", base64.b64encode(b"not a picture").decode() * 6, ""],
        ["7", "q", "x", "y", "B", red, ""],
    ])
    bench = load_benchmark(path, image_dir=tmp_path / "img", kind="MCQ")
    assert [it.index for it in bench.items] == ["3", "7"]  # the first "3" has no question: the second is used
    assert dict(bench.skipped) == {"bad_image": 2, "answer_not_an_option": 1, "empty_question": 1, "missing_file": 1}


def test_refused_files(tmp_path):
    with pytest.raises(BenchmarkError, match="benchmark file not found"):
        read_columns(tmp_path / "none.tsv")
    (tmp_path / "e.tsv").write_text("")
    with pytest.raises(BenchmarkError, match="empty file"):
        read_columns(tmp_path / "e.tsv")
    _tsv(tmp_path / "q.tsv", ["index", "answer"], [["1", "A"]])
    with pytest.raises(BenchmarkError, match="missing column 'question'"):
        load_benchmark(tmp_path / "q.tsv")
    _tsv(tmp_path / "h.tsv", ["index", "question"], [])
    with pytest.raises(BenchmarkError, match="no rows"):
        load_benchmark(tmp_path / "h.tsv")


def test_benchmark_argument():
    assert parse_benchmark_arg("LMUData/MMBench_DEV_EN.tsv") == ("MMBench_DEV_EN", parse_benchmark_arg("x=LMUData/MMBench_DEV_EN.tsv")[1])
    assert parse_benchmark_arg("MME=data/mme_local.tsv")[0] == "MME"
