"""Micro-batch collation for InternVL samples (see :class:`~mindspeed_mm.data.dataset.InternVLChatDataset`).

Sequences are right-padded to the micro-batch's longest one; images are not batched per sample but
concatenated, because the model scatters all tiles' embeddings into the ``<IMG_CONTEXT>`` positions in order
(row-major over the batch's rows, then positions).

Preference pairs (:func:`collate_pairs`) become two rows each, all chosen rows first, as InternVL's DPO trainer
concatenates them (``concatenated_inputs``), so that one forward gives both log-probabilities of every pair.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from mindspeed_mm.data.template import IGNORE_INDEX

__all__ = ["collate_internvl", "collate_packed", "collate_pairs", "is_pair"]


def is_pair(sample: dict) -> bool:
    """Whether a dataset item is a preference pair (:class:`~mindspeed_mm.data.dataset.InternVLChatDataset`)."""
    return "chosen_input_ids" in sample


def collate_internvl(samples: Sequence[dict], pad_id: int) -> dict:
    """``input_ids`` [b, S] padded with ``pad_id``, ``labels`` [b, S] padded with -100, ``attention_mask``
    [b, S] bool, ``pixel_values`` [T, 3, H, W] (None when no sample has tiles), ``image_flags`` [T] (None
    likewise), ``num_samples``, ``num_tokens`` (real tokens, image tokens included), ``num_image_tokens``,
    ``skipped`` {reason: count} and ``loaded`` {note: count} summed over the samples, ``samples_by_dataset``
    {mixture dataset name: count}.

    Preference pairs are collated by :func:`collate_pairs`, so a loader built for SFT samples serves pairs too."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    pairs = [is_pair(s) for s in samples]
    if any(pairs):
        if not all(pairs):
            raise ValueError("a micro-batch mixes preference pairs and SFT samples")
        return collate_pairs(samples, pad_id)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    b, width = len(samples), max(lengths)
    input_ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.bool)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        if s["labels"].shape != s["input_ids"].shape:
            raise ValueError(f"sample {row}: labels {tuple(s['labels'].shape)} vs input_ids "
                             f"{tuple(s['input_ids'].shape)}")
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        attention_mask[row, :n] = True
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None
              and s["pixel_values"].shape[0] > 0]
    flags = [s["image_flags"] for s in samples if s.get("pixel_values") is not None
             and s["pixel_values"].shape[0] > 0]
    skipped: Counter = Counter()
    loaded: Counter = Counter()  # what used samples were loaded despite (dataset.LOAD_NOTES)
    for s in samples:
        skipped.update(s.get("skipped") or {})
        loaded.update(s.get("loaded") or {})
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_flags": torch.cat(flags) if flags else None,
        "num_samples": b,
        "num_tokens": sum(lengths),
        "num_image_tokens": sum(int(s["num_image_tokens"]) for s in samples),
        "skipped": dict(skipped),
        "samples_by_dataset": dict(Counter(s["dataset"] for s in samples if "dataset" in s)),
        "loaded": dict(loaded),
    }


