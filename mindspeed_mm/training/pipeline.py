"""This rank's model chunks (`runtime.chunks`) wrapped in megatron's DDP, driven by megatron's schedules.

Everything here is the real training path; the multi-rank layout tests run it as is.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from mindspeed_mm.models.internvl.model import InternVLModel
from mindspeed_mm.training.loss import REPORT_KEY, LossMode, loss_func


def wrap_ddp(chunks: list[InternVLModel], use_distributed_optimizer: bool = False,
             loss_mode: LossMode = LossMode.DEFAULT) -> list[DistributedDataParallel]:
    """megatron's DDP around each chunk. The loss mode is fixed here: per-token loss needs gradients summed,
    not averaged, over DP (megatron divides them by the global token count afterwards)."""
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = loss_mode is LossMode.PER_TOKEN
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=use_distributed_optimizer)
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def forward_step(mode: LossMode, data_iterator, model):
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data_iterator).items()}
    output = model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                   image_flags=batch.get("image_flags"))
    return output, partial(loss_func, mode, batch["labels"])


def _check_not_all_warmup(num_chunks: int, num_microbatches: int) -> None:
    """megatron-core 0.16.1's interleaved schedule has a separate path for when every micro-batch fits in
    the warm-up phase; on gloo it deadlocks (seen at PP4 x VPP2 with 4 micro-batches, fine with 8)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if num_chunks == 1 or torch.distributed.get_backend() != "gloo":
        return
    warmup = 2 * (pp - 1) + (num_chunks - 1) * pp
    if num_microbatches * num_chunks <= warmup:
        raise ValueError(f"{num_microbatches} micro-batches at PP{pp} x VPP{num_chunks}: the interleaved schedule "
                         f"would run them all in warm-up, which hangs on gloo; use more than "
                         f"{warmup // num_chunks} micro-batches per step")


def forward_backward(model: list, microbatches: list[dict], forward_only: bool = False,
                     per_sample_loss: bool = False) -> list[Tensor]:
    """Run megatron's schedule (no pipelining, 1F1B or interleaved, by the layout) over `microbatches`;
    returns the micro-batch loss reports `[numerator, denominator]` on the last pipeline stage, [] elsewhere
    (see training/loss.py). Per-token loss is the mode `wrap_ddp` fixed; per-sample is asked for here."""
    per_token = model[0].config.calculate_per_token_loss
    mode = LossMode.PER_TOKEN if per_token else LossMode.PER_SAMPLE if per_sample_loss else LossMode.DEFAULT
    _check_not_all_warmup(len(model), len(microbatches))
    for m in model:
        m.zero_grad_buffer() if hasattr(m, "zero_grad_buffer") else m.zero_grad()
    iterators = [iter(microbatches) for _ in model]
    first = microbatches[0]["input_ids"]
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, mode),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    )
    return [x[REPORT_KEY] for x in losses]


def microbatch_losses(reports: list[Tensor]) -> list[float]:
    return [float(r[0] / r[1]) for r in reports]


def train_step(model: list, optimizer, microbatches: list[dict], per_sample_loss: bool = False
               ) -> tuple[list[Tensor], float | None]:
    """One optimizer step over `microbatches`: the micro-batch loss reports (last stage) and the grad norm.

    The optimizer's own zero_grad matters as much as the DDP buffer's: megatron's optimizers point
    `param.grad` at the gradient buffer, and a stale `param.grad` makes the next backward add the new
    gradient to the buffer twice."""
    optimizer.zero_grad()
    losses = forward_backward(model, microbatches, per_sample_loss=per_sample_loss)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        # fp16 with a dynamic loss scale skips a step on overflow and lowers the scale: expected, reported
        # as grad norm None. Without a loss scaler an overflow means the weights would turn to NaN.
        if getattr(optimizer, "grad_scaler", None) is None or optimizer.config.loss_scale is not None:
            raise FloatingPointError("gradients are not finite (inf/NaN); the step was not applied")
        return losses, None
    return losses, grad_norm


def local_tensors(chunks: Iterable, what: str) -> dict[int, dict[str, Tensor]]:
    """{stage: {local name: tensor}} of this rank's parameters (`what="param"`) or gradients ("grad")."""
    out = {}
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        tensors = {}
        for name, p in module.named_parameters():
            if what == "param":
                tensors[name] = p.detach().clone()
            elif p.requires_grad:
                g = getattr(p, "main_grad", None)
                tensors[name] = (g if g is not None else p.grad).detach().clone()
        out[module.stage.stage] = tensors
    return out
