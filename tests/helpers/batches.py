"""Deterministic tiny multimodal batches for tests: the same on every rank, made from a seed."""
from __future__ import annotations

import torch

from mindspeed_mm.config.model_spec import InternVLSpec


def sample_ids(spec: InternVLSpec, tiles_per_image: list[int], text_len: int, seed: int) -> torch.Tensor:
    """Token ids: text, then per image <IMG_CONTEXT> x tokens_per_tile x tiles and a little text."""
    g = torch.Generator().manual_seed(seed)
    img = spec.img_context_token_id

    def text(n):
        ids = torch.randint(0, spec.text.vocab_size, (n,), generator=g)
        return torch.where(ids == img, ids - 1, ids)

    parts = [text(text_len)]
    for tiles in tiles_per_image:
        parts += [torch.full((spec.tokens_per_tile * tiles,), img), text(3)]
    return torch.cat(parts)


def make_batch(spec: InternVLSpec, samples: list[list[int]], seed: int = 0) -> dict:
    """A right-padded micro-batch; `samples` lists, per sample, the tile count of each image.
    Returns input_ids, attention_mask, labels (prompt prefix and image tokens ignored), pixel_values."""
    seqs = [sample_ids(spec, s, text_len=5 + 4 * i, seed=seed * 100 + i) for i, s in enumerate(samples)]
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    labels = torch.where((mask == 1) & (ids != spec.img_context_token_id), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100
    tiles = sum(sum(s) for s in samples)
    pixels = None
    if tiles:
        g = torch.Generator().manual_seed(1000 + seed)
        pixels = torch.randn(tiles, spec.vision.num_channels, spec.vision.image_size, spec.vision.image_size,
                             generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


MICROBATCH_SHAPES = [[[1], [2, 1]], [[2]], [[], [1]], [[3]]]


def make_microbatches(spec: InternVLSpec, n: int, seed: int = 0) -> list[dict]:
    """`n` micro-batches of varied shapes: several images, text-only samples, different lengths."""
    return [make_batch(spec, MICROBATCH_SHAPES[i % len(MICROBATCH_SHAPES)], seed=seed + i) for i in range(n)]
