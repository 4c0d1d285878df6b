"""InternVL chat samples from the annotation files a data spec names: tokens, labels and pixel tiles.

A record is ``{"image": path | [paths], "conversations": [...]}``, ``{"video": path, "clip": [s, e]?, ...}`` or
text only (``conversations`` alone); paths are relative to ``data_folder``. One image is tiled up to
``max_dynamic_patch`` tiles, ``n`` images up to ``max(1, max_dynamic_patch // n)`` each (InternVL's rule); a
video gives one tile per frame and its ``<video>`` placeholder becomes ``Frame-1: <image>\\nFrame-2: <image>...``
(the training form, also used by our inference); ``fps<r>`` sampling takes the whole clip's grid, not capped by
``max_num_frame`` (InternVL's ``read_frames_decord``). A truncated image file is trained on as InternVL's trainer
does (PIL's ``LOAD_TRUNCATED_IMAGES``) and counted in the sample's ``"loaded"`` notes, unless
``skip_truncated_images``; video frames are padded to squares only with a ``Pad2Square`` step (InternVL3's
recipe has ``pad2square`` false).

Sequence length: a sample is never cut inside an image. If it is too long, the tile budget per image (frames
for a video) is halved until it fits, down to one; if it still does not fit, the sample is skipped. Text-only
samples are truncated at ``seq_length`` when a target label survives, else skipped.

A bad sample (missing or unreadable file, malformed record, too long) never stops training: ``__getitem__(i)``
returns the first usable sample among ``i, i+1, ...`` (mod len), logs one warning per skip, and reports the
skips in the sample itself (``"skipped": {reason: count}``) because DataLoader workers are other processes.
Randomness (frame count, frame positions) is seeded by ``(seed, record index)``: the same sample whatever the
worker count or order.

Preference pairs (``dataset_param.dataset_kind``, :mod:`mindspeed_mm.data.preference`): each record gives a pair
sample, its chosen and rejected conversations built by the same code as one SFT conversation, with one set of
tiles (or frames) for both, chosen to fit the longer of the two; truncation applies to each sequence, and a pair
with either answer cut away entirely is ``too_long``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import threading

import numpy as np
import torch
from PIL import Image, ImageFile

from mindspeed_mm.data.data_spec import DatasetParam, DataSpec, DataSpecError
from mindspeed_mm.data.preference import PAIR_SKIP_REASONS, PairRecordError, check_unpacked, mixture_kind, pair_turns
from mindspeed_mm.data.template import (
    DEFAULT_SYSTEM_MESSAGE,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    build_conversation,
)
from mindspeed_mm.data.tiling import (
    choose_grid,
    dynamic_tiles,
    load_image,
    to_pixel_values,
)
from mindspeed_mm.data.video import read_video_frames
from mindspeed_mm.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["LOAD_NOTES", "SKIP_REASONS", "VIDEO_PLACEHOLDER", "InternVLChatDataset", "load_image_lenient",
           "read_annotations"]

VIDEO_PLACEHOLDER = "<video>"
# Why a record was skipped (the keys of a sample's "skipped" dict).
SKIP_REASONS = ("missing_file", "bad_image", "bad_video", "malformed", "too_long",
                "truncated_image") + PAIR_SKIP_REASONS
# What a used sample was loaded despite (the keys of its "loaded" dict, counted per image).
LOAD_NOTES = ("truncated_image",)
# This many unusable records in a row means the data, not a sample, is broken (wrong data_folder, ...).
MAX_CONSECUTIVE_SKIPS = 100


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_annotations(path: str | os.PathLike) -> list[Any]:
    """The records of a ``.json`` (a list) or ``.jsonl`` file. A jsonl line that is not JSON becomes an
    ``_unparsable`` record, so that it is skipped and counted like any other bad sample."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: a .json annotation file must hold a list of records")
        return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append({"_unparsable": f"line {n}: {e.msg}"})
    return records


_TRUNCATED_LOCK = threading.Lock()


