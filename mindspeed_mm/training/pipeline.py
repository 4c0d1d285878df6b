"""This rank's model chunks (`runtime.chunks`) wrapped in megatron's DDP, driven by megatron's schedules.

Everything here is the real training path; the multi-rank layout tests run it as is.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from mindspeed_mm.models.internvl.model import InternVLModel
from mindspeed_mm.training.loss import REPORT_KEY, LossMode, loss_func

MOE_KEY = "moe"  # a sparse LLM's last stage reports its micro-batch's load-balancing loss and expert load here


# Tied embeddings on two stages, as megatron-core keeps them: the LLM's first stage holds the token embeddings,
# the last stage a copy as its output layer. Both start equal, their gradients are summed over megatron's
# embedding group (one per TP rank and DP replica: the pipeline ranks holding them, built for the layout by
# distributed.initialize_model_parallel) and both take the same optimizer step, so they stay identical. megatron
# does the sum in finalize_model_grads, on the chunks it takes by pipeline position (model[0] on the first rank,
# model[-1] on the last), and the copy at construction likewise: with the ViT first the LLM's first stage may be
# a later rank, a later chunk or a chunk of the last rank, so this module does both, on the chunks the layout
# names (InternVLModel.tied_embedding_copy); megatron's own find nothing (InternVLModel sets
# share_embeddings_and_output_weights False). Here rather than in the model: it is the training loop's step.

def _unwrap(model):
    """The InternVLModel under megatron's DDP wrapper (or the chunk itself)."""
    return model.module if hasattr(model, "module") else model


def _sum_tied_copies(tensors: list[Tensor], group) -> None:
    """Sum `tensors` (this rank's copies: one, or both when one rank holds the two chunks) with the other
    rank's over `group`, and write the sum into each."""
    total = tensors[0]
    for t in tensors[1:]:
        total.add_(t)
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(total, group=group)
    for t in tensors[1:]:
        t.copy_(total)


def _tied_copies(model: list) -> list[tuple[torch.nn.Parameter, bool]]:
    """This rank's copies of tied embeddings held on two stages, each with whether it is the output layer's."""
    chunks = [_unwrap(m) for m in model]
    return [(w, c.stage.has_tied_output) for c in chunks if (w := c.tied_embedding_copy()) is not None]


def sync_tied_embedding_weights(chunks: list[InternVLModel]) -> None:
    """The output layer's copy set to the LLM's first stage's embeddings (megatron's construction-time copy:
    zero the copy, sum), for megatron's random initialisation; loaded checkpoints hold both already."""
    copies = _tied_copies(chunks)
    if copies:
        with torch.no_grad():
            for w, is_output in copies:
                if is_output:
                    w.zero_()
            _sum_tied_copies([w.data for w, _ in copies], parallel_state.get_embedding_group())


def finalize_model_grads(model: list, num_tokens: Tensor | None = None, pg_collection=None,
                         force_all_reduce: bool = False) -> None:
    """megatron's finalize_model_grads (DP all-reduce or reduce-scatter, TP-duplicated norms, per-token
    scaling), then the tied embeddings' gradients summed over their copies. The sum comes after megatron's
    reduce-scatter, as megatron's own does: both copies have a bucket of their own (`shared_embedding`), so
    every DP rank owns the same rows of each; and after its per-token scaling, which is linear."""
    megatron_finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    copies = [w for w, _ in _tied_copies(model) if w.requires_grad]  # a frozen LLM: no copy on any rank
    if copies:
        group = pg_collection.embd if pg_collection is not None else parallel_state.get_embedding_group()
        _sum_tied_copies([w.main_grad if hasattr(w, "main_grad") else w.grad for w in copies], group)


def wrap_ddp(chunks: list[InternVLModel], use_distributed_optimizer: bool = False,
             loss_mode: LossMode = LossMode.DEFAULT) -> list[DistributedDataParallel]:
    """megatron's DDP around each chunk. The loss mode is fixed here: per-token loss needs gradients summed,
    not averaged, over DP (megatron divides them by the global token count afterwards)."""
    sync_tied_embedding_weights(chunks)
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


def next_batch(data_iterator, model) -> dict:
    """The next micro-batch, its tensors on the chunk's device."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data_iterator).items()}


def run_chunk(model, batch: dict):
    """This stage's chunk on a micro-batch: the masked per-token loss on the last stage."""
    return model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                 image_flags=batch.get("image_flags"), sample_ids=batch.get("sample_ids"),
                 attention_mask=batch.get("attention_mask"))


def with_moe_report(model, loss_fn):
    """`loss_fn` whose report also carries the chunk's last micro-batch's load-balancing loss (times its
    coefficient) and expert load, on a sparse LLM's last stage; `loss_fn` itself elsewhere."""
    recorder = getattr(_unwrap(model), "moe_recorder", None)
    report = recorder.last_report() if recorder is not None else None
    if report is None:
        return loss_fn

    def fn(output_tensor):
        *out, reports = loss_fn(output_tensor)
        return (*out, {**reports, MOE_KEY: {"aux": recorder.coeff * report["aux"], "load": report["load"]}})
    return fn


def forward_step(mode: LossMode, data_iterator, model, all_gather: bool = False):
    """One micro-batch through this stage's chunk. Every stage reads the whole micro-batch, a packed one's
    `sample_ids` included (each LLM stage builds its attention mask and RoPE positions from them)."""
    batch = next_batch(data_iterator, model)
    out = run_chunk(model, batch)
    return out, with_moe_report(model, partial(loss_func, mode, batch["labels"], sample_ids=batch.get("sample_ids"),
                                               all_gather=all_gather))


