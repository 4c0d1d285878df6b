"""Dataset mixtures: several annotation files as one indexable stream of records, and length-grouped order.

Where the datasets come from (``dataset_param``): ``basic_parameters`` (one object or a list of
``{data_path, data_folder, repeat_time, name, max_dynamic_patch, data_augment}``), or ``meta_path``: InternVL's
meta JSON, ``{name: {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}}``
(``root`` is the ``data_folder``, ``annotation`` the ``data_path``; relative paths are taken from the working
directory, as InternVL does). A meta entry needs ``root`` and ``annotation``; ``repeat_time`` defaults to 1,
``data_augment`` to false, ``max_dynamic_patch`` to ``dataset_param.max_dynamic_patch``; ``length`` (InternVL
writes it and never reads it) is compared with the file and a mismatch is logged.

How many samples a dataset gives: ``floor(repeat_time x records)``, the product taken on the decimal as written
(0.29 x 100 = 29, not float's 28.999...). That is ``floor(repeat_time)`` full copies of the file plus a subset of
``floor(frac(repeat_time) x records)`` records drawn without replacement, seeded by ``(--seed, crc32(name))`` and
kept in file order. InternVL keeps the same count but takes the file's first records (a prefix, biased when the
file is sorted) and refuses non-integer repeats above 1. A dataset that would keep no sample is an error.

Records are read lazily: a ``.jsonl`` file is held as its raw lines and a line is parsed when its sample is
built, so start-up reads each file once and resuming at any sample count touches only the samples it yields
(``.json`` lists are parsed whole). Global index ``i`` maps to (dataset, line) arithmetically.

``group_by_length`` (when not packing): InternVL's LengthGroupedSampler semantics. Each epoch's permutation
(the same ``randperm(seed + epoch)`` as without grouping) is cut into megabatches of one global batch; each is
sorted by length, longest first, and dealt into ``global_batch / micro_batch`` micro-batches of equal count,
each index going to the micro-batch with the smallest length total so far (ties: the lowest; a megabatch whose
size the count does not divide is dealt round-robin). Micro-batch ``c`` of a global batch is DP rank
``c % dp`` at accumulation step ``c // dp``, as with HF's trainer. Lengths are a cheap estimate, not a
tokenization: the record's ``length`` if it has an integer one (InternVL's precomputed length), else the
characters of its turns (a preference pair: its question and longer answer) // 4 plus ``tokens_per_tile`` x
the most tiles it can get (images: ``n x (max(1, max_dynamic_patch // n) + thumbnail)``, video:
``max_num_frame``).
"""
from __future__ import annotations

import heapq
import json
import math
import zlib
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from mindspeed_mm.config.validate import Section, read_json
from mindspeed_mm.data.data_spec import BasicParameters, DataSpecError
from mindspeed_mm.data.sampler import epoch_permutation

__all__ = ["META_KEYS", "Mixture", "kept_count", "length_grouped_order", "name_datasets", "read_meta"]

META_KEYS = ("root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length")


def read_meta(meta_path: str, key: str = "dataset_param.meta_path") -> tuple[BasicParameters, ...]:
    """InternVL's meta JSON as datasets; errors name the entry's key and the meta file (a missing file: the data
    JSON's ``key``)."""
    if not Path(meta_path).is_file():
        raise DataSpecError(key, f"meta file not found: {meta_path}")
    raw = read_json(meta_path)
    if not isinstance(raw, dict) or not raw:
        raise DataSpecError("", "a meta JSON must be a non-empty object {name: {root, annotation, ...}}", meta_path)
    out = []
    for name, entry in raw.items():
        try:
            s = Section(entry, name)
            root = s.get("root", str)
            annotation = s.get("annotation", str)
            augment = s.get("data_augment", bool, False)
            max_patch = s.get("max_dynamic_patch", int, None, nullable=True, minimum=1)
            repeat = s.get("repeat_time", float, 1.0)
            length = s.get("length", int, None, nullable=True, minimum=0)
            s.done()
            if repeat <= 0:
                raise DataSpecError(s.key("repeat_time"), f"must be > 0, got {repeat!r}")
            if Path(annotation).suffix.lower() not in (".json", ".jsonl"):
                raise DataSpecError(s.key("annotation"), f"{annotation!r}: only .jsonl and .json files are read")
            if not Path(annotation).is_file():
                raise DataSpecError(s.key("annotation"), f"file not found: {annotation}")
        except DataSpecError as e:
            raise e.in_file(meta_path) from None
        out.append(BasicParameters(annotation, root, repeat, name, max_patch, augment, length, key=name,
                                   source=meta_path))
    return tuple(out)


