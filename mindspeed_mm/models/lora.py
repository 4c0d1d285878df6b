"""LoRA on megatron-core's tensor-parallel linears, built into the layer specs (no module replaced afterwards).

An adapted linear computes ``W x + s * B A dropout(x)`` with ``s = alpha / rank``, PEFT's formula. Under tensor
parallelism, as PEFT's LoraParallelLinear splits it:

- column-parallel (this rank holds output rows of W): A whole on every rank, B split with the output rows.
  ``h = A x`` is the same on every rank; its gradient there is partial (this rank's rows of B only) and is
  summed over TP on the way back (``copy_to_tensor_model_parallel_region``). Under sequence parallelism x is
  this rank's part of the sequence: h is gathered over the sequence instead (backward: reduce-scatter), and
  A's gradient, from this rank's tokens only, is summed over TP by megatron with the sequence-parallel norms'
  (``param.sequence_parallel``);
- row-parallel (this rank holds input columns): A split with the input columns, B whole. ``h = A_r x_r`` is
  partial and is summed over TP (under SP: reduce-scattered over the sequence, and B's gradient summed like A's
  above).

A fused linear (the qkv, the LLM's gate/up) holds one adapter pair per part, as transformers' separate q, k, v
(gate, up) linears have under PEFT: ``lora_a_q``, ``lora_b_q``, ... Its output rows are the parts in order
(`parts`), repeated `groups` times (the LLM's qkv: [q; k; v] per query group); a part without an adapter adds
nothing to its rows. B's split rows are the part's rows on this rank, whatever split the weight has (the
ViT's unaligned heads included), because they are cut from the linear's own local size.

Dropout is applied once to the input of a linear's adapters (PEFT draws one mask per HF linear: the same in
expectation, and identical with dropout 0 or in eval).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from mindspeed_mm.config.model_spec import LoraSpec

__all__ = ["LoRAColumnParallelLinear", "LoRARowParallelLinear", "kaiming_uniform_like_peft"]


def kaiming_uniform_like_peft(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's default init of A (``kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(fan_in)), drawn from
    `generator` for the full matrix, so every layout starts from the same adapters."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).float()


class _Adapters:
    """What the two LoRA linears share: the settings, the dropout and the parameter bookkeeping."""

    def _setup(self, lora: LoraSpec, suffixes: tuple[str, ...], adapted: tuple[bool, ...]) -> None:
        self.lora_rank, self.lora_scaling = lora.rank, lora.scaling
        self.lora_suffixes, self.lora_adapted = suffixes, adapted
        self.lora_dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else torch.nn.Identity()
        self.lora_merged = False
        self.lora_disabled = False  # the base alone: the reference model of preference training

    def _new(self, name: str, shape: tuple[int, int], split_dim: Optional[int], sequence_parallel: bool) -> None:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=self.config.params_dtype,
                                           device=self.weight.device))
        # megatron counts a TP-split tensor on every rank and a replicated one once (grad norm, clipping)
        tensor_parallel.set_tensor_model_parallel_attributes(p, split_dim is not None, split_dim or 0, 1)
        if sequence_parallel:
            p.sequence_parallel = True
        self.register_parameter(name, p)

    def lora_parameters(self, ab: str) -> list[Tensor]:
        return [getattr(self, f"lora_{ab}{s}") for s, on in zip(self.lora_suffixes, self.lora_adapted) if on]

    def merge_lora_(self) -> None:
        """W += s * B A (this rank's slice) and drop the adapters: inference then runs the plain linear."""
        with torch.no_grad():  # in fp32, then rounded once: what mm-convert's merged export writes
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        for s, on in zip(self.lora_suffixes, self.lora_adapted):
            if on:
                delattr(self, f"lora_a{s}")
                delattr(self, f"lora_b{s}")
        self.lora_merged = True


class LoRAColumnParallelLinear(_Adapters, ColumnParallelLinear):
    """ColumnParallelLinear with LoRA. `suffixes`: the parts of the output rows in order ("" for one part),
    `adapted`: which carry an adapter; `interleave`: the parts repeat once per query group on this rank (the
    LLM's fused qkv: q rows = heads per group x head dim, k and v one head dim), else each part is an equal
    share of the rows, once."""

    def __init__(self, input_size: int, output_size: int, *, config, lora: LoraSpec,
                 suffixes: tuple[str, ...] = ("",), adapted: tuple[bool, ...] = (True,), interleave: bool = False,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._setup(lora, suffixes, adapted)
        out = self.output_size_per_partition
        if interleave:
            d = config.kv_channels
            per_group = (config.num_attention_heads // config.num_query_groups * d, d, d)
            self.lora_groups, self.lora_rows = out // sum(per_group), per_group
        else:
            self.lora_groups, self.lora_rows = 1, (out // len(suffixes),) * len(suffixes)
        assert self.lora_groups * sum(self.lora_rows) == out, (out, self.lora_rows)
        sp = self.sequence_parallel
        for s, on, rows in zip(suffixes, adapted, self.lora_rows):
            if on:
                self._new(f"lora_a{s}", (lora.rank, input_size), None, sp)
                self._new(f"lora_b{s}", (self.lora_groups * rows, lora.rank), 0, False)

    def _assemble(self, pieces: list[Optional[Tensor]], lead: tuple[int, ...], like: Tensor) -> Tensor:
        """This rank's fused rows from each part's rows (None: zeros), along the last dim."""
        g = self.lora_groups
        cols = [p.reshape(*lead, g, rows) if p is not None else like.new_zeros(*lead, g, rows)
                for p, rows in zip(pieces, self.lora_rows)]
        return (torch.cat(cols, -1) if len(cols) > 1 else cols[0]).flatten(-2)

    def forward(self, input_: Tensor, weight: Optional[Tensor] = None, runtime_gather_output: Optional[bool] = None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        if self.lora_merged or self.lora_disabled:
            return out, bias
        a = self.lora_parameters("a")
        h = F.linear(self.lora_dropout(input_), torch.cat(a) if len(a) > 1 else a[0])
        if self.sequence_parallel:
            h = tensor_parallel.gather_from_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        hs = iter(h.split(self.lora_rank, dim=-1))
        pieces = [F.linear(next(hs), getattr(self, f"lora_b{s}")) if on else None
                  for s, on in zip(self.lora_suffixes, self.lora_adapted)]
        return out + self.lora_scaling * self._assemble(pieces, tuple(h.shape[:-1]), h).to(out.dtype), bias

    def delta_weight(self) -> Tensor:
        """s * B A for this rank's rows of W (out_local x in)."""
        pieces = [getattr(self, f"lora_b{s}").float() @ getattr(self, f"lora_a{s}").float() if on else None
                  for s, on in zip(self.lora_suffixes, self.lora_adapted)]
        like = self.weight.float()
        # _assemble works on the last dim: put W's rows there and back
        t = self._assemble([p.t() if p is not None else None for p in pieces], (like.shape[1],), like)
        return self.lora_scaling * t.t()


class LoRARowParallelLinear(_Adapters, RowParallelLinear):
    """RowParallelLinear with LoRA (one part)."""

    def __init__(self, input_size: int, output_size: int, *, config, lora: LoraSpec, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._setup(lora, ("",), (True,))
        self._new("lora_a", (lora.rank, self.input_size_per_partition), 1, False)
        self._new("lora_b", (output_size, lora.rank), None, self.sequence_parallel)

    def forward(self, input_: Tensor):
        out, bias = super().forward(input_)
        if self.lora_merged or self.lora_disabled:
            return out, bias
        h = F.linear(self.lora_dropout(input_), self.lora_a)
        if self.sequence_parallel:
            h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return out + self.lora_scaling * F.linear(h, self.lora_b).to(out.dtype), bias

    def delta_weight(self) -> Tensor:
        return self.lora_scaling * (self.lora_b.float() @ self.lora_a.float())
