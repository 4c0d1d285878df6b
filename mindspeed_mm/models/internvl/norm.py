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


class HeadNorm(torch.nn.RMSNorm):
    """Qwen3's q/k norm: RMSNorm of every head over head_dim, one weight shared by all heads (megatron's
    `q_layernorm`/`k_layernorm` slots). Under TP each rank normalises its own heads with the whole weight, so
    the weight's gradient is partial per rank: it is summed over TP here, in autograd (identity forward), as
    the ViT's full-width norm does, rather than by megatron's `finalize_model_grads`, whose rule (sum every
    parameter named `q_layernorm`/`k_layernorm` when the config has `qk_layernorm`) would sum the ViT's
    already-summed ones again. Never tagged `sequence_parallel`: with SP the heads, not the tokens, are split
    here."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.tp = config.tensor_model_parallel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return super().forward(x)
        from megatron.core import tensor_parallel

        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.weight)
        return torch.nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)