def name_datasets(basics: Sequence[BasicParameters]) -> tuple[BasicParameters, ...]:
    """Every dataset named: an unnamed one by its file's stem (``stem#2``, ``#3``... when taken); two datasets
    given the same name is an error."""
    import dataclasses

    taken = [b.name for b in basics if b.name]
    for k, b in enumerate(basics):
        if b.name and b.name in [a.name for a in basics[:k]]:
            raise DataSpecError(f"{b.key}.name" if b.source is None else b.key, f"dataset name {b.name!r} is used "
                                "twice", b.source)
    out, used = [], set(taken)
    for b in basics:
        if not b.name:
            stem, n = Path(b.data_path).stem, 1
            name = stem
            while name in used:
                n += 1
                name = f"{stem}#{n}"
            used.add(name)
            b = dataclasses.replace(b, name=name)
        out.append(b)
    return tuple(out)


def kept_count(records: int, repeat_time: float) -> int:
    """``floor(records x repeat_time)`` with ``repeat_time`` as the decimal it was written as."""
    return math.floor(records * Fraction(repr(float(repeat_time))))


def _read_lines(b: BasicParameters) -> list:
    path = Path(b.data_path)
    if not path.is_file():
        where = f"{b.key}.data_path" if b.source is None else f"{b.key}.annotation"
        raise DataSpecError(where, f"annotation file not found: {path}", b.source)
    if path.suffix.lower() == ".json":
        from mindspeed_mm.data.dataset import read_annotations

        return read_annotations(path)
    return [line for line in path.read_bytes().splitlines() if line.strip()]


