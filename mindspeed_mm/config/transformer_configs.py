"""Megatron ``TransformerConfig``s for InternVL3's two transformer stacks, built from an :class:`InternVLSpec`.

One place decides every TransformerConfig field; the spec holds the model, :class:`ParallelSizes` the run.
The configs are CPU-safe by default (``use_cpu_initialization``, every fusion off, local implementation,
``batch_p2p_comm=False`` because gloo mis-orders batched p2p at PP=2); pass ``**overrides`` (TransformerConfig
field names) to change any field, e.g. to turn fusions back on for a GPU run.

Notes:

* ``num_layers`` is the module's GLOBAL layer count: the project's pipeline layout (``pipeline_num_layers``)
  decides which layers a stage builds, and per-layer quantities such as the drop-path schedule use the
  global count.
* Megatron rejects ``num_attention_heads % tensor_model_parallel_size != 0``. InternViT-6B has 25 heads
  ("unaligned" TP), so when the heads (or query groups) do not divide over TP the config is validated at
  TP=1 and then given the real TP size; such a module must be built from the project's unaligned layers,
  as megatron-core's own attention would refuse it.
* The ViT's ``qk_layernorm`` is False in the TransformerConfig even for InternViT-6B: its qk-norm runs over
  the full embedding (all heads), which the model applies itself, not megatron's per-head norm.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from .model_spec import PARAMS_DTYPE_NAMES, ModelSpecError, InternVLSpec, pipeline_shape
from .parallel import ParallelSizes

__all__ = ["vision_transformer_config", "text_transformer_config", "torch_dtype", "default_parallel_sizes"]

_DTYPES = {k: getattr(torch, v) for k, v in PARAMS_DTYPE_NAMES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" -> torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown params_dtype {name!r}; expected one of {list(_DTYPES)}") from None


def default_parallel_sizes(spec: InternVLSpec) -> ParallelSizes:
    """tp=cp=dp=1, with pp/vpp read from the spec's ``pipeline_num_layers`` (text first, then vision)."""
    shape = pipeline_shape(spec.text.pipeline_num_layers) or pipeline_shape(spec.vision.pipeline_num_layers)
    if shape is None:
        return ParallelSizes()
    pp, vpp = shape
    return ParallelSizes(pp=pp, vpp=vpp)


def _check_layout(path: str, layout: Any, parallel: ParallelSizes) -> None:
    shape = pipeline_shape(layout)
    if shape is None:
        return
    want = (parallel.pp, parallel.vpp)
    got = (shape[0], shape[1] if shape[1] and shape[1] > 1 else None)
    if got != want:
        raise ModelSpecError(path, f"layout {[list(x) if isinstance(x, tuple) else x for x in layout]} is for "
                             f"(pp, vpp) = {got}, but the run has pp={parallel.pp}, vpp={parallel.vpp}")


def _common(module: Any, parallel: ParallelSizes) -> Dict[str, Any]:
    dtype = torch_dtype(module.params_dtype)
    return dict(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        num_layers=module.num_layers,
        hidden_size=module.hidden_size,
        ffn_hidden_size=module.ffn_hidden_size,
        num_attention_heads=module.num_attention_heads,
        layernorm_epsilon=module.layernorm_epsilon,
        normalization=module.normalization,
        add_qkv_bias=module.add_qkv_bias,
        init_method_std=module.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        recompute_granularity=module.recompute_granularity,
        recompute_method=module.recompute_method,
        recompute_num_layers=module.recompute_num_layers,
        # CPU-safe: no fused kernels, no TransformerEngine, no apex.
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
        cross_entropy_loss_fusion=False,
        transformer_impl="local",
        attention_backend=AttnBackend.local,
        batch_p2p_comm=False,
        cuda_graph_scope=[],  # megatron's default "full" only emits a deprecation warning
    )


