"""Which samples each data-parallel rank reads, resumable at any global sample count.

The global sample stream is a sequence of epochs; epoch ``e`` is a permutation of the dataset seeded with
``seed + e`` (the reference seeds with the epoch alone and ignores ``--seed``). Global micro-batch ``k`` is the
stream's positions ``[k*G, (k+1)*G)`` with ``G = micro_batch_size * dp_size``, and DP rank ``r`` reads its
``r``-th block of ``micro_batch_size`` of them. ``consumed_samples`` is a position in that stream, so resuming
from a checkpoint's count continues exactly where the run stopped, across epoch boundaries too.

``drop_last=True`` (the reference): each epoch is cut to a multiple of ``G``, so a micro-batch never mixes two
epochs. ``drop_last=False``: no sample is dropped; the last micro-batch of an epoch continues into the next
one, and the stream no longer depends on ``G`` (a resume at another DP size sees the same sample order).
The sampler is endless: the training loop decides when to stop. ``order`` (epoch -> a permutation of the
dataset) replaces the shuffle, e.g. ``group_by_length``'s (:func:`~mindspeed_mm.data.mixture.length_grouped_order`).
Nothing depends on the positions before ``consumed_samples``: resuming computes the epoch's order and starts there.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import torch

from mindspeed_mm.data.collate import collate_internvl

__all__ = ["ResumableBatchSampler", "build_dataloader", "epoch_permutation"]


def epoch_permutation(total: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of ``total`` samples: the one shuffle the sampler, the packer and
    ``group_by_length`` all start from."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True, drop_last: bool = True, order=None):
        if total_samples < 1 or micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"need total_samples, micro_batch_size, dp_size >= 1, got {total_samples}, "
                             f"{micro_batch_size}, {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.global_batch = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % self.global_batch:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size x "
                             f"dp_size = {self.global_batch}")
        self.epoch_len = total_samples // self.global_batch * self.global_batch if drop_last else total_samples
        if self.epoch_len == 0:
            raise ValueError(f"{total_samples} samples make no full micro-batch of {micro_batch_size} on each of "
                             f"{dp_size} DP ranks (drop_last)")
        self.total, self.mbs, self.rank, self.seed = total_samples, micro_batch_size, dp_rank, seed
        self.consumed, self.shuffle = consumed_samples, shuffle
        self._epoch, self._order, self.order = -1, None, order

    def _at(self, position: int) -> int:
        """The dataset index at global stream ``position``."""
        epoch, offset = divmod(position, self.epoch_len)
        if not self.shuffle and self.order is None:
            return offset
        if epoch != self._epoch:
            self._epoch, self._order = epoch, (self.order(epoch) if self.order is not None
                                               else epoch_permutation(self.total, self.seed, epoch))
        return self._order[offset]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed + self.rank * self.mbs
        while True:
            yield [self._at(position + i) for i in range(self.mbs)]
            position += self.global_batch


def build_dataloader(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                     consumed_samples: int, num_workers: int, pad_id: int, shuffle: bool = True,
                     drop_last: bool = True, pin_memory: bool = False, order=None) -> torch.utils.data.DataLoader:
    """An endless loader of this DP rank's collated micro-batches (:func:`collate_internvl`), resumed at
    ``consumed_samples``. Samples are seeded by index, so any ``num_workers`` yields the same batches."""
    sampler = ResumableBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, seed, consumed_samples,
                                    shuffle, drop_last, order)
    if num_workers > 0:
        # The tokenizer was used in this process before the fork; its thread pool must not be shared.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_internvl, pad_id=pad_id),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