def start_moe_step(model: list, num_microbatches: int, per_token: bool) -> None:
    """Every sparse chunk's statistics start over; the load-balancing loss's gradient takes the scale megatron
    gives its own aux losses (the main loss's per micro-batch: 1/micro-batches, times CP; 1 with per-token
    loss, whose gradients megatron divides by the token count afterwards)."""
    cp = parallel_state.get_context_parallel_world_size()
    for m in model:
        recorder = getattr(_unwrap(m), "moe_recorder", None)
        if recorder is not None:
            recorder.reset(1.0 if per_token else cp / num_microbatches)
            if recorder.carrier is not None:
                recorder.carrier.reset()


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
                     per_sample_loss: bool = False, loss_mode: LossMode | None = None,
                     all_gather: bool = False, step=None, full_reports: bool = False) -> list:
    """Run megatron's schedule (no pipelining, 1F1B or interleaved, by the layout) over `microbatches`;
    returns the micro-batch loss reports `[numerator, denominator]` on the last pipeline stage, [] elsewhere
    (see training/loss.py). Per-token loss is the mode `wrap_ddp` fixed; per-sample (or `loss_mode`, e.g.
    square) is asked for here, with InternVL's `loss_reduction_all_gather` as `all_gather`. `step` replaces
    `forward_step` (same arguments) and `full_reports` returns the loss functions' whole report dicts: the tests
    report more through them."""
    per_token = model[0].config.calculate_per_token_loss
    if loss_mode is not None and (loss_mode is LossMode.PER_TOKEN) != per_token:
        raise ValueError(f"loss mode {loss_mode.value} but the model was wrapped for "
                         f"{'per-token' if per_token else 'another'} loss (wrap_ddp)")
    mode = LossMode.PER_TOKEN if per_token else loss_mode or (
        LossMode.PER_SAMPLE if per_sample_loss else LossMode.DEFAULT)
    _check_not_all_warmup(len(model), len(microbatches))
    start_moe_step(model, len(microbatches), per_token)
    for m in model if not forward_only else ():  # a forward-only pass (validation) leaves the gradients alone
        m.zero_grad_buffer() if hasattr(m, "zero_grad_buffer") else m.zero_grad()
    iterators = [iter(microbatches) for _ in model]
    first = microbatches[0]["input_ids"]
    losses = get_forward_backward_func()(
        forward_step_func=partial(step or forward_step, mode, all_gather=all_gather),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    )
    if full_reports:
        return losses
    return [x[REPORT_KEY] for x in losses]


def moe_reports(reports: list) -> list[dict]:
    """The sparse LLM's per-micro-batch figures from `forward_backward(..., full_reports=True)`'s reports."""
    return [x[MOE_KEY] for x in reports if MOE_KEY in x]


def _eval_forward_step(mode: LossMode, data_iterator, model, all_gather: bool = False):
    """`forward_step` with the per-token loss function whatever the run's mode: a validation loss is the
    token mean over every validation token, so it reports [loss sum, target count] per micro-batch."""
    return forward_step(LossMode.PER_TOKEN, data_iterator, model)


def evaluate(model: list, batches: Iterable[list[dict]], step=_eval_forward_step, full_reports: bool = False) -> list:
    """Forward only, over each global batch of `batches` (this DP rank's micro-batches), through the same
    schedule as training: the per-micro-batch reports (by default [target-token loss sum, target count]; `step`
    and `full_reports` as `forward_backward`'s) on the last pipeline stage, [] elsewhere. Dropout and drop path
    off (eval mode) and no autograd graph; every module's own mode is restored afterwards, a module kept in eval
    by the run included."""
    modes = [(m, m.training) for chunk in model for m in chunk.modules()]
    for chunk in model:
        chunk.eval()
    reports = []
    try:
        with torch.no_grad():
            for microbatches in batches:
                reports += forward_backward(model, microbatches, forward_only=True, step=step,
                                            full_reports=full_reports)
    finally:
        for m, training in modes:
            m.training = training
    return reports


def microbatch_losses(reports: list[Tensor]) -> list[float]:
    return [float(r[0] / r[1]) for r in reports]


def train_step(model: list, optimizer, microbatches: list[dict], per_sample_loss: bool = False,
               loss_mode: LossMode | None = None, all_gather: bool = False, step=None,
               full_reports: bool = False) -> tuple[list, float | None]:
    """One optimizer step over `microbatches`: the micro-batch loss reports (last stage) and the grad norm.
    `step` and `full_reports` as `forward_backward`'s (preference training's loss function).

    The optimizer's own zero_grad matters as much as the DDP buffer's: megatron's optimizers point
    `param.grad` at the gradient buffer, and a stale `param.grad` makes the next backward add the new
    gradient to the buffer twice."""
    optimizer.zero_grad()
    losses = forward_backward(model, microbatches, per_sample_loss=per_sample_loss, loss_mode=loss_mode,
                              all_gather=all_gather, step=step, full_reports=full_reports)
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
        module = _unwrap(chunk)
        tensors = {}
        for name, p in module.named_parameters():
            if what == "param":
                tensors[name] = p.detach().clone()
            elif p.requires_grad:
                g = getattr(p, "main_grad", None)
                tensors[name] = (g if g is not None else p.grad).detach().clone()
        out[module.stage.stage] = tensors
    return out
