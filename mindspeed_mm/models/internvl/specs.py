"""Layer specs: which megatron-core module fills each slot of a ViT or LLM layer.

Parallel details live here, not in the layer code: swapping attention (for context parallel) or a
linear (for uneven tensor-parallel partitions) is a change of spec.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindspeed_mm.models.internvl.norm import HeadNorm, TorchNorm
from mindspeed_mm.models.internvl.sdpa_attention import SDPAttention
from mindspeed_mm.models.internvl.vision import InternViTLayer, InternViTSelfAttention


def _mlp() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def vit_layer_spec(qk_norm: bool, qkv_bias: bool, drop_path_rate: float, layer_scale_init: float,
                   core_attention=SDPAttention) -> ModuleSpec:
    attention = ModuleSpec(
        module=InternViTSelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask, "qk_norm": qk_norm,
                "qkv_bias": qkv_bias},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core_attention,
                                           linear_proj=RowParallelLinear),
    )
    return ModuleSpec(
        module=InternViTLayer,
        params={"drop_path_rate": drop_path_rate, "layer_scale_init": layer_scale_init},
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm, mlp=_mlp(), mlp_bda=get_bias_dropout_add),
    )


def llm_core_attention(cp: int, cp_algo: str):
    """torch's SDPA without CP; ours (ring or Ulysses, gloo and nccl alike) with it, since megatron-core has
    CP attention only through TransformerEngine."""
    if cp == 1:
        return SDPAttention
    from mindspeed_mm.parallel.context_parallel import ContextParallelAttention
    return ModuleSpec(module=ContextParallelAttention, params={"cp_algo": cp_algo})


def llm_layer_spec(cp: int = 1, cp_algo: str = "megatron_cp_algo", qk_norm: bool = False) -> ModuleSpec:
    """`qk_norm`: Qwen3's per-head RMSNorm of q and k (over head_dim, before RoPE), in megatron's slots."""
    core_attention = llm_core_attention(cp, cp_algo)
    norm = HeadNorm if qk_norm else None
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core_attention,
                                           linear_proj=RowParallelLinear, q_layernorm=norm, k_layernorm=norm),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm, mlp=_mlp(), mlp_bda=get_bias_dropout_add),
    )


def block_spec(layer: ModuleSpec, num_local_layers: int, final_norm: bool) -> TransformerBlockSubmodules:
    """Explicit per-stage block: megatron's own block builder would fall back to its apex-less norm."""
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local_layers,
                                      layer_norm=TorchNorm if final_norm else None)