def _build(kwargs: Dict[str, Any], overrides: Dict[str, Any]) -> TransformerConfig:
    kwargs = {**kwargs, **overrides}
    if kwargs.get("variable_seq_lengths"):
        # No MoE here, but megatron rejects variable_seq_lengths with its default "allgather" dispatcher.
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall")
    tp = kwargs.get("tensor_model_parallel_size", 1)
    heads = kwargs["num_attention_heads"]
    groups = kwargs.get("num_query_groups") or heads
    unaligned = tp > 1 and (heads % tp != 0 or (groups % tp != 0 and tp % groups != 0))
    if not unaligned:
        return TransformerConfig(**kwargs)
    # Unaligned TP: let megatron validate everything else at TP=1, then record the real TP size.
    sp = kwargs.get("sequence_parallel", False)
    config = TransformerConfig(**{**kwargs, "tensor_model_parallel_size": 1, "sequence_parallel": False,
                                  "expert_tensor_parallel_size": 1})
    config.tensor_model_parallel_size = tp
    config.expert_tensor_parallel_size = tp
    config.sequence_parallel = sp
    return config


def vision_transformer_config(spec: InternVLSpec, parallel: Optional[ParallelSizes] = None,
                              **overrides: Any) -> TransformerConfig:
    """TransformerConfig of InternViT: exact GELU MLP with biases, ``add_qkv_bias`` from the spec, no GQA,
    softmax in fp32, context_parallel_size 1 (the ViT is never split over CP), sequence parallelism from
    the spec's ``sequence_parallel`` when set, else from ``parallel``."""
    parallel = parallel or default_parallel_sizes(spec)
    v = spec.vision
    _check_layout("image_encoder.vision_encoder.pipeline_num_layers", v.pipeline_num_layers, parallel)
    sp = parallel.sp if v.sequence_parallel is None else v.sequence_parallel
    if sp and parallel.tp == 1:
        raise ModelSpecError("image_encoder.vision_encoder.sequence_parallel", "true needs tensor parallelism > 1")
    kwargs = _common(v, parallel)
    kwargs.update(
        sequence_parallel=sp,
        context_parallel_size=1,
        num_query_groups=v.num_attention_heads,
        kv_channels=v.head_dim,
        activation_func=F.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        qk_layernorm=False,  # InternViT's qk-norm spans all heads; the model applies it itself
        attention_softmax_in_fp32=True,
    )
    return _build(kwargs, overrides)


def text_transformer_config(spec: InternVLSpec, parallel: Optional[ParallelSizes] = None,
                            **overrides: Any) -> TransformerConfig:
    """TransformerConfig of the LLM (Qwen2, Qwen3, InternLM3): RMSNorm, SwiGLU (F.silu + gated_linear_unit), GQA,
    head_dim ``kv_channels``, qkv bias by the kind, no other linear bias. RoPE base/percent, vocab size and positions are GPTModel arguments, read them
    from ``spec.text``."""
    parallel = parallel or default_parallel_sizes(spec)
    t = spec.text
    _check_layout("text_decoder.pipeline_num_layers", t.pipeline_num_layers, parallel)
    kwargs = _common(t, parallel)
    kwargs.update(
        sequence_parallel=parallel.sp,
        context_parallel_size=parallel.cp,
        num_query_groups=t.num_query_groups,
        kv_channels=t.kv_channels,
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        # Qwen3's q/k norms come from the layer spec (models.internvl.norm.HeadNorm, which sums their gradients
        # over TP itself); megatron's flag would have finalize_model_grads sum every *q_layernorm* over TP again
        qk_layernorm=False,
        attention_softmax_in_fp32=t.attention_softmax_in_fp32,
        variable_seq_lengths=t.variable_seq_lengths,
    )
    if t.moe:
        kwargs.update(_moe_fields(spec, parallel))
    return _build(kwargs, overrides)


def _moe_fields(spec: InternVLSpec, parallel: ParallelSizes) -> Dict[str, Any]:
    """Qwen3-MoE's sparse layers in megatron's fields. `norm_topk_prob` is megatron's softmax over the top-k
    logits; without it, the top k of the softmax over all experts (`moe_router_pre_softmax`). megatron's own
    load-balancing loss stays off: transformers' spans every layer (`models.internvl.moe`). Tokens are exchanged
    all-to-all, the dispatcher that runs on gloo and nccl alike."""
    t = spec.text
    return dict(
        num_moe_experts=t.num_experts,
        moe_router_topk=t.moe_router_topk,
        moe_ffn_hidden_size=t.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not t.norm_topk_prob,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=t.moe_z_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
    )
