"""Qwen3-MoE's sparse layers on megatron-core's MoE layer, and its load-balancing loss as transformers has it.

The router is megatron's TopKRouter: softmax over the top-k logits is Qwen3-MoE's `norm_topk_prob` (softmax
over all experts, top k, renormalised), and `moe_router_pre_softmax` its other setting (top k of the softmax,
not renormalised). megatron's own auxiliary losses are per layer; transformers' `load_balancing_loss_func` is
one Switch loss over every sparse layer's tokens together:

    aux = E * sum_e (C_e / N) * (P_e / N),   C_e = sum over layers and valid tokens of [e in the token's top k]
                                              P_e = sum over layers and valid tokens of softmax(logits)_e
                                              N   = valid tokens * sparse layers

so no layer's share is known before the last one has routed. Each router records its counts and probability
sums (`MoERecorder`); the last pipeline stage has every layer's (earlier stages send theirs forward, beside the
activations, on a group of their own) and computes the loss value; its gradient, E * C_e / N^2 for every
layer's P_e, reaches each stage's routers through `_AuxGrad` on the chunk's output once the global counts are
known (the last stage sends them back). The gradient is scaled as megatron scales its aux losses (1/micro-batches,
times CP), so a run of any layout takes the step one rank takes.

Counts are over the micro-batch's tokens, whatever splits them: under sequence parallelism (TP) and CP they are
summed over the ranks holding its pieces. Padding (`padding_mask` False) counts for nothing, as transformers'
attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor


class Qwen3MoeRouter(TopKRouter):
    """megatron's top-k router that also records, per forward, what the load-balancing loss and the expert-load
    metrics need (`recorder`, set by the model chunk)."""

    recorder: Optional["MoERecorder"] = None

    def routing(self, logits: Tensor, padding_mask: Optional[Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.recorder is not None:
            probs = self.recorder.record(self.layer_number - 1, logits.view(-1, self.config.num_moe_experts),
                                         routing_map, padding_mask, probs)
        return probs, routing_map


def _token_group(parallel):
    """The ranks holding pieces of one micro-batch's sequence: TP under sequence parallelism, and CP."""
    sp, cp = parallel.sp, parallel.cp > 1
    if sp and cp:
        return parallel_state.get_tensor_and_context_parallel_group()
    if sp:
        return parallel_state.get_tensor_model_parallel_group()
    if cp:
        return parallel_state.get_context_parallel_group()
    return None


@dataclass
class _Pass:
    """One micro-batch's forward through one chunk: the carried statistics and the routers' probability sums."""
    index: int
    local: Tensor                      # [L + 2, E]: this chunk's rows (see MoERecorder.rows)
    probs: list = field(default_factory=list)  # this chunk's routers' P_e (with their graph)
    total: Optional[Tensor] = None     # every layer's rows, once known


class MoERecorder:
    """The routers' statistics of one model chunk, per micro-batch, and the load-balancing loss.

    Rows of the statistics tensor [L + 2, E] (L: the model's sparse layers): row l the tokens routed to each
    expert by sparse layer l; row L the probability sums P_e; row L+1 column 0 the valid-token count N (times
    layers). The last stage's totals give the loss (`aux_loss`) and the expert load (`load`)."""

    def __init__(self, spec, stage, parallel, carrier: Optional["StageCarrier"]):
        t = spec.text
        self.num_experts, self.layers, self.coeff = t.num_experts, t.moe_layers, t.moe_aux_loss_coeff
        self.stage, self.carrier = stage, carrier
        self.is_last = stage.has_llm_head
        self.active = False
        self.replay: Optional[_Pass] = None  # the pass whose backward runs (full recompute re-runs its routers)
        self.passes: list[_Pass] = []
        self.scale = 1.0
        self.parallel = parallel

    def rows(self, device) -> Tensor:
        return torch.zeros(len(self.layers) + 2, self.num_experts, dtype=torch.float64, device=device)

    def reset(self, scale: float) -> None:
        """A new step: `scale` the factor megatron applies to the main loss's gradient per micro-batch."""
        self.passes, self.scale = [], scale

    def begin(self, device) -> None:
        """A forward pass starts; only those that will run backward (grad enabled) are recorded, the same on every
        rank of a step, so validation and reference passes neither count nor communicate."""
        self.active, self.replay = torch.is_grad_enabled(), None
        if self.active:
            self.passes.append(_Pass(len(self.passes), self.rows(device)))

    def record(self, layer: int, logits: Tensor, routing_map: Tensor, padding_mask: Optional[Tensor],
               probs: Tensor) -> Tensor:
        """Add one router's forward to the pass's statistics; returns `probs`. Under full recompute the layer's
        first forward runs without autograd (only its counts are kept) and its re-run in backward, when the totals
        are known, takes the gradient at once (`_Inject` on the router's probs, as megatron's aux losses do)."""
        replaying = not self.active and self.replay is not None and torch.is_grad_enabled()
        if not self.active and not replaying:
            return probs
        scores = torch.softmax(logits.float(), dim=-1)
        valid = torch.ones(scores.shape[0], dtype=scores.dtype, device=scores.device) if padding_mask is None \
            else padding_mask.reshape(-1).to(scores.dtype)
        prob_sum = (scores * valid[:, None]).sum(0)
        if replaying:
            return _Inject.apply(probs, prob_sum, self.prob_grad(self.replay).to(prob_sum))
        p = self.passes[-1]
        stats = torch.cat([(routing_map.to(scores.dtype) * valid[:, None]).sum(0), prob_sum.detach(),
                           valid.sum().reshape(1)]).double()
        group = _token_group(self.parallel)
        if group is not None:
            torch.distributed.all_reduce(stats, group=group)
        e, row = self.num_experts, self.layers.index(layer)
        stats = stats.to(p.local.device)
        p.local[row] += stats[:e]
        p.local[-2] += stats[e:2 * e]
        p.local[-1, 0] += stats[-1]
        if prob_sum.requires_grad:
            p.probs.append(prob_sum)
        return probs

    def finish(self, out: Tensor) -> Tensor:
        """The chunk's output, carrying the routers' share of the loss's gradient; the statistics passed on."""
        if not self.active:
            return out
        self.active = False
        p = self.passes[-1]
        carried = self.carrier.forward(p) if self.carrier is not None else p.local
        if self.is_last:
            p.total = carried
        return _AuxGrad.apply(self, p, out, *p.probs)

    def total(self, p: _Pass) -> Tensor:
        if p.total is None:
            p.total = self.carrier.total(p)
        return p.total

    def prob_grad(self, p: _Pass) -> Tensor:
        t = self.total(p)
        n = t[-1, 0]
        counts = t[:-2].sum(0)
        return self.coeff * self.num_experts * counts / n.clamp(min=1) ** 2 * self.scale

    # ------------------------------------------------------------------------------------ last stage's figures
    @staticmethod
    def aux_value(total: Tensor, num_experts: int) -> Tensor:
        """transformers' load_balancing_loss_func from the statistics (without its coefficient)."""
        n = total[-1, 0].clamp(min=1)
        return num_experts * (total[:-2].sum(0) / n * (total[-2] / n)).sum()

    def last_report(self) -> Optional[dict]:
        """The last micro-batch's aux loss (unscaled) and expert load [L, E], on the last stage."""
        if not self.is_last or not self.passes or self.passes[-1].total is None:
            return None
        total = self.passes[-1].total
        return {"aux": self.aux_value(total, self.num_experts), "load": total[:-2].clone()}


