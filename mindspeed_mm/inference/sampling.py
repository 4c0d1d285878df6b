"""The next token from last-position logits: greedy, or sampled after temperature, top-k and top-p (applied
in that order, as transformers' generate does)."""
from __future__ import annotations

import torch
from torch import Tensor

from mindspeed_mm.inference.config import GenerationConfig

__all__ = ["filter_logits", "next_tokens"]


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """[b, V] float logits with the excluded tokens at -inf."""
    logits = logits / temperature if temperature != 1.0 else logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones already reach top_p; the most likely one always stays.
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """[b, V] logits -> [b] token ids. Sampling draws from `generator` (seeded by the caller) so a run repeats."""
    logits = logits.float()
    if not config.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)
    # multinomial draws on the generator's device; probabilities go there and the ids come back.
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(logits.device)
