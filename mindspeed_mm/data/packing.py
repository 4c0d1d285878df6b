"""Packed training data: whole samples packed into rows, the step's packs balanced over data-parallel ranks,
resumable exactly.

**The stream.** Global position ``p`` is sample ``order(epoch)[p % n]`` of epoch ``p // n``, the epoch's
permutation seeded by ``seed + epoch`` (the unpacked sampler's order). Every rank of every DP group reads the
whole stream and runs the same packer, so all ranks agree on every pack without communicating; a sample that
cannot be built (the dataset's skip reasons) or that breaks a limit (``over_max_packed_tokens``,
``over_num_images_expected``) is dropped and counted, or with ``allow_overflow`` a limit-breaker is a pack of
its own. A sample is never cut.

**Packers** (``packing_algorithm``), both over a buffer of at most ``max_buffer_size`` open packs:

- ``greedy``, InternVL's ``PackedDataset``: the buffer is kept ordered by tile count (most first); a sample
  goes into the first pack it fits (tiles and tokens), else opens one; a pack is emitted as soon as it holds
  ``max_packed_tokens`` tokens or ``num_images_expected`` tiles, and while the buffer is over its size the
  pack with most tiles is emitted. (InternVL merges into an over-long pack and cuts it with
  ``allow_overflow``; we never cut, so ``allow_overflow`` here only lets an over-limit sample stand alone.)
- ``best_fit``: a sample goes into the pack it fits most tightly (the least tokens left afterwards), else
  opens one; a pack is emitted when its tokens are full, while the buffer is over its size the fullest pack
  (most tokens) is emitted, and a pack opened more than ``4 x max_buffer_size`` packs ago is emitted (no sample
  waits forever). A pack full of tiles stays open for text-only samples.

With ``replacement`` false each epoch's buffer is flushed at its end (packs never mix epochs); true: the
buffer carries on into the next epoch.

**A step** is ``global_batch_size`` packs: the next ones the packer emits, assigned to DP ranks with
``micro_batch_size x num_micro`` each by tile count (longest-processing-time greedy with a capacity per rank,
then pairwise swaps between the most and least loaded ranks), so that ranks' ViT work per step is even; each
rank's packs, longest first, make its micro-batches (:func:`~mindspeed_mm.data.collate.collate_packed`).

**State** (:meth:`PackedLoader.state_dict`, at a step boundary): the next stream position, the open packs and
the packs emitted but not yet assigned, as ``(position, index)`` lists, and the skips not yet reported. A resume
rebuilds only those buffered samples and reads on from the position: the next packs are bit-identical.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mindspeed_mm.data.collate import collate_packed
from mindspeed_mm.data.data_spec import PackingParam
from mindspeed_mm.data.sampler import epoch_permutation

logger = logging.getLogger(__name__)

__all__ = ["PACK_SKIP_REASONS", "Item", "Pack", "Packer", "PackedLoader", "assign_packs", "tile_imbalance",
           "pack_stream", "padding_fraction"]

PACK_SKIP_REASONS = ("over_max_packed_tokens", "over_num_images_expected")
STATE_VERSION = 1
MAX_AGE = 4  # best_fit: a pack stays open for at most this many buffers' worth of newer packs


@dataclass(frozen=True)
class Item:
    """One sample of the stream, as the packer sees it."""
    position: int
    index: int
    tokens: int
    tiles: int


@dataclass
class Pack:
    items: list[Item] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0
    serial: int = 0  # when it was opened: the tie-breaker that keeps every choice deterministic

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.tokens += item.tokens
        self.tiles += item.tiles

    def rows(self) -> list[list[int]]:
        """The pack as plain ints for a checkpoint: one row per item, then its serial."""
        return [[it.position, it.index, it.tokens, it.tiles] for it in self.items] + [[self.serial]]

    @classmethod
    def from_rows(cls, rows) -> "Pack":
        pack = cls(serial=int(rows[-1][0]))
        for pos, idx, tok, til in rows[:-1]:
            pack.add(Item(int(pos), int(idx), int(tok), int(til)))
        return pack


class Packer:
    """The buffer algorithm over :class:`Item` s; :meth:`add` and :meth:`flush` return the packs emitted."""

    def __init__(self, param: PackingParam):
        self.p = param
        self.algorithm = param.packing_algorithm
        self.buffer: list[Pack] = []
        self._serial = 0

    def _new(self) -> Pack:
        self._serial += 1
        return Pack(serial=self._serial)

    def fits(self, item: Item) -> bool:
        return item.tokens <= self.p.max_packed_tokens and item.tiles <= self.p.num_images_expected

    def _room(self, pack: Pack, item: Item) -> bool:
        return (pack.tokens + item.tokens <= self.p.max_packed_tokens
                and pack.tiles + item.tiles <= self.p.num_images_expected)

    def add(self, item: Item) -> list[Pack]:
        """Pack ``item`` (which :meth:`fits`); the packs this emits, in order."""
        if self.algorithm == "greedy":
            return self._add_greedy(item)
        return self._add_best_fit(item)

    def _add_greedy(self, item: Item) -> list[Pack]:
        M, N = self.p.max_packed_tokens, self.p.num_images_expected
        at = next((i for i, b in enumerate(self.buffer) if self._room(b, item)), None)
        pack = self.buffer.pop(at) if at is not None else self._new()
        pack.add(item)
        out = []
        if pack.tokens >= M:
            out.append(pack)
        else:  # before the first pack with fewer tiles: most tiles first, oldest first among equals
            where = next((i for i, b in enumerate(self.buffer) if b.tiles < pack.tiles), len(self.buffer))
            self.buffer.insert(where, pack)
        while self.buffer and self.buffer[0].tiles >= N:
            out.append(self.buffer.pop(0))
        while len(self.buffer) > self.p.max_buffer_size:
            out.append(self.buffer.pop(0))
        return out

    def _add_best_fit(self, item: Item) -> list[Pack]:
        M = self.p.max_packed_tokens
        best, best_key = None, None
        for i, b in enumerate(self.buffer):
            if self._room(b, item):
                key = (M - b.tokens - item.tokens, b.serial)
                if best_key is None or key < best_key:
                    best, best_key = i, key
        if best is None:
            pack = self._new()
            self.buffer.append(pack)
        else:
            pack = self.buffer[best]
        pack.add(item)
        out = []
        if pack.tokens >= M:
            self.buffer.remove(pack)
            out.append(pack)
        while len(self.buffer) > self.p.max_buffer_size:
            full = max(self.buffer, key=lambda b: (b.tokens, b.tiles, -b.serial))
            self.buffer.remove(full)
            out.append(full)
        # no pack waits forever: one opened more than MAX_AGE x max_buffer_size packs ago is emitted
        old = [b for b in self.buffer if self._serial - b.serial > MAX_AGE * self.p.max_buffer_size]
        for b in old:
            self.buffer.remove(b)
        return out + old

    def flush(self) -> list[Pack]:
        """Every open pack, in the order the algorithm would emit them."""
        if self.algorithm == "greedy":
            out, self.buffer = self.buffer, []
            return out
        out = sorted(self.buffer, key=lambda b: (-b.tokens, -b.tiles, b.serial))
        self.buffer = []
        return out

    # ---- state -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"serial": self._serial, "buffer": [b.rows() for b in self.buffer]}

    def restore(self, state: dict) -> None:
        self._serial = int(state["serial"])
        self.buffer = [Pack.from_rows(rows) for rows in state["buffer"]]


def pack_stream(items: Sequence[Item], param: PackingParam) -> tuple[list[Pack], Counter]:
    """Pack a finite list of items (one epoch: flushed at the end); the packs and the drops by reason. For
    tests and benchmarks: the loader below runs the same steps item by item."""
    packer, packs, dropped = Packer(param), [], Counter()
    for item in items:
        if not packer.fits(item):
            if param.allow_overflow:
                packs.append(Pack(items=[item], tokens=item.tokens, tiles=item.tiles))
            else:
                dropped[_over_reason(item, param)] += 1
            continue
        packs += packer.add(item)
    return packs + packer.flush(), dropped


def _over_reason(item: Item, param: PackingParam) -> str:
    return PACK_SKIP_REASONS[0] if item.tokens > param.max_packed_tokens else PACK_SKIP_REASONS[1]


def padding_fraction(packs: Sequence[Pack], max_packed_tokens: int) -> float:
    """1 - real tokens / (packs x max_packed_tokens): the pack capacity left empty."""
    return 1.0 - sum(p.tokens for p in packs) / (len(packs) * max_packed_tokens) if packs else 0.0


# ---- data-parallel balance ----------------------------------------------------------------------------------

def assign_packs(tiles: Sequence[int], tokens: Sequence[int], dp: int, swaps: int = 64) -> list[list[int]]:
    """Which packs (indices into ``tiles``) each DP rank gets, ``len(tiles) // dp`` each, so that per-rank
    tile sums are even: packs by tiles (then tokens) descending to the least-loaded rank with room, then up to
    ``swaps`` exchanges between the most and the least loaded rank that narrow their gap. Deterministic."""
    n = len(tiles)
    if n % dp:
        raise ValueError(f"{n} packs do not split over {dp} DP ranks")
    cap = n // dp
    order = sorted(range(n), key=lambda i: (-tiles[i], -tokens[i], i))
    ranks: list[list[int]] = [[] for _ in range(dp)]
    load = [0] * dp
    tok = [0] * dp
    for i in order:
        r = min((r for r in range(dp) if len(ranks[r]) < cap), key=lambda r: (load[r], tok[r], r))
        ranks[r].append(i)
        load[r] += tiles[i]
        tok[r] += tokens[i]
    for _ in range(swaps):
        hi = max(range(dp), key=lambda r: (load[r], -r))
        lo = min(range(dp), key=lambda r: (load[r], r))
        gap = load[hi] - load[lo]
        if gap <= 1:
            break
        best = None
        for a in ranks[hi]:
            for b in ranks[lo]:
                d = tiles[a] - tiles[b]
                if 0 < d < gap:
                    key = (abs(gap - 2 * d), a, b)
                    if best is None or key < best[0]:
                        best = (key, a, b, d)
        if best is None:
            break
        _, a, b, d = best
        ranks[hi][ranks[hi].index(a)] = b
        ranks[lo][ranks[lo].index(b)] = a
        load[hi] -= d
        load[lo] += d
    return ranks


def tile_imbalance(per_rank_tiles: Sequence[int]) -> float:
    """max over ranks / mean - 1 (0 when there are no tiles)."""
    mean = sum(per_rank_tiles) / len(per_rank_tiles)
    return max(per_rank_tiles) / mean - 1.0 if mean else 0.0


# ---- the loader ---------------------------------------------------------------------------------------------

class _Stream:
    """Global position -> dataset index: epoch permutations seeded by ``seed + epoch`` (the sampler's)."""

    def __init__(self, total: int, seed: int, shuffle: bool):
        self.total, self.seed, self.shuffle = total, seed, shuffle
        self._epoch, self._order = -1, None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.total)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_permutation(self.total, self.seed, epoch)
        return self._order[offset]


