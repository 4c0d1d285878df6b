"""The loss modes of the reference recipe and InternVL's, as loss functions for megatron's schedules.

The model's last stage returns the masked per-token loss ``[b, s_local]`` (``s_local``: this CP rank's share of
the padded sequence). Every mode reduces it so that, summed over CP ranks, it is the value the mode defines:

- ``default``: the micro-batch's mean over its target tokens; megatron then averages over micro-batches and DP.
- ``per_sample``: each sample's mean over its own target tokens, then the mean over the micro-batch's samples.
- ``per_token``: the sum over target tokens, returned with the token count; megatron divides every gradient by
  the global batch's count (``calculate_per_token_loss``), so the step does not depend on how the global batch
  is cut into micro-batches or DP shares.
- ``square`` (InternVL's ``loss_reduction square``): each target token weighted by 1/sqrt(n), n its sample's
  target-token count, and the micro-batch's loss the weighted sum over the weights' sum
  (sum_i sum_t ce_it / sqrt(n_i)) / (sum_i sqrt(n_i)); megatron then averages over micro-batches and DP.

A sample is a row of an unpacked micro-batch, or one run of `sample_ids` in a packed one (each sample's last
token predicts nothing there: `shift_labels`), so every mode gives a pack the value its samples give unpacked.

``all_gather`` (InternVL's ``loss_reduction_all_gather``, for default, per_sample and square): the micro-batch's
denominator (target tokens, samples, weights' sum) is averaged over the data-parallel ranks before dividing, so the
DP-averaged step loss is the weighted mean over every DP rank's micro-batch of that step, not the mean of each
rank's mean.

Each loss function also reports ``[numerator, denominator]`` for logging; the step's loss is the sum of the
numerators over the step's micro-batches and DP ranks divided by the sum of the denominators.
"""
from __future__ import annotations

from enum import Enum

import torch
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.models.internvl.model import mean_loss, shift_labels

__all__ = ["LossMode", "local_share", "loss_func", "reduce_reported", "sample_segments", "sample_target_counts",
           "square_weights"]

REPORT_KEY = "lm loss"
# InternVL's --loss_reduction values
LOSS_REDUCTIONS = ("token", "sample", "square")


class LossMode(str, Enum):
    DEFAULT = "default"
    PER_SAMPLE = "per_sample"
    PER_TOKEN = "per_token"
    SQUARE = "square"

    @classmethod
    def from_flags(cls, per_sample: bool, per_token: bool, loss_reduction: str | None = None) -> "LossMode":
        """The Megatron flags and InternVL's `loss_reduction` (token: the default or, with per-token loss, per
        token; sample: per sample; square)."""
        if per_sample and per_token:
            raise ValueError("per-sample and per-token loss are mutually exclusive")
        if loss_reduction not in (None, *LOSS_REDUCTIONS):
            raise ValueError(f"loss reduction {loss_reduction!r}: expected one of {LOSS_REDUCTIONS}")
        if loss_reduction in ("sample", "square") and per_token:
            raise ValueError(f"--loss-reduction {loss_reduction} and --calculate-per-token-loss are mutually exclusive")
        if loss_reduction in ("token", "square") and per_sample:
            raise ValueError(f"--loss-reduction {loss_reduction} and --calculate-per-sample-loss are mutually "
                             "exclusive")
        if loss_reduction == "square":
            return cls.SQUARE
        if per_sample or loss_reduction == "sample":
            return cls.PER_SAMPLE
        return cls.PER_TOKEN if per_token else cls.DEFAULT


def cp_sum(t: Tensor) -> Tensor:
    if parallel_state.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=parallel_state.get_context_parallel_group())
    return t