class _AuxGrad(torch.autograd.Function):
    """Identity on the chunk's output; in backward, the load-balancing loss's gradient for each of the chunk's
    routers' probability sums (the same E * C_e / N^2 for every layer)."""

    @staticmethod
    def forward(ctx, recorder: MoERecorder, p: _Pass, out: Tensor, *probs: Tensor) -> Tensor:
        ctx.recorder, ctx.p = recorder, p
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ctx.recorder.replay = ctx.p  # the chunk's layers run their backward (and any recompute) next
        g = ctx.recorder.prob_grad(ctx.p).to(device=grad_out.device, dtype=torch.float32) if ctx.p.probs else None
        return (None, None, grad_out, *[g for _ in ctx.p.probs])


class _Inject(torch.autograd.Function):
    """Identity on a router's probs; in backward, gradient `g` for its probability sums (a recomputed router)."""

    @staticmethod
    def forward(ctx, probs: Tensor, prob_sum: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (g,) = ctx.saved_tensors
        return grad, g, None


class StageCarrier:
    """The statistics between pipeline stages: each LLM (virtual) stage adds its rows to the previous stage's and
    sends them on; the last one sends the totals back to every earlier rank once per micro-batch. Point-to-point
    on a process group of their own (`pipeline_groups`), so nothing mixes with megatron's activations."""

    def __init__(self, spec, plan, stage, group, ranks: list[int]):
        llm = [s.stage for s in plan.stages if s.has_llm]
        self.first, self.last = llm[0], llm[-1]
        self.v, self.pp, self.group, self.ranks = stage.stage, plan.parallel.pp, group, ranks
        # the ranks whose routers need the totals in backward: those holding a sparse layer before the last stage
        sparse = {v for v in llm if any(spec.text.is_moe_layer(i) for i in plan.stages[v].llm_layers)}
        self.earlier = sorted({v % self.pp for v in sparse if v != self.last} - {self.last % self.pp})
        self.pending: list = []

    def _rank(self, v: int) -> int:
        return self.ranks[v % self.pp]

    def forward(self, p: _Pass) -> Tensor:
        carried = p.local.clone()
        if self.v != self.first:
            inbox = torch.empty_like(carried)
            torch.distributed.recv(inbox, self._rank(self.v - 1), group=self.group)
            carried += inbox
        if self.v != self.last:
            sent = carried.clone()
            self.pending.append((torch.distributed.isend(sent, self._rank(self.v + 1), group=self.group), sent))
            return carried
        for r in self.earlier:
            self.pending.append((torch.distributed.isend(carried, self.ranks[r], group=self.group), carried))
        _SHARED.setdefault(id(self.group), {})[p.index] = carried
        return carried

    def total(self, p: _Pass) -> Tensor:
        """The totals of micro-batch `p.index`: received from the last stage's rank in micro-batch order (the
        first backward of each micro-batch on a rank comes in that order), shared by the rank's chunks."""
        got = _SHARED.setdefault(id(self.group), {})
        while p.index not in got:
            box = torch.zeros_like(p.local)
            torch.distributed.recv(box, self._rank(self.last), group=self.group)
            got[len(got)] = box
        return got[p.index]

    def reset(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []
        _SHARED.pop(id(self.group), None)


_SHARED: dict = {}
_GROUPS: dict = {}


def pipeline_group():
    """This rank's pipeline ranks and a process group of their own for the statistics; every rank takes part in
    making every such group (torch's rule), so this runs while the chunks are built, on all ranks."""
    if "mine" not in _GROUPS:
        mine = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        for ranks in sorted({tuple(r) for r in every}):
            g = torch.distributed.new_group(list(ranks))
            if list(ranks) == mine:
                _GROUPS["mine"] = (g, mine)
    return _GROUPS["mine"]