def load_sample(dataset, index: int) -> tuple[Optional[dict], Optional[str]]:
    """Record ``index`` built, or the reason it is skipped: the dataset's own ``build`` (no skipping forward
    to the next record, so that each record is in the stream exactly once)."""
    from mindspeed_mm.data import dataset as ds_module

    build = getattr(dataset, "build", None)
    if build is None:
        return dataset[index], None
    try:
        return build(index), None
    except ds_module._Skip as e:
        logger.warning("skipping sample %d: %s: %s", index, e.reason, e)
        return None, e.reason


class _BuildAt(torch.utils.data.Dataset):
    """DataLoader adaptor: ``(position, index)`` -> ``(position, index, sample | None, skip reason)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        sample, reason = load_sample(self.dataset, index)
        return position, index, sample, reason


class _Positions(torch.utils.data.Sampler):
    def __init__(self, start: int, stream: _Stream):
        self.start, self.stream = start, stream

    def __iter__(self):
        p = self.start
        while True:
            yield p, self.stream.index(p)
            p += 1


def _identity(x):
    return x


class PackedLoader:
    """This DP rank's packed micro-batches, step by step; every rank runs the same packer over the whole
    stream. ``state`` (from :meth:`state_dict`): resume exactly there. Iterating yields ``num_micro``
    micro-batches of ``micro_batch_size`` packs per step; :meth:`state_dict` is valid between steps."""

    def __init__(self, dataset, param: PackingParam, micro_batch_size: int, num_micro: int, dp_rank: int,
                 dp_size: int, seed: int, pad_id: int, shuffle: bool = True, num_workers: int = 0,
                 state: Optional[dict] = None, tokens_per_tile: int = 0,
                 max_consecutive_skips: Optional[int] = None):
        if not param.use_packed_ds:
            raise ValueError("PackedLoader needs use_packed_ds")
        self.dataset, self.param = dataset, param
        self.mbs, self.num_micro, self.rank, self.dp = micro_batch_size, num_micro, dp_rank, dp_size
        self.seed, self.pad_id, self.shuffle, self.num_workers = seed, pad_id, shuffle, num_workers
        self.step_packs = micro_batch_size * num_micro * dp_size
        self.stream = _Stream(len(dataset), seed, shuffle)
        self.packer = Packer(param)
        self.position = 0
        self.ready: list[Pack] = []  # emitted, not yet assigned to a step
        self.pending_skips: Counter = Counter()
        self.samples: dict[int, dict] = {}  # position -> built sample, for every buffered item
        self.consumed_samples = 0  # samples in the packs handed out so far (all DP ranks)
        if max_consecutive_skips is None:
            from mindspeed_mm.data.dataset import MAX_CONSECUTIVE_SKIPS
            max_consecutive_skips = MAX_CONSECUTIVE_SKIPS
        self.max_consecutive_skips = max_consecutive_skips
        self._in_step: list[dict] = []
        self._source: Optional[Iterator] = None
        self._loader = None
        if state is not None:
            self._restore(state)

    # ---- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self._in_step:
            raise RuntimeError("the packed loader's state is only defined between steps")
        return {"version": STATE_VERSION, "position": self.position, "packer": self.packer.state(),
                "ready": [p.rows() for p in self.ready],
                "pending_skips": dict(self.pending_skips), "consumed_samples": self.consumed_samples,
                "algorithm": self.param.packing_algorithm, "seed": self.seed, "total": len(self.dataset)}

    def _restore(self, state: dict) -> None:
        if int(state.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"packed data state version {state.get('version')} is not {STATE_VERSION}")
        if state["total"] != len(self.dataset) or state["seed"] != self.seed:
            logger.warning("the data changed since the save (samples %s -> %d, seed %s -> %d): the packed "
                           "stream restarts at the saved position in the new order", state["total"],
                           len(self.dataset), state["seed"], self.seed)
        self.position = int(state["position"])
        self.packer.restore(state["packer"])
        self.ready = [Pack.from_rows(rows) for rows in state["ready"]]
        self.pending_skips = Counter(state["pending_skips"])
        self.consumed_samples = int(state["consumed_samples"])
        for pack in self.packer.buffer + self.ready:  # only the buffered samples are built again
            for it in pack.items:
                sample, reason = load_sample(self.dataset, it.index)
                if sample is None or int(sample["input_ids"].numel()) != it.tokens:
                    raise ValueError(f"resuming packed data: sample {it.index} at stream position {it.position} "
                                     f"no longer builds as saved ({reason or 'a different length'})")
                self.samples[it.position] = sample

    # ---- reading -----------------------------------------------------------------------------------------

    def _next_built(self):
        if self._source is None:
            if self.num_workers > 0:
                import os

                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._loader = torch.utils.data.DataLoader(
                    _BuildAt(self.dataset), sampler=_Positions(self.position, self.stream), batch_size=None,
                    num_workers=self.num_workers, collate_fn=_identity, persistent_workers=True)
                self._source = iter(self._loader)
            else:
                def serial(start=self.position):
                    p = start
                    while True:
                        idx = self.stream.index(p)
                        yield (p, idx, *load_sample(self.dataset, idx))
                        p += 1
                self._source = serial()
        return next(self._source)

    def _fill(self) -> None:
        """Read the stream until a step's packs are ready."""
        skips_in_row = 0
        total = len(self.dataset)
        while len(self.ready) < self.step_packs:
            position, index, sample, reason = self._next_built()
            assert position == self.position, (position, self.position)
            self.position += 1
            if sample is None:
                self.pending_skips[reason] += 1
                skips_in_row += 1
                if skips_in_row >= min(total, self.max_consecutive_skips):
                    from mindspeed_mm.errors import UserError
                    raise UserError(f"{skips_in_row} samples in a row up to stream position {position} are "
                                    f"unusable ({dict(self.pending_skips)}). Check data_path / data_folder.")
            else:
                skips_in_row = 0
                item = Item(position, index, int(sample["input_ids"].numel()), int(sample["pixel_values"].shape[0])
                            if sample.get("pixel_values") is not None else 0)
                if not self.packer.fits(item):
                    if self.param.allow_overflow:
                        self.samples[position] = sample
                        self.ready.append(Pack(items=[item], tokens=item.tokens, tiles=item.tiles))
                    else:
                        self.pending_skips[_over_reason(item, self.param)] += 1
                        logger.warning("dropping sample %d: %d tokens, %d tiles over max_packed_tokens %d / "
                                       "num_images_expected %d", index, item.tokens, item.tiles,
                                       self.param.max_packed_tokens, self.param.num_images_expected)
                else:
                    self.samples[position] = sample
                    self.ready += self.packer.add(item)
            if not self.param.replacement and self.position % total == 0:
                self.ready += self.packer.flush()  # the epoch ends: its packs do not mix with the next one's

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next step."""
        self._fill()
        packs, self.ready = self.ready[:self.step_packs], self.ready[self.step_packs:]
        tiles = [p.tiles for p in packs]
        ranks = assign_packs(tiles, [p.tokens for p in packs], self.dp)
        per_rank = [sum(tiles[i] for i in r) for r in ranks]
        imbalance = tile_imbalance(per_rank)
        mine = sorted(ranks[self.rank], key=lambda i: (-packs[i].tokens, i))
        skips, self.pending_skips = self.pending_skips, Counter()
        self.consumed_samples += sum(len(p.items) for p in packs)
        out = []
        for m in range(self.num_micro):
            chosen = [packs[i] for i in mine[m * self.mbs:(m + 1) * self.mbs]]
            rows = [[self.samples[it.position] for it in p.items] for p in chosen]
            batch = collate_packed(rows, self.pad_id, self.param.num_images_expected if self.param.strict_mode
                                   else None)
            batch["dp_tile_imbalance"] = imbalance
            batch["step_tiles"] = sum(tiles)
            batch["step_samples"] = sum(len(p.items) for p in packs)
            batch["sample_positions"] = [[it.position for it in p.items] for p in chosen]
            if m == 0 and self.rank == 0:  # each drop reported once over the DP group
                for reason, n in skips.items():
                    batch["skipped"][reason] = batch["skipped"].get(reason, 0) + n
            out.append(batch)
        for p in packs:
            for it in p.items:
                self.samples.pop(it.position, None)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._in_step:
            self._in_step = self.next_step()
        return self._in_step.pop(0)


def build_packed_loader(dataset, param: PackingParam, micro_batch_size: int, num_micro: int, dp_rank: int,
                        dp_size: int, seed: int, pad_id: int, shuffle: bool = True, num_workers: int = 0,
                        state: Optional[dict] = None) -> PackedLoader:
    return PackedLoader(dataset, param, micro_batch_size, num_micro, dp_rank, dp_size, seed, pad_id, shuffle,
                        num_workers, state)