class Mixture(Sequence):
    """The records of ``basics`` after ``repeat_time``, concatenated in order. ``self[i]`` is
    ``(record, folder, "file:n")`` (a jsonl line that is not JSON: ``{"_unparsable": ...}``)."""

    def __init__(self, basics: Sequence[BasicParameters], seed: int):
        self.basics = tuple(basics)
        self._lines, self._subsets, self._full = [], [], []
        self.sizes, self.counts = [], []
        for b in self.basics:
            lines = _read_lines(b)
            n, kept = len(lines), kept_count(len(lines), b.repeat_time)
            if n and not kept:
                raise DataSpecError(f"{b.key}.repeat_time", f"{b.repeat_time!r} x {n} records of {b.data_path} "
                                    "keeps no sample", b.source)
            copies = math.floor(Fraction(repr(float(b.repeat_time))))
            extra = kept - copies * n
            rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(b.name.encode())])
            subset = np.sort(rng.choice(n, extra, replace=False)) if extra else np.zeros(0, dtype=np.int64)
            self._lines.append(lines)
            self._subsets.append(subset)
            self._full.append(copies * n)
            self.sizes.append(n)
            self.counts.append(kept)
        self.offsets = np.cumsum([0] + self.counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, line) of global index ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = int(np.searchsorted(self.offsets, i, side="right")) - 1
        local = i - int(self.offsets[d])
        line = local % self.sizes[d] if local < self._full[d] else int(self._subsets[d][local - self._full[d]])
        return d, line

    def basic(self, i: int) -> BasicParameters:
        return self.basics[self.locate(i)[0]]

    def __getitem__(self, i: int) -> tuple[Any, str, str]:
        d, line = self.locate(i)
        b = self.basics[d]
        record = self._lines[d][line]
        if isinstance(record, bytes):
            try:
                record = json.loads(record)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                record = {"_unparsable": f"record {line + 1}: {e}"}
        folder = b.data_folder if b.data_folder is not None else str(Path(b.data_path).parent)
        return record, folder, f"{b.data_path}:{line + 1}"

    def describe(self) -> list[str]:
        """One line per dataset for the start-up log."""
        out = []
        for b, n, kept in zip(self.basics, self.sizes, self.counts):
            out.append(f"dataset {b.name}: {kept} samples (floor({b.repeat_time:g} x {n} records) of "
                       f"{b.data_path}){'' if b.max_dynamic_patch is None else f'; max_dynamic_patch {b.max_dynamic_patch}'}"
                       f"{'; data_augment: tiles re-encoded as JPEG at a random quality 75-100' if b.data_augment else ''}")
            if b.length is not None and b.length != n:
                out.append(f"warning: dataset {b.name}: the meta JSON's length {b.length} != {n} records in "
                           f"{b.data_path}")
        return out

    def lengths(self, param, tokens_per_tile: int) -> list[int]:
        """Every sample's length estimate (see the module docstring); parses every record once."""
        out = []
        for d, b in enumerate(self.basics):
            max_patch = b.max_dynamic_patch or param.max_dynamic_patch
            per_line = []
            for raw in self._lines[d]:
                try:
                    r = json.loads(raw) if isinstance(raw, bytes) else raw
                except (json.JSONDecodeError, UnicodeDecodeError):
                    r = None
                per_line.append(_estimate(r, param, max_patch, tokens_per_tile))
            for local in range(self.counts[d]):
                line = local % self.sizes[d] if local < self._full[d] else int(self._subsets[d][local - self._full[d]])
                out.append(per_line[line])
        return out


def _estimate(record: Any, param, max_patch: int, tokens_per_tile: int) -> int:
    if not isinstance(record, dict):
        return 0
    if isinstance(record.get("length"), int) and not isinstance(record["length"], bool):
        return record["length"]
    turns = record.get("conversations")
    chars = sum(len(t["value"]) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)) \
        if isinstance(turns, list) else 0
    if "chosen" in record or "rejected" in record:  # a preference pair: as long as its longer sequence
        chars = sum(len(v) for v in (record.get("question"),) if isinstance(v, str)) + max(
            [len(v) for v in (record.get("chosen"), record.get("rejected")) if isinstance(v, str)] or [0])
    tiles = 0
    if record.get("video") is not None:
        tiles = param.max_num_frame
    elif record.get("image"):
        n = len(record["image"]) if isinstance(record["image"], list) else 1
        if param.dynamic_image_size:
            each = max(1, max_patch // n)
            tiles = n * (each + int(param.use_thumbnail and each > 1))
        else:
            tiles = n
    return chars // 4 + tokens_per_tile * tiles


def length_grouped_order(lengths: Sequence[int], global_batch: int, micro_batch: int, seed: int
                         ) -> Callable[[int], list[int]]:
    """Epoch -> the dataset's order for ``group_by_length`` (see the module docstring)."""
    n, chunks = len(lengths), max(1, global_batch // micro_batch)

    def deal(group: list[int]) -> list[int]:
        if len(group) % chunks:
            return [i for c in range(chunks) for i in group[c::chunks]]
        cap = len(group) // chunks
        out: list[list[int]] = [[] for _ in range(chunks)]
        heap = [(0, c) for c in range(chunks)]
        for i in group:
            total, c = heapq.heappop(heap)
            out[c].append(i)
            if len(out[c]) < cap:
                heapq.heappush(heap, (total + lengths[i], c))
        return [i for chunk in out for i in chunk]

    def order(epoch: int) -> list[int]:
        perm = epoch_permutation(n, seed, epoch)
        out: list[int] = []
        for start in range(0, n, global_batch):
            out += deal(sorted(perm[start:start + global_batch], key=lengths.__getitem__, reverse=True))
        return out

    return order
