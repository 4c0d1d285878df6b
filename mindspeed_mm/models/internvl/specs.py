"""Layer specs: which megatron-core module fills each slot of a ViT or LLM layer.

Parallel details live here, not in the layer code: swapping attention (for context parallel) or a
linear (for uneven tensor-parallel partitions) is a change of spec.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindspeed_mm.config.model_spec import LORA_PARTS, LoraSpec
from mindspeed_mm.models.internvl.moe import Qwen3MoeRouter
from mindspeed_mm.models.internvl.norm import HeadNorm, TorchNorm
from mindspeed_mm.models.internvl.params import LORA_LINEARS
from mindspeed_mm.models.internvl.sdpa_attention import SDPAttention
from mindspeed_mm.models.internvl.vision import InternViTLayer, InternViTSelfAttention
from mindspeed_mm.models.lora import LoRAColumnParallelLinear, LoRARowParallelLinear


def _linears(module: str, lora: Optional[LoraSpec]) -> dict:
    """The spec of each of a layer's four linears: megatron's, or with LoRA on the parts `lora` targets (the
    registry's `LORA_LINEARS` says which parts a linear fuses, in their row order)."""
    out = {"self_attention.linear_qkv": ColumnParallelLinear, "self_attention.linear_proj": RowParallelLinear,
           "mlp.linear_fc1": ColumnParallelLinear, "mlp.linear_fc2": RowParallelLinear}
    if lora is None:
        return out
    for linear in out:
        parts = [(suffix, part) for part in LORA_PARTS[module]
                 for name, suffix, _ in [LORA_LINEARS[module][part]] if name == linear]
        adapted = tuple(part in lora.target_modules for _, part in parts)
        if not any(adapted):
            continue
        if out[linear] is RowParallelLinear:
            out[linear] = ModuleSpec(module=LoRARowParallelLinear, params={"lora": lora})
        else:
            out[linear] = ModuleSpec(module=LoRAColumnParallelLinear, params={
                "lora": lora, "suffixes": tuple(s for s, _ in parts), "adapted": adapted,
                "interleave": module == "text" and linear.endswith("linear_qkv")})
    return out


def _mlp(linears: dict) -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=linears["mlp.linear_fc1"],
                                                           linear_fc2=linears["mlp.linear_fc2"]))


def _moe_mlp() -> ModuleSpec:
    """Qwen3-MoE's sparse MLP: megatron's MoE layer (top-k router, the token dispatcher the config names) with
    each expert a SwiGLU MLP of megatron's parallel linears, run one after another (SequentialMLP: the
    checkpoint names `experts.local_experts.{j}` are the same on every device)."""
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                        linear_fc2=RowParallelLinear))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts, router=Qwen3MoeRouter))


def vit_layer_spec(qk_norm: bool, qkv_bias: bool, drop_path_rate: float, layer_scale_init: float,
                   core_attention=SDPAttention, lora: Optional[LoraSpec] = None) -> ModuleSpec:
    linears = _linears("vision", lora)
    attention = ModuleSpec(
        module=InternViTSelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask, "qk_norm": qk_norm,
                "qkv_bias": qkv_bias},
        submodules=SelfAttentionSubmodules(linear_qkv=linears["self_attention.linear_qkv"],
                                           core_attention=core_attention,
                                           linear_proj=linears["self_attention.linear_proj"]),
    )
    return ModuleSpec(
        module=InternViTLayer,
        params={"drop_path_rate": drop_path_rate, "layer_scale_init": layer_scale_init},
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm, mlp=_mlp(linears), mlp_bda=get_bias_dropout_add),
    )


def llm_core_attention(cp: int, cp_algo: str):
    """torch's SDPA without CP; ours (ring or Ulysses, gloo and nccl alike) with it, since megatron-core has
    CP attention only through TransformerEngine."""
    if cp == 1:
        return SDPAttention
    from mindspeed_mm.parallel.context_parallel import ContextParallelAttention
    return ModuleSpec(module=ContextParallelAttention, params={"cp_algo": cp_algo})


def llm_layer_spec(cp: int = 1, cp_algo: str = "megatron_cp_algo", qk_norm: bool = False,
                   lora: Optional[LoraSpec] = None, moe: bool = False) -> ModuleSpec:
    """`qk_norm`: Qwen3's per-head RMSNorm of q and k (over head_dim, before RoPE), in megatron's slots. `moe`: a
    sparse layer (experts in place of the MLP)."""
    core_attention = llm_core_attention(cp, cp_algo)
    norm = HeadNorm if qk_norm else None
    linears = _linears("text", lora)
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=linears["self_attention.linear_qkv"],
                                           core_attention=core_attention,
                                           linear_proj=linears["self_attention.linear_proj"], q_layernorm=norm,
                                           k_layernorm=norm),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm, mlp=_moe_mlp() if moe else _mlp(linears), mlp_bda=get_bias_dropout_add),
    )


def block_spec(layers: ModuleSpec | list[ModuleSpec], num_local_layers: int,
               final_norm: bool) -> TransformerBlockSubmodules:
    """Explicit per-stage block (one spec for every layer, or one per layer): megatron's own block builder would
    fall back to its apex-less norm."""
    specs = list(layers) if isinstance(layers, list) else [layers] * num_local_layers
    assert len(specs) == num_local_layers, (len(specs), num_local_layers)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TorchNorm if final_norm else None)