def load_image_lenient(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """``(image, truncated)``: the file read strictly (:func:`load_image`), or, if that fails, read again as
    InternVL's trainer reads every image (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, set at import of
    its ``internvl_chat_finetune.py``): PIL decodes what is there and fills the rest, and ``truncated``
    is True. A file PIL cannot identify as an image fails both ways (the strict error is raised)."""
    try:
        return load_image(path), False
    except FileNotFoundError:
        raise
    except ValueError as strict:
        with _TRUNCATED_LOCK:  # a process-wide PIL switch: set it only around this one read
            before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
            try:
                return load_image(path), True
            except ValueError:
                raise strict from None
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = before


def _pad_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


JPEG_QUALITIES = (75, 100)  # InternVL's data_augment: qualities 75..100 inclusive


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """The image as it comes back from a JPEG of this quality (InternVL's `simulate_jpeg_degradation`)."""
    import io

    with io.BytesIO() as buf:
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")


class InternVLChatDataset(torch.utils.data.Dataset):
    """Samples of the annotation files in ``spec`` (a :class:`DataSpec` or its ``dataset_param``).

    ``tokens_per_tile`` defaults to the spec's ``(image_size // patch_size)**2 * down_sample_ratio**2``; pass the
    model's to make sure both agree. Each item is a dict: ``input_ids``/``labels`` LongTensor[s] (s <=
    seq_length), ``pixel_values`` float32 [tiles, 3, H, W] ([0, 3, H, W] when text only), ``image_flags``
    LongTensor[tiles] of ones, ``num_image_tokens`` int, ``skipped`` {reason: count}.

    Of preference pairs (``self.preference``), each item has ``chosen_input_ids``/``chosen_labels`` and
    ``rejected_input_ids``/``rejected_labels`` instead, one ``pixel_values``/``image_flags`` for both,
    ``num_image_tokens`` of each sequence, and ``record``: the index of the record it was built from (``index``
    itself unless that record was skipped), which keys anything precomputed per pair.
    """

    def __init__(self, spec: DataSpec | DatasetParam, tokenizer, seq_length: int,
                 tokens_per_tile: int | None = None, seed: int = 1234,
                 system_message: str = DEFAULT_SYSTEM_MESSAGE):
        self.param = spec.dataset_param if isinstance(spec, DataSpec) else spec
        p = self.param
        if tokens_per_tile is not None and tokens_per_tile != p.tokens_per_tile:
            raise DataSpecError("dataset_param.image_size", f"the data spec gives {p.tokens_per_tile} tokens per "
                                f"tile (image_size {p.image_size}, patch_size {p.patch_size}, down_sample_ratio "
                                f"{p.down_sample_ratio}) but the model uses {tokens_per_tile}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.tokenizer, self.seq_length, self.seed = tokenizer, int(seq_length), int(seed)
        self.tokens_per_tile, self.system_message = p.tokens_per_tile, system_message
        self.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if self.img_context_id is None or self.img_context_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no {IMG_CONTEXT_TOKEN} token")

        # (record, folder its paths are relative to, "file:n" for messages), read lazily (data/mixture.py)
        from mindspeed_mm.data.mixture import Mixture

        self.records = Mixture(p.basic_parameters, self.seed)
        if not len(self.records):
            raise UserError(f"no samples in {[b.data_path for b in p.basic_parameters]}")
        self.preference = mixture_kind(p, p.basic_parameters) == "preference"
        check_unpacked(p, "preference" if self.preference else "sft")
        if p.pad_to_square:
            logger.info("the data JSON's train_pipeline has Pad2Square: video frames (and images when "
                        "dynamic_image_size is false) are padded to squares before resizing, as MindSpeed-MM's "
                        "pipeline does; InternVL3's recipe (pad2square false) does not, so drop the step to match it")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        skipped: Counter = Counter()
        last = ""
        for k in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            j = (index + k) % n
            try:
                sample = self.build(j)
            except _Skip as e:
                skipped[e.reason] += 1
                last = f"{self.records[j][2]}: {e}"
                logger.warning("skipping sample %d (%s): %s: %s", j, self.records[j][2], e.reason, e)
                continue
            sample["skipped"] = dict(skipped)
            sample["dataset"] = self.records.basic(j).name
            sample.setdefault("loaded", {})
            return sample
        raise UserError(f"{sum(skipped.values())} samples in a row from index {index} are unusable "
                        f"({dict(skipped)}); the last: {last}. Check data_path / data_folder.")

    # ---- one record -------------------------------------------------------------------------------------

    def build(self, j: int) -> dict:
        """Record ``j`` as a sample, or ``_Skip``."""
        record, folder, _ = self.records[j]
        # InternVL's data_augment: each tile (and frame) re-encoded as JPEG at a quality drawn from 75..100, here
        # drawn per sample from the seed and the sample's index, so any number of workers gives the same pixels
        self._augment = (np.random.default_rng([self.seed, j]) if self.records.basic(j).data_augment else None)
        if not isinstance(record, dict) or "_unparsable" in record:
            raise _Skip("malformed", f"not a JSON object: {record.get('_unparsable') if isinstance(record, dict) else record!r}")
        if self.preference:
            try:
                convs = list(pair_turns(record))
            except PairRecordError as e:
                raise _Skip(e.reason, str(e)) from None
        else:
            convs = [record.get("conversations")]
            if not isinstance(convs[0], list):
                raise _Skip("malformed", "no 'conversations' list")
        loaded = {}
        if record.get("video") is not None:
            seqs, pixels = self._video_sample(j, record, convs, folder)
        else:
            images = record.get("image")
            if images is None or images == []:
                seqs, pixels = self._text_sample(convs)
            else:
                if isinstance(images, str):
                    images = [images]
                if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
                    raise _Skip("malformed", f"'image' must be a path or a list of paths, got {images!r}")
                seqs, pixels, loaded = self._image_sample(convs, [os.path.join(folder, x) for x in images],
                                                          self.records.basic(j).max_dynamic_patch)
        out = self._pair_result(j, seqs, pixels) if self.preference else self._result(*seqs[0], pixels)
        if loaded:
            out["loaded"] = loaded
        return out

    def _tokenize(self, conversations: list, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return build_conversation(conversations, tiles, self.tokens_per_tile, self.tokenizer,
                                      self.system_message)
        except (ValueError, TypeError, KeyError) as e:
            raise _Skip("malformed", str(e)) from None

    def _pixels(self, tiles: list[Image.Image]) -> torch.Tensor:
        if getattr(self, "_augment", None) is not None:
            tiles = [jpeg_degrade(t, int(self._augment.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1)))
                     for t in tiles]
        return to_pixel_values(tiles, self.param.norm_mean, self.param.norm_std)

    def _result(self, ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor) -> dict:
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_flags": torch.ones(pixel_values.shape[0], dtype=torch.long),
            "num_image_tokens": int((ids == self.img_context_id).sum()),
        }

    def _pair_result(self, j: int, seqs: list, pixel_values: torch.Tensor) -> dict:
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = seqs
        if torch.equal(chosen_ids, rejected_ids):  # the answers differ only past seq_length
            raise _Skip("identical_pair", f"the two answers are the same in their first {chosen_ids.numel()} "
                        f"tokens (seq_length {self.seq_length})")
        out = self._result(chosen_ids, chosen_labels, pixel_values)
        del out["input_ids"], out["labels"]
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels, "rejected_input_ids": rejected_ids,
                "rejected_labels": rejected_labels, **out, "record": j}

    # Each builder takes one conversation (SFT) or two (a pair's chosen and rejected ones, the same images) and
    # returns one (input_ids, labels) per conversation; a size limit applies to the longest.

    def _text_sample(self, convs: list[list]) -> tuple[list, torch.Tensor]:
        seqs = []
        for conversations in convs:
            ids, labels = self._tokenize(conversations, [])
            if ids.numel() > self.seq_length:
                ids, labels = ids[: self.seq_length], labels[: self.seq_length]
                if not bool((labels != IGNORE_INDEX).any()):
                    raise _Skip("too_long", f"{self.seq_length} tokens hold no answer token")
            seqs.append((ids, labels))
        size = self.param.image_size
        return seqs, torch.zeros(0, 3, size, size, dtype=torch.float32)

    def _image_sample(self, convs: list[list], paths: list[str], max_patch: int | None = None
                      ) -> tuple[list, torch.Tensor, dict]:
        p = self.param
        images, truncated = [], 0
        for path in paths:
            try:
                image, cut = load_image_lenient(path)
            except FileNotFoundError as e:
                raise _Skip("missing_file", str(e)) from None
            except ValueError as e:
                raise _Skip("bad_image", str(e)) from None
            if cut and p.skip_truncated_images:
                raise _Skip("truncated_image", f"{path} is truncated (dataset_param.skip_truncated_images)")
            if cut:
                logger.warning("image file %s is truncated; training on it as InternVL does (PIL fills the "
                               "missing part); dataset_param.skip_truncated_images: true skips such samples", path)
            images.append(image)
            truncated += cut
        budget = max(1, (max_patch or p.max_dynamic_patch) // len(images)) if p.dynamic_image_size else 1
        while True:
            low = min(p.min_dynamic_patch, budget)
            counts = [self._tile_count(im, low, budget) for im in images]
            seqs = [self._tokenize(c, counts) for c in convs]
            longest = max(ids.numel() for ids, _ in seqs)
            if longest <= self.seq_length:
                break
            if budget == 1:
                raise _Skip("too_long", f"{longest} tokens with one tile per image > seq_length {self.seq_length}")
            budget //= 2
        tiles = []
        for im, count in zip(images, counts):
            if p.dynamic_image_size:
                t = dynamic_tiles(im, p.image_size, low, budget, p.use_thumbnail)
            else:
                t = [self._single_tile(im)]
            assert len(t) == count, (len(t), count)
            tiles += t
        return seqs, self._pixels(tiles), ({"truncated_image": truncated} if truncated else {})

    def _tile_count(self, image: Image.Image, low: int, high: int) -> int:
        if not self.param.dynamic_image_size:
            return 1
        cols, rows = choose_grid(image.width, image.height, self.param.image_size, low, high)
        n = cols * rows
        return n + 1 if self.param.use_thumbnail and n > 1 else n

    def _single_tile(self, image: Image.Image) -> Image.Image:
        if self.param.pad_to_square:
            image = _pad_square(image, self.param.norm_mean)
        size = self.param.image_size
        return image.resize((size, size), Image.Resampling.BICUBIC)

    def _video_sample(self, j: int, record: dict, convs: list[list], folder: str) -> tuple[list, torch.Tensor]:
        p = self.param
        path, clip = record["video"], record.get("clip")
        if not isinstance(path, str):
            raise _Skip("malformed", f"'video' must be a path, got {path!r}")
        if clip is not None and not (isinstance(clip, list) and len(clip) == 2
                                     and all(isinstance(c, (int, float)) for c in clip)):
            raise _Skip("malformed", f"'clip' must be [start, end] seconds, got {clip!r}")
        rng = np.random.default_rng([self.seed, j])
        if p.sampling_method.startswith("fps"):
            num = None  # every frame of the rate's grid, not capped by max_num_frame (InternVL's reader)
        else:
            num = int(rng.integers(p.min_num_frame, p.max_num_frame + 1))
        while True:
            try:
                frames = read_video_frames(os.path.join(folder, path), num, p.sampling_method, clip, rng)
            except FileNotFoundError as e:
                raise _Skip("missing_file", str(e)) from None
            except ValueError as e:
                raise _Skip("bad_video", str(e)) from None
            seqs = [self._tokenize(self._expand_video(c, len(frames)), [1] * len(frames)) for c in convs]
            longest = max(ids.numel() for ids, _ in seqs)
            if longest <= self.seq_length:
                break
            if len(frames) == 1:
                raise _Skip("too_long", f"{longest} tokens with one frame > seq_length {self.seq_length}")
            num = max(1, len(frames) // 2)
        return seqs, self._pixels([self._single_tile(f) for f in frames])

    @staticmethod
    def _expand_video(conversations: list, num_frames: int) -> list:
        """The conversation with its one ``<video>`` placeholder (prefixed to the first human turn if absent)
        replaced by one ``Frame-i: <image>`` line per frame."""
        turns = [dict(t) if isinstance(t, dict) else t for t in conversations]
        values = [t.get("value") if isinstance(t, dict) else None for t in turns]
        text = [v for v in values if isinstance(v, str)]
        if any(IMAGE_PLACEHOLDER in v for v in text):
            raise _Skip("malformed", f"a video sample with an {IMAGE_PLACEHOLDER} placeholder")
        count = sum(v.count(VIDEO_PLACEHOLDER) for v in text)
        if count > 1:
            raise _Skip("malformed", f"{count} {VIDEO_PLACEHOLDER} placeholders; one video per sample")
        first = next((t for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
        if first is None or not isinstance(first.get("value"), str):
            raise _Skip("malformed", "no human turn")
        if count == 0:
            first["value"] = VIDEO_PLACEHOLDER + "\n" + first["value"]
        frames = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(num_frames))
        for t in turns:
            if isinstance(t, dict) and isinstance(t.get("value"), str) and VIDEO_PLACEHOLDER in t["value"]:
                t["value"] = t["value"].replace(VIDEO_PLACEHOLDER + "\n", frames + "\n").replace(
                    VIDEO_PLACEHOLDER, frames)
        return turns
