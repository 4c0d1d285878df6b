"""Test oracle: plain single-process causal GQA attention, fp32, written as directly as possible."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def reference_causal_attention(query: Tensor, key: Tensor, value: Tensor,
                               softmax_scale: Optional[float] = None) -> Tensor:
    """query [s, b, np, d], key/value [s, b, ng, d] (natural token order) -> [s, b, np * d] (fp32).
    K/V groups are repeated like megatron's DotProductAttention (head h uses group h // (np/ng))."""
    s, b, np_, d = query.shape
    rep = np_ // key.size(2)
    k = key.repeat_interleave(rep, dim=2)
    v = value.repeat_interleave(rep, dim=2)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), k.float()) * scale
    future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v.float())
    return out.reshape(s, b, np_ * d)
