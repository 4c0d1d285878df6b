"""The three loss modes of the reference recipe, as loss functions for megatron's schedules.

The model's last stage returns the masked per-token loss ``[b, s_local]`` (``s_local``: this CP rank's share of
the padded sequence). Every mode reduces it so that, summed over CP ranks, it is the value the mode defines:

- ``default``: the micro-batch's mean over its target tokens; megatron then averages over micro-batches and DP.
- ``per_sample``: each sample's mean over its own target tokens, then the mean over the micro-batch's samples.
- ``per_token``: the sum over target tokens, returned with the token count; megatron divides every gradient by
  the global batch's count (``calculate_per_token_loss``), so the step does not depend on how the global batch
  is cut into micro-batches or DP shares.

Each loss function also reports ``[numerator, denominator]`` for logging; the step's loss is the sum of the
numerators over the step's micro-batches and DP ranks divided by the sum of the denominators.
"""
from __future__ import annotations

from enum import Enum

import torch
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.models.internvl.model import mean_loss, shift_labels

__all__ = ["LossMode", "loss_func", "reduce_reported"]

REPORT_KEY = "lm loss"


class LossMode(str, Enum):
    DEFAULT = "default"
    PER_SAMPLE = "per_sample"
    PER_TOKEN = "per_token"

    @classmethod
    def from_flags(cls, per_sample: bool, per_token: bool) -> "LossMode":
        if per_sample and per_token:
            raise ValueError("per-sample and per-token loss are mutually exclusive")
        return cls.PER_SAMPLE if per_sample else cls.PER_TOKEN if per_token else cls.DEFAULT


def _cp_sum(t: Tensor) -> Tensor:
    if parallel_state.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=parallel_state.get_context_parallel_group())
    return t


def loss_func(mode: LossMode, labels: Tensor, per_token_loss: Tensor):
    """Loss function for `forward_step_func` (labels: the micro-batch's unsplit, unpadded labels)."""
    if mode is LossMode.PER_TOKEN:
        total = per_token_loss.sum()
        cp = parallel_state.get_context_parallel_world_size()
        # this CP rank's share of the count: megatron all-reduces the counts over DP x CP
        count = shift_labels(labels).loss_mask.sum() if cp == 1 else _local_target_count(labels, per_token_loss)
        reported = _cp_sum(torch.stack([total.detach().clone(), count.detach().float().clone()]))
        return total, count.to(torch.int), {REPORT_KEY: reported}
    if mode is LossMode.PER_SAMPLE:
        per_sample_count = shift_labels(labels).loss_mask.sum(1)  # [b], over the whole sequence
        has_target = per_sample_count > 0
        per_sample = per_token_loss.sum(1) / per_sample_count.clamp(min=1)
        loss = per_sample[has_target].sum() / has_target.sum().clamp(min=1)
    else:
        loss = mean_loss(per_token_loss, labels)
    # one micro-batch, however many CP ranks contributed shares of its loss
    reported = torch.stack([_cp_sum(loss.detach().clone()), torch.ones((), device=loss.device)])
    return loss, {REPORT_KEY: reported}


def _local_target_count(labels: Tensor, per_token_loss: Tensor) -> Tensor:
    """Target tokens in this CP rank's share of the sequence (the zigzag split of the shifted loss mask)."""
    from mindspeed_mm.parallel.context_parallel import zigzag_split

    mask = shift_labels(labels).loss_mask
    pad = per_token_loss.shape[1] * parallel_state.get_context_parallel_world_size() - mask.shape[1]
    mask = torch.nn.functional.pad(mask, (0, pad))
    cp = parallel_state.get_context_parallel_world_size()
    return zigzag_split(mask, cp, parallel_state.get_context_parallel_rank(), 1).sum()


def reduce_reported(reported: list[Tensor]) -> float:
    """The step's loss from the last stage's reports, summed over micro-batches and data-parallel ranks;
    call it on every rank of the DP group (NaN on ranks that are not the last pipeline stage)."""
    if not reported:
        return float("nan")
    total = torch.stack([r.float() for r in reported]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1e-12))
