"""A small multimodal chat dataset written offline, for tests and tiny training runs.

Every answer names the dominant colour of what was shown (one image, several images, or a video), so a few
training steps visibly lower the loss. Images come in several aspect ratios (so tiling yields 1 to many tiles),
as PNG and JPEG; videos are short libx264 mp4 files written with PyAV (skipped with a warning if PyAV is not
installed). ``broken=True`` adds one record of each kind the dataset must skip: a missing image, a file that
is not an image, a corrupt video, an over-long sample, a malformed conversation and a line that is not JSON.

``write_tiny_preference_dataset`` writes InternVL MMPR-style pairs (``question``, ``chosen``: the right colour,
``rejected``: a wrong one) from the same pictures; ``broken=True`` adds one pair of each kind a preference dataset
must skip.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["BROKEN_LOADED", "BROKEN_REASONS", "COLOURS", "PREFERENCE_BROKEN_REASONS", "write_tiny_dataset",
           "write_tiny_preference_dataset", "write_video"]

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
# (width, height) in units of the tile size: square, wide, tall, very wide, a small odd size.
_SHAPES = [(1.0, 1.0), (2.0, 1.0), (0.7, 1.6), (3.0, 1.0), (0.4, 0.3)]
# What write_tiny_dataset(broken=True) adds, as the reasons the dataset reports them under.
BROKEN_REASONS = {"missing_file": 1, "bad_image": 1, "bad_video": 1, "too_long": 1, "malformed": 2}
# ... and what it is trained on despite a defect, as counted in the samples' "loaded" notes (a truncated PNG).
BROKEN_LOADED = {"truncated_image": 1}
# What write_tiny_preference_dataset(broken=True) adds: a pair without 'rejected', one whose answers are the same,
# and one with two <image> placeholders for its one image.
PREFERENCE_BROKEN_REASONS = {"malformed_pair": 1, "identical_pair": 1, "malformed": 1}


def _picture(rgb, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A noisy field of one colour with a darker rectangle, so tiles are not all alike."""
    base = np.empty((height, width, 3), dtype=np.int16)
    base[:] = rgb
    y0, x0 = int(rng.integers(0, max(1, height // 2))), int(rng.integers(0, max(1, width // 2)))
    base[y0:y0 + height // 3 + 1, x0:x0 + width // 3 + 1] //= 2
    noise = rng.integers(-25, 26, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def write_video(path: str | os.PathLike, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264",
                pix_fmt: str = "yuv420p") -> Path:
    """Encode uint8 RGB ``[H, W, 3]`` frames with PyAV (``codec="libx264rgb", pix_fmt="rgb24"`` in a .mkv is
    lossless)."""
    import av

    path = Path(path)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        options = {"qp": "0"} if codec == "libx264rgb" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _image_writer(out: Path, image_size: int, rng: np.random.Generator, prefix: str = ""):
    """Creates the output folders; returns image(colour, k, shape) -> the written picture's relative path."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)

    def image(colour: str, k: int, shape) -> str:
        w, h = max(8, int(shape[0] * image_size)), max(8, int(shape[1] * image_size))
        rel = f"images/{prefix}{colour}_{k}.{'png' if k % 2 == 0 else 'jpg'}"
        _picture(COLOURS[colour], w, h, rng).save(out / rel)
        return rel

    return image


def write_tiny_dataset(out_dir: str | os.PathLike, image_size: int, seed: int = 0, broken: bool = False) -> Path:
    """Write images, videos and ``data.jsonl`` (paths relative to ``out_dir``) under ``out_dir``; returns the
    jsonl path. Deterministic for a given ``seed``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    image = _image_writer(out, image_size, rng)
    names = list(COLOURS)
    records: list = []

    for k, shape in enumerate(_SHAPES):
        for colour in names:
            records.append({"image": image(colour, k, shape),
                            "conversations": _turns("<image>\nWhat colour is this picture?", f"It is {colour}.")})
    for k in range(4):
        a, b = names[k % len(names)], names[(k + 2) % len(names)]
        paths = [image(a, 10 + k, _SHAPES[k]), image(b, 20 + k, _SHAPES[k + 1])]
        records.append({"image": paths, "conversations": _turns(
            "Image-1: <image>\nImage-2: <image>\nWhat colours are the two pictures?", f"They are {a} and {b}.")})
    try:
        import av  # noqa: F401
        has_av = True
    except ImportError:
        has_av = False
        logger.warning("PyAV is not installed (pip install av): the tiny dataset has no video samples")
    if has_av:
        for k, colour in enumerate(names[:3]):
            frames = [np.asarray(_picture(COLOURS[colour], 64, 48, rng)) for _ in range(20)]
            rel = f"videos/{colour}.mp4"
            write_video(out / rel, frames)
            record = {"video": rel, "conversations": _turns("<video>\nWhat colour is the video?", f"It is {colour}.")}
            if k == 1:
                record["clip"] = [0.5, 1.5]
            records.append(record)
    for colour, thing in (("blue", "the sky"), ("green", "grass"), ("white", "snow")):
        records.append({"conversations": _turns(f"What colour is {thing}?", f"It is {colour}.")})

    if broken:
        records.append({"image": "images/does_not_exist.png",
                        "conversations": _turns("<image>\nWhat colour is this picture?", "It is red.")})
        data = (out / "images/red_0.png").read_bytes()
        (out / "images/truncated.png").write_bytes(data[: len(data) // 2])
        records.append({"image": "images/truncated.png",
                        "conversations": _turns("<image>\nWhat colour is this picture?", "It is red.")})
        (out / "images/not_an_image.png").write_text("not an image\n")
        records.append({"image": "images/not_an_image.png",
                        "conversations": _turns("<image>\nWhat colour is this picture?", "It is red.")})
        (out / "videos/corrupt.mp4").write_bytes(np.random.default_rng(seed).bytes(4096))
        records.append({"video": "videos/corrupt.mp4",
                        "conversations": _turns("<video>\nWhat colour is the video?", "It is red.")})
        records.append({"image": "images/red_0.png",
                        "conversations": _turns("<image>\n" + "Describe the colour red in detail. " * 2000,
                                                "It is red.")})
        records.append({"image": "images/red_0.png",
                        "conversations": [{"from": "gpt", "value": "It is red."}]})
    order = rng.permutation(len(records))
    lines = [json.dumps(records[i], ensure_ascii=False) for i in order]
    if broken:
        lines.insert(len(lines) // 2, '{"image": "images/red_0.png", "conversations": [')
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        logger.warning("PyAV is not installed (pip install av): the tiny dataset has no video samples")
        return False
    return True


def write_tiny_preference_dataset(out_dir: str | os.PathLike, image_size: int, seed: int = 0,
                                  broken: bool = False) -> Path:
    """Write images, a video and ``preference.jsonl`` (MMPR records, paths relative to ``out_dir``) under
    ``out_dir``; returns the jsonl path. Twelve pairs: single images (half of the questions without an
    ``<image>`` placeholder, which the template then prefixes), two images, a video (when PyAV is installed) and
    text only. Deterministic for a given ``seed``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    image = _image_writer(out, image_size, rng, "pref_")
    names = list(COLOURS)
    records: list = []

    def wrong(colour: str) -> str:
        return names[(names.index(colour) + 3) % len(names)]

    for k in range(9):
        colour = names[k % len(names)]
        question = "What colour is this picture?" if k % 2 else "<image>\nWhat colour is this picture?"
        records.append({"image": image(colour, k, _SHAPES[k % len(_SHAPES)]), "question": question,
                        "chosen": f"It is {colour}.", "rejected": f"It is {wrong(colour)}, I think."})
    a, b = names[1], names[4]
    records.append({"image": [image(a, 10, _SHAPES[1]), image(b, 11, _SHAPES[2])],
                    "question": "Image-1: <image>\nImage-2: <image>\nWhat colours are the two pictures?",
                    "chosen": f"They are {a} and {b}.", "rejected": f"They are {b} and {a}."})
    if _has_av():
        colour = names[2]
        rel = f"videos/pref_{colour}.mp4"
        write_video(out / rel, [np.asarray(_picture(COLOURS[colour], 64, 48, rng)) for _ in range(20)])
        records.append({"video": rel, "question": "<video>\nWhat colour is the video?",
                        "chosen": f"It is {colour}.", "rejected": f"It is {wrong(colour)}."})
    records.append({"question": "What colour is grass?", "chosen": "It is green.", "rejected": "It is purple."})
    if broken:
        records.append({"image": image("red", 30, _SHAPES[0]), "question": "What colour is this picture?",
                        "chosen": "It is red."})
        records.append({"image": image("blue", 31, _SHAPES[0]), "question": "What colour is this picture?",
                        "chosen": "It is blue.", "rejected": "It is blue."})
        records.append({"image": image("green", 32, _SHAPES[0]), "question": "<image>\n<image>\nWhat colour?",
                        "chosen": "It is green.", "rejected": "It is red."})
    order = rng.permutation(len(records))
    path = out / "preference.jsonl"
    path.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in order), encoding="utf-8")
    return path
