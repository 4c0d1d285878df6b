"""Core attention through `torch.nn.functional.scaled_dot_product_attention`.

A drop-in for megatron's `DotProductAttention` slot (same constructor and call), used for the ViT and for the
LLM without context parallelism. torch picks the kernel for the device: flash / memory-efficient attention on
CUDA (what `--use-flash-attn` asks for, without TransformerEngine), its fused flash kernel on CPU. megatron's
own version materialises the [b, heads, s, s] scores in a baddbmm and a separate softmax, which on CPU made our
training step slower than transformers' (whose attention is SDPA as well).

Masks follow megatron's convention (True = masked). An integer `attention_mask` [b, s] is the sample ids of a packed
micro-batch (`InternVLModel.forward`): a query sees the keys of its own sample up to itself (block-diagonal
causal; padding, -1, sees only padding), computed as one causal call per sample (with fewer queries than keys:
a mask built from the ids). Causal attention with fewer queries than keys (decoding
against a KV cache) is aligned to the last key, as the queries are the newest positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

__all__ = ["SDPAttention", "packed_causal_mask"]


def packed_causal_mask(sample_ids: Tensor, sq: int, sk: int) -> Tensor:
    """[b, 1, sq, sk] bool, True where a query may attend to a key: the same sample and not after it. `sample_ids`
    [b, sk] covers the keys; the queries are the last sq of them."""
    if sample_ids.dim() != 2 or sample_ids.shape[1] != sk:
        raise ValueError(f"sample ids {tuple(sample_ids.shape)} do not cover the {sk} keys")
    same = sample_ids[:, sk - sq:, None] == sample_ids[:, None, :]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=sample_ids.device).tril(diagonal=sk - sq)
    return (same & causal).unsqueeze(1)


_CUTS: list = [None, None, None]  # (the sample ids tensor, its version, its cuts): one forward's every layer


def _sample_cuts(sample_ids: Tensor) -> list[list[int]]:
    """Per row, the positions where a new run of ids starts, with 0 and the length: computed once per micro-batch
    (every layer of a forward, and its recompute, gets the same ids tensor), since reading them is a host sync."""
    if _CUTS[0] is not sample_ids or _CUTS[1] != sample_ids._version:
        s = sample_ids.shape[1]
        cuts = [[0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist(), s] for ids in sample_ids]
        _CUTS[:] = [sample_ids, sample_ids._version, cuts]
    return _CUTS[2]


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention has no context parallelism; the CP spec uses ContextParallelAttention")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention dropout {dropout} is not supported (InternVL3 trains without it)")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, heads, d]; key/value [sk, b, groups, d] -> [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias are not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, d = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        allowed = None
        causal = False
        if attention_mask is not None and not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool:
            if sq == sk:
                return self._per_sample(q, k, v, attention_mask)
            allowed = packed_causal_mask(attention_mask.to(q.device), sq, sk)
        elif attention_mask is not None:
            allowed = ~attention_mask.to(torch.bool)
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                causal = True
            else:
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def _per_sample(self, q: Tensor, k: Tensor, v: Tensor, sample_ids: Tensor) -> Tensor:
        """A pack's attention as one causal SDPA call per sample (and one for its padding, which sees only
        itself): the same as the block-diagonal mask, at the cost of the samples' own squares, and through the
        fused causal kernel (an explicit mask would take SDPA's unfused path over the whole pack)."""
        b, heads, s, d = q.shape
        gqa = k.shape[1] != heads
        rows = []
        for r, cuts in enumerate(_sample_cuts(sample_ids)):
            rows.append(torch.cat([F.scaled_dot_product_attention(
                q[r:r + 1, :, a:e], k[r:r + 1, :, a:e], v[r:r + 1, :, a:e], is_causal=True, scale=self.softmax_scale,
                enable_gqa=gqa) for a, e in zip(cuts[:-1], cuts[1:])], dim=2))
        out = torch.cat(rows) if b > 1 else rows[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)
