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


# ---------------------------------------------------------------------------------------------------------------
# Packed micro-batches (the data side's format): each row whole samples back to back, right-padded to the longest
# row, `sample_ids` [b, s] the sample's index within its row (-1 on padding), tiles in row-major (row, sample) order.
# ---------------------------------------------------------------------------------------------------------------

def _sample(spec: InternVLSpec, tiles: list[int], seed: int) -> dict:
    """One sample alone (a micro-batch of one row, no padding), labels as `make_batch` makes them."""
    ids = sample_ids(spec, tiles, text_len=5 + seed % 7, seed=seed)
    labels = torch.where(ids != spec.img_context_token_id, ids, torch.full_like(ids, -100))
    labels[:3] = -100
    n = sum(tiles)
    pixels = None
    if n:
        g = torch.Generator().manual_seed(5000 + seed)
        pixels = torch.randn(n, spec.vision.num_channels, spec.vision.image_size, spec.vision.image_size, generator=g)
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "labels": labels[None], "pixel_values": pixels}


def make_packed_batch(spec: InternVLSpec, rows: list[list[list[int]]], seed: int = 0) -> tuple[dict, list[dict]]:
    """A packed micro-batch of `rows` (per row, per sample, the tile count of each image) and its samples alone,
    in row-major order."""
    alone = [_sample(spec, tiles, seed * 100 + i) for i, tiles in enumerate(t for row in rows for t in row)]
    it = iter(alone)
    packed_rows = [[next(it) for _ in row] for row in rows]
    length = max(sum(s["input_ids"].shape[1] for s in row) for row in packed_rows)
    b = len(rows)
    ids = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    sids = torch.full((b, length), -1, dtype=torch.long)
    for r, row in enumerate(packed_rows):
        at = 0
        for j, s in enumerate(row):
            n = s["input_ids"].shape[1]
            ids[r, at:at + n], labels[r, at:at + n] = s["input_ids"][0], s["labels"][0]
            mask[r, at:at + n], sids[r, at:at + n] = 1, j
            at += n
    pixels = [s["pixel_values"] for s in alone if s["pixel_values"] is not None]
    packed = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_ids": sids,
              "pixel_values": torch.cat(pixels) if pixels else None}
    return packed, alone


# three samples per micro-batch (equal counts: the step's gradient then weighs every sample alike packed and alone);
# one row or two (the second padded), text-only samples, several images
PACK_SHAPES = [[[[1], [], [2]]], [[[2, 1], []], [[1]]], [[[], [3], []]], [[[1]], [[], [1]]]]


def make_packed_microbatches(spec: InternVLSpec, n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`n` packed micro-batches and every sample of theirs alone, in order."""
    packed, alone = [], []
    for i in range(n):
        p, a = make_packed_batch(spec, PACK_SHAPES[i % len(PACK_SHAPES)], seed=seed + i)
        packed.append(p)
        alone += a
    return packed, alone


def unpacked_like(packed: dict, alone: list[dict]) -> dict:
    """The samples of `packed` (given alone) as one right-padded unpacked micro-batch (one sample per row)."""
    length = max(a["input_ids"].shape[1] for a in alone)
    n = len(alone)
    ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, a in enumerate(alone):
        k = a["input_ids"].shape[1]
        ids[i, :k], labels[i, :k], mask[i, :k] = a["input_ids"][0], a["labels"][0], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": packed["pixel_values"]}
