"""Norm layers for our layer specs.

megatron-core's apex-free norm (`WrappedTorchNorm`) refuses sequence parallelism outright. With SP the
norm weights are replicated over TP while each rank sees a different slice of the sequence, so their
gradients must be summed over TP: megatron's `finalize_model_grads` does that for every parameter tagged
`sequence_parallel`. This norm does the tagging instead of refusing.
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """Builds `torch.nn.LayerNorm` or `torch.nn.RMSNorm` from a TransformerConfig (spec-compatible)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {config.normalization!r}")
        if config.sequence_parallel:
            for p in norm.parameters():
                p.sequence_parallel = True
        return norm
