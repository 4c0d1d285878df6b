"""Requests -> prompt ids and tiles -> generation -> results.

Inputs are prepared exactly as training prepares them: dynamic tiling with the thumbnail (one image), the
same tiling with the tile budget split between the images (several images, `Image-k: <image>` lines as in
InternVL's chat), one tile per frame at the middle of each of `num_segments` segments (video,
`Frame-k: <image>` lines, hyphenated as in training), and the internvl2_5 template tokenised turn by turn.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.data.template import (
    DEFAULT_SYSTEM_MESSAGE,
    IMAGE_PLACEHOLDER,
    build_prompt,
)
from mindspeed_mm.data.tiling import dynamic_tiles, load_image, to_pixel_values
from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.config import GenerationConfig, InferenceConfig, RequestSpec
from mindspeed_mm.inference.generate import generate
from mindspeed_mm.inference.stages import StageRunner

__all__ = ["InternVLPipeline", "PreparedRequest", "frame_tiles", "image_tiles", "prepare_request", "stop_token_ids"]

logger = logging.getLogger(__name__)
IM_END = "<|im_end|>"
VIDEO_PLACEHOLDER = "<video>"


@dataclass
class PreparedRequest:
    request: RequestSpec
    input_ids: Tensor  # [s] long
    pixel_values: Tensor | None  # [tiles, 3, H, W] float32, or None
    tiles_per_image: list[int]


def image_tiles(path: str, spec: InternVLSpec, max_tiles: int, use_thumbnail: bool) -> Tensor:
    tiles = dynamic_tiles(load_image(path), image_size=spec.vision.image_size, max_tiles=max_tiles,
                          use_thumbnail=use_thumbnail)
    return to_pixel_values(tiles)


def frame_tiles(path: str, spec: InternVLSpec, num_segments: int) -> list[Tensor]:
    from mindspeed_mm.data.video import read_video_frames

    frames = read_video_frames(path, num_segments, sampling="middle")
    return [to_pixel_values(dynamic_tiles(f, image_size=spec.vision.image_size, max_tiles=1)) for f in frames]


def _prefixed(question: str, label: str, n: int) -> str:
    """`Image-1: <image>\\nImage-2: <image>\\n...` before the question, unless it places its own `<image>`s;
    for frames, a `<video>` placeholder takes the lines where it stands (as in training)."""
    if question.count(IMAGE_PLACEHOLDER) == n:
        return question
    if IMAGE_PLACEHOLDER in question:
        raise UserError(f"the prompt has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                        f"but the request has {n} {label.lower()}(s)")
    lines = "\n".join(f"{label}-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n))
    if label == "Frame" and VIDEO_PLACEHOLDER in question:
        return question.replace(VIDEO_PLACEHOLDER, lines, 1)
    return lines + "\n" + question


def prepare_request(request: RequestSpec, spec: InternVLSpec, tokenizer, *, max_tiles: int = 12,
                    use_thumbnail: bool = True, num_segments: int = 8,
                    system_message: str | None = None) -> PreparedRequest:
    kind, files, question = request.infer_data_type, request.file_path, request.prompt
    tiles: list[Tensor] = []
    if kind == "image":
        # Several images share the tile budget, as training's multi-image samples do.
        per_image = max_tiles if len(files) == 1 else max(1, max_tiles // len(files))
        tiles = [image_tiles(f, spec, per_image, use_thumbnail) for f in files]
        if len(files) > 1:
            question = _prefixed(question, "Image", len(files))
    elif kind == "video":
        tiles = frame_tiles(files[0], spec, num_segments)
        question = _prefixed(question, "Frame", len(tiles))
    elif kind != "text":
        raise ValueError(f"infer_data_type {kind!r} is not supported; expected 'image', 'video' or 'text'")
    counts = [t.shape[0] for t in tiles]
    ids = build_prompt([{"from": "human", "value": question}], counts, spec.tokens_per_tile, tokenizer,
                       system_message if system_message is not None else DEFAULT_SYSTEM_MESSAGE)
    return PreparedRequest(request, ids, torch.cat(tiles) if tiles else None, counts)


def stop_token_ids(tokenizer, config: GenerationConfig) -> list[int]:
    """`eos_token_id` when given; else `<|im_end|>` (the template's turn end) and the tokenizer's eos."""
    if config.eos_token_id is not None:
        return list(config.eos_token_id)
    ids = {tokenizer.convert_tokens_to_ids(IM_END)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i >= 0)


class InternVLPipeline:
    """Generation for a list of requests on every rank of the model; results on every rank."""

    def __init__(self, runner: StageRunner, tokenizer, config: InferenceConfig, max_length: int):
        self.runner, self.tokenizer, self.config, self.max_length = runner, tokenizer, config, max_length
        self.spec = runner.spec
        self.stop_ids = stop_token_ids(tokenizer, config.generation_config)
        pad = config.generation_config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if pad == self.spec.img_context_token_id:
            raise UserError(f"generation_config.pad_token_id: {pad} is the image context token; give another")
        self.pad_id = pad
        self.generator = torch.Generator(device=runner.device).manual_seed(config.seed)

    def prepare(self, request: RequestSpec) -> PreparedRequest:
        c = self.config
        return prepare_request(request, self.spec, self.tokenizer, max_tiles=c.max_tiles,
                               use_thumbnail=c.use_thumbnail, num_segments=c.num_segments,
                               system_message=c.system_message)

    def run_batch(self, prepared: Sequence[PreparedRequest]) -> list[dict]:
        pixels = [p.pixel_values for p in prepared if p.pixel_values is not None]
        out = generate(self.runner, [p.input_ids for p in prepared], torch.cat(pixels) if pixels else None,
                       self.config.generation_config, self.stop_ids, self.pad_id, self.max_length,
                       generator=self.generator, max_new_tokens=[p.request.max_new_tokens for p in prepared])
        results = []
        for i, p in enumerate(prepared):
            tokens = out.tokens[i]
            text_ids = tokens[:-1] if out.finish_reasons[i] == "stop" else tokens
            results.append({
                "id": p.request.id,
                "infer_data_type": p.request.infer_data_type,
                "file_path": list(p.request.file_path),
                "prompt": p.request.prompt,
                "response": self.tokenizer.decode(text_ids, skip_special_tokens=True),
                "token_ids": tokens,
                "finish_reason": out.finish_reasons[i],
                "num_prompt_tokens": len(p.input_ids),
                "num_tiles": sum(p.tiles_per_image),
                "timings": {"prefill_s": round(out.prefill_s, 6), "decode_s": round(out.decode_s, 6),
                            "decode_tokens_per_s": round(out.decode_tokens_per_s, 3),
                            "batch_size": len(prepared)},
            })
        return results

    def run(self, requests: Sequence[RequestSpec]) -> list[dict]:
        """All requests, `batch_size` at a time; every input is read before the first generation, so a bad
        file fails the run before any time is spent on the model."""
        prepared = [self.prepare(r) for r in requests]
        results = []
        size = self.config.batch_size
        for start in range(0, len(prepared), size):
            results += self.run_batch(prepared[start:start + size])
        return results


def write_results(results: Sequence[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