def _dp_mean(t: Tensor) -> Tensor:
    """`t` averaged over the data-parallel ranks (InternVL's all-reduce AVG of the weights' sum)."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        t = t.detach().clone()
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        t = t / dp
    return t


def sample_segments(labels: Tensor, sample_ids: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """(target mask [b, s] float, sample index [b, s] of each position's target, number of samples): rows are the
    samples of an unpacked micro-batch, runs of `sample_ids` those of a packed one."""
    mask = shift_labels(labels, sample_ids).loss_mask
    b, s = labels.shape
    if sample_ids is None:
        return mask, torch.arange(b, device=labels.device).unsqueeze(1).expand(b, s), b
    ids = sample_ids.to(labels.device)
    per_row = int(ids.max()) + 1 if ids.numel() else 0
    return mask, torch.arange(b, device=labels.device).unsqueeze(1) * per_row + ids.clamp(min=0), b * per_row


def sample_target_counts(labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    """Each sample's target-token count (packed: in row-major order, every row numbered to its longest pack)."""
    mask, seg, n = sample_segments(labels, sample_ids)
    return torch.zeros(n, device=labels.device).index_add_(0, seg.reshape(-1), mask.reshape(-1))


def square_weights(labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    """InternVL's square weights [b, s]: 1/sqrt(n) on each target of a sample with n targets, 0 elsewhere."""
    mask, seg, n = sample_segments(labels, sample_ids)
    counts = torch.zeros(n, device=labels.device).index_add_(0, seg.reshape(-1), mask.reshape(-1))
    w = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    return w[seg] * mask


def local_share(t: Tensor, per_token_loss: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    """This CP rank's share of a [b, s] tensor over the unpadded sequence (padded as the model pads, then the
    zigzag split; a pack, `sample_ids` given, split sample by sample: `PackedLayout`), the positions of
    `per_token_loss`; 0 on the model's pads."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1 and sample_ids is not None:
        from mindspeed_mm.parallel.context_parallel import PackedLayout

        layout = PackedLayout(sample_ids.to(t.device), cp, length=per_token_loss.shape[1] * cp)
        return layout.local(layout.pad(t, 0), parallel_state.get_context_parallel_rank(), 1)
    pad = per_token_loss.shape[1] * cp - t.shape[1]
    t = torch.nn.functional.pad(t, (0, pad))
    if cp == 1:
        return t
    from mindspeed_mm.parallel.context_parallel import zigzag_split

    return zigzag_split(t, cp, parallel_state.get_context_parallel_rank(), 1)


def loss_func(mode: LossMode, labels: Tensor, per_token_loss: Tensor, sample_ids: Tensor | None = None,
              all_gather: bool = False):
    """Loss function for `forward_step_func` (labels, sample_ids: the micro-batch's unsplit, unpadded ones;
    `sample_ids` only for a packed micro-batch)."""
    if mode is LossMode.PER_TOKEN:
        total = per_token_loss.sum()
        cp = parallel_state.get_context_parallel_world_size()
        # this CP rank's share of the count: megatron all-reduces the counts over DP x CP
        count = (shift_labels(labels, sample_ids).loss_mask.sum() if cp == 1
                 else _local_target_count(labels, per_token_loss, sample_ids))
        reported = cp_sum(torch.stack([total.detach().clone(), count.detach().float().clone()]))
        return total, count.to(torch.int), {REPORT_KEY: reported}
    if mode is LossMode.SQUARE:
        weights = square_weights(labels, sample_ids)
        denominator = weights.sum()
        if all_gather:
            denominator = _dp_mean(denominator)
        loss = (per_token_loss * local_share(weights, per_token_loss, sample_ids)).sum() / denominator.clamp(min=1e-12)
    elif mode is LossMode.PER_SAMPLE and sample_ids is not None:
        mask, seg, n = sample_segments(labels, sample_ids)
        counts = torch.zeros(n, device=labels.device).index_add_(0, seg.reshape(-1), mask.reshape(-1))
        local_seg = local_share(seg, per_token_loss, sample_ids).reshape(-1)
        sums = torch.zeros(n, device=per_token_loss.device, dtype=per_token_loss.dtype).index_add(
            0, local_seg, per_token_loss.reshape(-1))
        has_target = counts > 0
        denominator = has_target.sum().float()
        if all_gather:
            denominator = _dp_mean(denominator)
        loss = (sums / counts.clamp(min=1))[has_target].sum() / denominator.clamp(min=1)
    elif mode is LossMode.PER_SAMPLE:
        per_sample_count = shift_labels(labels).loss_mask.sum(1)  # [b], over the whole sequence
        has_target = per_sample_count > 0
        per_sample = per_token_loss.sum(1) / per_sample_count.clamp(min=1)
        denominator = has_target.sum()
        if all_gather:
            denominator = _dp_mean(denominator.float())
        loss = per_sample[has_target].sum() / denominator.clamp(min=1)
    elif all_gather:
        loss = per_token_loss.sum() / _dp_mean(shift_labels(labels, sample_ids).loss_mask.sum()).clamp(min=1)
    else:
        loss = mean_loss(per_token_loss, labels, sample_ids)
    # one micro-batch, however many CP ranks contributed shares of its loss
    reported = torch.stack([cp_sum(loss.detach().clone()), torch.ones((), device=loss.device)])
    return loss, {REPORT_KEY: reported}


def _local_target_count(labels: Tensor, per_token_loss: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    """Target tokens in this CP rank's share of the sequence (the zigzag split of the shifted loss mask)."""
    return local_share(shift_labels(labels, sample_ids).loss_mask, per_token_loss, sample_ids).sum()


def reduce_reported(reported: list[Tensor]) -> float:
    """The step's loss from the last stage's reports, summed over micro-batches and data-parallel ranks;
    call it on every rank of the DP group (NaN on ranks that are not the last pipeline stage)."""
    if not reported:
        return float("nan")
    total = torch.stack([r.float() for r in reported]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1e-12))
