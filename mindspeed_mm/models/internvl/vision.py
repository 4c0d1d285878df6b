"""InternViT (300M and 6B styles) on megatron-core blocks, and the pixel-shuffle head.

    x0      = [cls; conv(pixels)] + pos                    (embeddings)
    x       = x + drop_path(ls1 * attn(norm1(x)))          (per layer)
    x       = x + drop_path(ls2 * mlp(norm2(x)))
    feature = pixel_shuffle_v2(drop_cls(x))                (no final norm)

Attention keeps the checkpoint's `[Q; K; V]` row blocks (per TP rank: this rank's heads of Q, then of K,
then of V), so a reference-system checkpoint loads unchanged. The 6B style's qk-norm is an RMSNorm over
the whole embed dim (all heads together), not per head: under TP each rank holds some heads, so the sum
of squares is all-reduced over the TP group before normalising.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drops the whole residual branch per sample (dim 1 is the batch in [s, b, h])."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((1, x.shape[1]) + (1,) * (x.dim() - 2)).bernoulli_(keep)
    return x * mask / keep


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
    """Rate of every layer by its GLOBAL index, whatever the pipeline split (the reference computes it
    per stage and so shrinks the schedule under PP)."""
    if num_layers <= 1:
        return [0.0] * num_layers
    return [max_rate * i / (num_layers - 1) for i in range(num_layers)]


class _SumOverTP(torch.autograd.Function):
    """All-reduce whose backward is also an all-reduce: each rank's partial sum of squares feeds every
    rank's (different) heads, so the gradient reaching it is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over the full embed dim of Q or K when this rank holds only columns [start, start+width)."""

    def __init__(self, full_dim: int, eps: float, start: int, width: int, tp_group, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(full_dim, dtype=dtype))
        self.eps, self.full_dim, self.start, self.width, self.tp_group = eps, full_dim, start, width, tp_group

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        sumsq = x.pow(2).sum(-1, keepdim=True)
        if self.width != self.full_dim:
            sumsq = _SumOverTP.apply(sumsq, self.tp_group)
        x = x * torch.rsqrt(sumsq / self.full_dim + self.eps)
        return self.weight[self.start:self.start + self.width] * x.to(dtype)


class InternViTSelfAttention(SelfAttention):
    """Bidirectional multi-head attention over `[Q; K; V]` rows, optional full-width qk-norm."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int,
                 attn_mask_type=AttnMaskType.no_mask, qk_norm: bool = False, qkv_bias: bool = True, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        if not qkv_bias:
            # megatron gives linear_qkv a bias whenever the layer's linears have one (add_bias_linear);
            # the 6B ViT has a biased projection but an unbiased qkv.
            self.linear_qkv.register_parameter("bias", None)
        self.q_layernorm = self.k_layernorm = None
        if qk_norm:
            width = self.num_attention_heads_per_partition * self.hidden_size_per_attention_head
            rank = self.pg_collection.tp.rank() if self.world_size > 1 else 0
            norms = [FullWidthRMSNorm(config.hidden_size, config.layernorm_epsilon, rank * width, width,
                                      self.pg_collection.tp, config.params_dtype) for _ in range(2)]
            self.q_layernorm, self.k_layernorm = norms

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        assert split_qkv and not output_gate, "InternViT attention has no fused-rope or gated path"
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        heads, dim = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        q, k, v = mixed.view(s, b, 3, heads * dim).unbind(2)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return tuple(t.reshape(s, b, heads, dim).contiguous() for t in (q, k, v))


class InternViTLayer(TransformerLayer):
    """A megatron TransformerLayer whose two residual adds apply layer scale and drop path."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,
                 drop_path_rate: float = 0.0, layer_scale_init: float = 1.0, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.drop_path_rate = drop_path_rates(drop_path_rate, config.num_layers)[self.layer_number - 1]
        self.ls1 = torch.nn.Parameter(torch.full((config.hidden_size,), layer_scale_init,
                                                 dtype=config.params_dtype))
        self.ls2 = torch.nn.Parameter(torch.full((config.hidden_size,), layer_scale_init,
                                                 dtype=config.params_dtype))
        if config.sequence_parallel:
            self.ls1.sequence_parallel = self.ls2.sequence_parallel = True
        self.self_attn_bda = self._scaled_residual_add("ls1")
        self.mlp_bda = self._scaled_residual_add("ls2")

    def _scaled_residual_add(self, scale_name: str):
        # Same call shape as megatron's bias-dropout-add: bda(training, fused)(out_with_bias, residual, p).
        def make(training: bool, _fused: bool):
            def add(out_with_bias, residual, _dropout_prob):
                out, bias = out_with_bias
                if bias is not None:
                    out = out + bias
                out = drop_path(out * getattr(self, scale_name), self.drop_path_rate, training)
                return residual + out
            return add
        return make


def pixel_shuffle_v2(x: Tensor, ratio: float) -> Tensor:
    """[n, w, h, c] -> [n, w*r, h*r, c/r^2], InternVL's `ps_version v2` (with the final transpose)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class InternViTEmbeddings(torch.nn.Module):
    def __init__(self, config: TransformerConfig, image_size: int, patch_size: int, num_channels: int):
        super().__init__()
        c, dtype = config.hidden_size, config.params_dtype
        self.grid = image_size // patch_size
        self.class_embedding = torch.nn.Parameter(torch.randn(1, 1, c, dtype=dtype) * config.init_method_std)
        self.position_embedding = torch.nn.Parameter(
            torch.randn(1, 1 + self.grid * self.grid, c, dtype=dtype) * config.init_method_std)
        self.patch_embedding = torch.nn.Conv2d(num_channels, c, kernel_size=patch_size, stride=patch_size,
                                               dtype=dtype)

    def _positions(self, h: int, w: int) -> Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.position_embedding
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        c = patch_pos.shape[-1]
        grid = patch_pos.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, c).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        n, _, h, w = x.shape
        x = torch.cat([self.class_embedding.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self._positions(h, w)
        return x.transpose(0, 1).contiguous()  # [s, n, c]


class InternViT(MegatronModule):
    """Tiles [n, 3, H, W] -> pixel-shuffled features [n, tokens_per_tile, 4C]."""

    def __init__(self, config: TransformerConfig, layer_spec, image_size: int, patch_size: int,
                 num_channels: int, downsample_ratio: float):
        super().__init__(config=config)
        self.downsample_ratio = downsample_ratio
        self.embeddings = InternViTEmbeddings(config, image_size, patch_size, num_channels)
        self.encoder = TransformerBlock(config, layer_spec, post_layer_norm=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.encoder(self.embeddings(pixel_values), attention_mask=None)  # [s, n, c]
        x = x[1:].transpose(0, 1)  # drop CLS -> [n, patches, c]
        n, p, c = x.shape
        side = math.isqrt(p)
        x = pixel_shuffle_v2(x.reshape(n, side, side, c), self.downsample_ratio)
        return x.reshape(n, -1, x.shape[-1])

