"""What trains, said once at start-up: the trainable parameter count of the whole model and, after the first
optimizer step, the bytes of the optimizer's state, each summed over all ranks; both go into the first metrics
record (``trainable_params``, ``optimizer_state_bytes``).

Every parameter of the model is counted once (`runtime.chunks.counted_parameters`), the vocabulary's padding
rows left out. The optimizer state is what the inner torch
optimizers hold (Adam's moments and step counters; the fp32 main copies of bf16/fp16 weights are not state),
on every rank as it is: replicated parameters' state counts once per rank that keeps it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer

from mindspeed_mm.models.internvl.params import LLM_EMBED, LLM_HEAD, LLM_LAYER, PROJECTOR, VIT_EMBED, VIT_LAYER, lookup
from mindspeed_mm.runtime.chunks import counted_parameters

__all__ = ["TrainableReport", "count_parameters", "optimizer_state_bytes", "lora_notes"]

_GROUPS = {VIT_EMBED: "vision", VIT_LAYER: "vision", PROJECTOR: "projector", LLM_EMBED: "text", LLM_LAYER: "text",
           LLM_HEAD: "text"}
_KEYS = ("total", "trainable", "adapters", "vision", "projector", "text")
_PATHS = {"vision": "image_encoder.vision_encoder", "text": "text_decoder"}


def _world_sum(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _elements(name: str, p: torch.Tensor, tp_rank: int, vocab_size: int) -> int:
    """Elements of this rank's slice of `name`, without the vocabulary's zero padding rows."""
    if lookup(name)[0].tp == "vocab":
        rows = p.shape[0]
        real = max(0, min(rows, vocab_size - tp_rank * rows))
        return real * (p.numel() // rows)
    return p.numel()


def count_parameters(chunks, spec) -> dict[str, int]:
    """{total, trainable, adapters, vision, projector, text} over the whole model (a collective over all
    ranks); the last four split the trainable count: adapters, then the modules' own weights."""
    counts = dict.fromkeys(_KEYS, 0)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in counted_parameters(chunks):
        n = _elements(name, p, tp_rank, spec.text.vocab_size)
        counts["total"] += n
        if p.requires_grad:
            d, _ = lookup(name)
            counts["trainable"] += n
            counts["adapters" if d.adapter else _GROUPS[d.owner]] += n
    return dict(zip(_KEYS, _world_sum([counts[k] for k in _KEYS])))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the inner torch optimizers' state, summed over all ranks (a collective)."""
    leaves = list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    seen, n = set(), 0
    for opt in leaves:
        inner = getattr(opt, "optimizer", opt)
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        for state in inner.state.values():
            n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return _world_sum([n])[0]


def lora_notes(spec) -> list[str]:
    """One line per module with LoRA whose JSON says ``"freeze": false``: its base weights train too."""
    return [f"{_PATHS[m]}: LoRA and freeze false: its base weights train too"
            for m in ("vision", "text") if getattr(spec, m).lora is not None and getattr(spec, m).freeze is False]


def trainable_line(c: dict[str, int]) -> str:
    share = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
    return (f"trainable parameters: {c['trainable']:,} of {c['total']:,} ({share:.2f}%): adapters {c['adapters']:,}, "
            f"vision {c['vision']:,}, projector {c['projector']:,}, text {c['text']:,}")


class TrainableReport:
    """Built after the model (logs the count and the LoRA notes), told of every step (logs the optimizer state
    once the first real step made it; every rank must call, it is a collective then), and adds both figures to
    the first metrics record."""

    def __init__(self, chunks, spec, log: Callable[[str], None]):
        self.log = log
        self.counts = count_parameters(chunks, spec)
        for line in lora_notes(spec):
            log(line)
        log(trainable_line(self.counts))
        self.state_bytes: Optional[int] = None
        self._recorded = False

    def after_step(self, optimizer, stepped: bool = True) -> None:
        """`stepped`: the step was applied (an fp16 step skipped for overflow makes no state)."""
        if self.state_bytes is not None or not stepped:
            return
        self.state_bytes = optimizer_state_bytes(optimizer)
        self.log(f"optimizer state: {self.state_bytes:,} bytes ({self.state_bytes / 2 ** 30:.3f} GiB) over all ranks")

    def add_to(self, record: dict[str, Any]) -> dict[str, Any]:
        if not self._recorded:
            record["trainable_params"] = self.counts["trainable"]
            record["optimizer_state_bytes"] = self.state_bytes
            self._recorded = True
        return record