def collate_packed(packs: Sequence[Sequence[dict]], pad_id: int, tiles_per_pack: int | None = None) -> dict:
    """Packed micro-batch: row ``r`` is pack ``r``, its samples' tokens concatenated whole, right-padded to the
    longest pack (``pad_id``, labels -100). :func:`collate_internvl`'s keys, plus ``sample_ids`` LongTensor
    [b, S] (each token's sample within its row, 0..n-1, -1 on padding), ``num_packs`` (= b), ``num_samples``
    (samples in the micro-batch), ``num_tiles`` (real tiles). Tiles in row-major (pack, then sample) order;
    ``tiles_per_pack`` (InternVL's ``strict_mode``): each pack's tiles padded with zero tiles whose
    ``image_flags`` are 0, after its own."""
    if not packs or any(not p for p in packs):
        raise ValueError("cannot collate an empty pack or micro-batch")
    rows = []
    for pack in packs:
        row = {"input_ids": torch.cat([s["input_ids"] for s in pack]),
               "labels": torch.cat([s["labels"] for s in pack]),
               "num_image_tokens": sum(int(s["num_image_tokens"]) for s in pack)}
        for s in pack:
            if s["labels"].shape != s["input_ids"].shape:
                raise ValueError(f"labels {tuple(s['labels'].shape)} vs input_ids {tuple(s['input_ids'].shape)}")
        pix = [s["pixel_values"] for s in pack if s.get("pixel_values") is not None]
        flags = [s["image_flags"] for s in pack if s.get("pixel_values") is not None]
        real = sum(int(p.shape[0]) for p in pix)
        if tiles_per_pack is not None and real < tiles_per_pack and pix:
            pix.append(torch.zeros((tiles_per_pack - real, *pix[0].shape[1:]), dtype=pix[0].dtype))
            flags.append(torch.zeros(tiles_per_pack - real, dtype=torch.long))
        row["pixel_values"] = torch.cat(pix) if pix else None
        row["image_flags"] = torch.cat(flags) if flags else None
        skipped: Counter = Counter()
        for s in pack:
            skipped.update(s.get("skipped") or {})
        row["skipped"] = dict(skipped)
        rows.append(row)
    batch = collate_internvl(rows, pad_id)
    width = batch["input_ids"].shape[1]
    sample_ids = torch.full((len(packs), width), -1, dtype=torch.long)
    for r, pack in enumerate(packs):
        start = 0
        for k, s in enumerate(pack):
            n = int(s["input_ids"].numel())
            sample_ids[r, start:start + n] = k
            start += n
    flags = batch["image_flags"]
    batch.update(sample_ids=sample_ids, num_packs=len(packs), num_samples=sum(len(p) for p in packs),
                 num_tiles=int(flags.sum()) if flags is not None else 0)
    return batch


def collate_pairs(pairs: Sequence[dict], pad_id: int) -> dict:
    """A micro-batch of P preference pairs as 2P rows: rows 0..P-1 the chosen sequences, rows P..2P-1 the
    rejected ones, in pair order, padded as :func:`collate_internvl` pads (to the longest of all 2P rows).
    ``pixel_values``/``image_flags``: the pairs' tiles in pair order, then the same again, because each row's
    ``<IMG_CONTEXT>`` tokens take the next tiles' features in row order. :func:`collate_internvl`'s keys, with
    ``num_samples`` = P (pairs: what ``--micro-batch-size`` and the consumed-sample count count),
    ``num_tokens``/``num_image_tokens`` over all 2P rows, ``samples_by_dataset`` counting pairs, plus
    ``num_pairs`` = P and ``records`` LongTensor [P] (each pair's record index)."""
    if not pairs:
        raise ValueError("cannot collate an empty micro-batch")
    if not all(is_pair(p) for p in pairs):
        raise ValueError("collate_pairs needs preference pairs (chosen_input_ids, ...)")
    rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"],
             "pixel_values": p.get("pixel_values"), "image_flags": p.get("image_flags"),
             "num_image_tokens": p["num_image_tokens"]}
            for side in ("chosen", "rejected") for p in pairs]
    batch = collate_internvl(rows, pad_id)
    skipped: Counter = Counter()
    loaded: Counter = Counter()
    for p in pairs:  # once per pair, not per row: a skipped record and an image's defect count once
        skipped.update(p.get("skipped") or {})
        loaded.update(p.get("loaded") or {})
    batch.update(num_samples=len(pairs), num_pairs=len(pairs),
                 records=torch.tensor([int(p["record"]) for p in pairs], dtype=torch.long),
                 skipped=dict(skipped), loaded=dict(loaded),
                 samples_by_dataset=dict(Counter(p["dataset"] for p in pairs if "dataset" in p)))
    return batch
