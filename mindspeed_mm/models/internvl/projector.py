"""The MLP projector (InternVL's `mlp1`): LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


class InternVLProjector(MegatronModule):
    def __init__(self, text_config: TransformerConfig, in_features: int, eps: float = 1e-5):
        # Tile features are [tiles, tokens, 4C], not a TP-split sequence: never sequence-parallel.
        config = dataclasses.replace(text_config, sequence_parallel=False)
        super().__init__(config=config)
        hidden = config.hidden_size
        self.norm = torch.nn.LayerNorm(in_features, eps=eps, dtype=config.params_dtype)
        self.linear_fc1 = ColumnParallelLinear(in_features, hidden, config=config, init_method=config.init_method,
                                               bias=True, gather_output=False)
        self.linear_fc2 = RowParallelLinear(hidden, hidden, config=config, init_method=config.output_layer_init_method,
                                            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, features: Tensor) -> Tensor:
        x, _ = self.linear_fc1(self.norm(features))
        x, _ = self.linear_fc2(F.gelu(x))
        return x
