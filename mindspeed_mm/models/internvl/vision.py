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

import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from mindspeed_mm.parallel.layout import head_partition


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
        weight = self.weight
        if self.width != self.full_dim:
            # Every rank holds the whole weight but uses its own columns: identity forward, gradient
            # summed over TP, so each copy gets the gradient of all columns and the copies stay equal.
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        return weight[self.start:self.start + self.width] * x.to(dtype)


class InternViTSelfAttention(SelfAttention):
    """Bidirectional multi-head attention over `[Q; K; V]` rows, optional full-width qk-norm, and heads
    split unevenly over TP when their count does not divide (InternViT-6B: 25 heads)."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int,
                 attn_mask_type=AttnMaskType.no_mask, qk_norm: bool = False, qkv_bias: bool = True, **kwargs):
        tp_group = (kwargs.get("pg_collection") or ProcessGroupCollection.use_mpu_process_groups()).tp
        tp, rank = tp_group.size(), tp_group.rank()
        heads = head_partition(config.num_attention_heads, tp)
        # megatron divides head counts evenly over TP; give it a rank-local view in which every rank has
        # this rank's head count, so its linears and core attention get exactly the local sizes.
        local = copy.copy(config)
        local.num_attention_heads = local.num_query_groups = heads[rank] * tp
        super().__init__(local, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        if not qkv_bias:
            # megatron gives linear_qkv a bias whenever the layer's linears have one (add_bias_linear);
            # the 6B ViT has a biased projection but an unbiased qkv.
            self.linear_qkv.register_parameter("bias", None)
        self.q_layernorm = self.k_layernorm = None
        if qk_norm:
            dim = config.kv_channels
            norms = [FullWidthRMSNorm(config.hidden_size, config.layernorm_epsilon, sum(heads[:rank]) * dim,
                                      heads[rank] * dim, tp_group, config.params_dtype) for _ in range(2)]
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
        self.max_drop_path_rate = drop_path_rate
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
                rate = drop_path_rates(self.max_drop_path_rate, self.config.num_layers)[self.layer_number - 1]
                out = drop_path(out * getattr(self, scale_name), rate, training)
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
    """One pipeline stage of the ViT: embeddings on the first, pixel shuffle on the last.

    Under sequence parallelism each tile's 1 + patches tokens are padded to a multiple of TP (1025 is
    odd) and the padding is masked out as attention keys, so every real token sees exactly what it
    would see unsplit."""

    def __init__(self, config: TransformerConfig, block_spec, image_size: int, patch_size: int,
                 num_channels: int, downsample_ratio: float, first: bool = True, last: bool = True,
                 vp_stage: int | None = None):
        super().__init__(config=config)
        self.downsample_ratio, self.last = downsample_ratio, last
        self.embeddings = InternViTEmbeddings(config, image_size, patch_size, num_channels) if first else None
        self.encoder = TransformerBlock(config, block_spec, post_layer_norm=False, pre_process=first,
                                        vp_stage=vp_stage) if block_spec.layer_specs else None
        self.seq_len = 1 + (image_size // patch_size) ** 2
        tp = config.tensor_model_parallel_size
        self.pad = (-self.seq_len) % tp if config.sequence_parallel else 0
        self.input_tensor = None

    def set_input_tensor(self, tensor: Tensor | None) -> None:
        self.input_tensor = tensor
        if self.encoder is not None:
            self.encoder.set_input_tensor(tensor)

    def _key_padding_mask(self, x: Tensor) -> Tensor | None:
        if not self.pad:
            return None
        s = self.seq_len + self.pad
        mask = torch.zeros(1, 1, s, s, dtype=torch.bool, device=x.device)
        mask[..., self.seq_len:] = True  # True = masked
        return mask

    def forward(self, pixel_values: Tensor | None) -> Tensor:
        """First stage: tiles [n, 3, H, W]; later stages: the previous stage's hidden states.
        Returns hidden states [s(/tp), n, c], or on the last stage features [n, tokens_per_tile, 4C]."""
        if self.embeddings is not None:
            x = self.embeddings(pixel_values)  # [s, n, c]
            if self.config.sequence_parallel:
                x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
                x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        else:
            x = self.input_tensor
        if self.encoder is not None:
            x = input_for_full_recompute(x, self.encoder)
            x = self.encoder(x if self.embeddings is not None else None, attention_mask=self._key_padding_mask(x))
        if not self.last:
            return x
        if self.config.sequence_parallel:
            # The projector after this is replicated over TP, so each rank's gradient here is the whole
            # gradient of its own slice: split it, do not sum it.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            x = x[:self.seq_len]
        x = x[1:].transpose(0, 1)  # drop CLS -> [n, patches, c]
        n, p, c = x.shape
        side = math.isqrt(p)
        x = pixel_shuffle_v2(x.reshape(n, side, side, c), self.downsample_ratio)
        return x.reshape(n, -1, x.shape[-1])


def input_for_full_recompute(x: Tensor | None, block: torch.nn.Module) -> Tensor | None:
    """`x`, made to require grad when `block` recomputes fully and trains something (LoRA, unfrozen layers) but
    `x` does not (frozen embeddings): megatron's checkpoint is reentrant, so an output of inputs that need no
    grad gets none, and the block's adapters would silently get no gradient."""
    if (x is None or x.requires_grad or not torch.is_grad_enabled()
            or block.config.recompute_granularity != "full"
            or not any(p.requires_grad for p in block.parameters())):
        return x
    return x.detach().requires_grad_()
