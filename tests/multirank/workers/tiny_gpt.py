"""A tiny Qwen2-like megatron GPTModel and helpers to compare it across parallel layouts.

Imported by the worker scripts beside it (they run as scripts, so this directory is on sys.path).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

VOCAB, SEQ, MBS = 128, 16, 2


def tiny_config(tp: int = 1, pp: int = 1, vpp: int | None = None, num_layers: int = 4,
                **overrides) -> TransformerConfig:
    """RMSNorm, SwiGLU, GQA (4 heads, 2 groups), qkv bias, RoPE; CPU init, every fusion off."""
    kwargs = dict(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, kv_channels=16, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(config: TransformerConfig, vp_stage: int | None = None) -> GPTModel:
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False, position_embedding_type="rope", vp_stage=vp_stage)


def make_batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g)} for _ in range(n)]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    output = model(batch["tokens"], position_ids, None, labels=batch["labels"])

    def loss_func(per_token_loss):  # only called on the last stage, where output is [b, s] losses
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def _global_name(model: GPTModel, name: str) -> str:
    """Name a parameter by its global layer number, the same in every pipeline layout."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]


def _gather_tp(tensor: torch.Tensor, param) -> torch.Tensor:
    """Undo megatron's TP split: rank r holds chunks r, r + tp, ... of ``stride * tp`` chunks."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def full_state(models, what: str = "data") -> dict[str, torch.Tensor]:
    """Full (TP-gathered) params or grads of this rank's model chunks, by global name."""
    out = {}
    for model in models:
        for name, p in model.named_parameters():
            tensor = p.data if what == "data" else p.grad
            out[_global_name(model, name)] = _gather_tp(tensor, p)
    return out


def load_full_state(models, state: dict[str, torch.Tensor]) -> None:
    """Copy full weights into this rank's chunks, slicing its TP shard the way megatron does."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                full = state[_global_name(model, name)]
                if getattr(p, "tensor_model_parallel", False) and tp > 1:
                    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
                    chunks = full.chunk(stride * tp, dim=dim)
                    full = torch.cat(chunks[rank::tp], dim=dim)
                p.copy_(full)


def all_pipeline_states(local: dict) -> dict:
    """Union of every rank's dict (pipeline stages hold disjoint parameters)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor max|a - b| / max|b| over the shared keys (which must be all keys)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)
