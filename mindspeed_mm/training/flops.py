"""Model FLOPs of a training step, for TFLOP/s and MFU: matmuls and convolutions only (norms, softmax and
element-wise work are left out, as is usual for MFU), attention counted over the full square score matrix
(what the kernels compute). A module's forward counts 1x, its backward 2x when its weights train and 1x when
only activation gradients flow through it (a frozen module with trainable modules before it, or a frozen base
under LoRA: the adapters' own FLOPs, rank/width of the base's, are left out)."""
from __future__ import annotations

from dataclasses import dataclass

from mindspeed_mm.config.model_spec import InternVLSpec

__all__ = ["vit_forward_flops", "llm_forward_flops", "step_flops", "PEAK_TFLOPS"]

# dense bf16 peaks (TFLOP/s) of GPUs whose name contains the key
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0}


def vit_forward_flops(spec: InternVLSpec, num_tiles: int) -> float:
    """InternViT + pixel shuffle projector over `num_tiles` tiles."""
    v = spec.vision
    C, F, n = v.hidden_size, v.ffn_hidden_size, v.num_patches + 1
    per_token_layer = 2 * C * 3 * C + 2 * C * C + 2 * 2 * C * F + 2 * 2 * n * C  # qkv, proj, mlp, scores + AV
    embed = 2 * C * v.num_channels * v.patch_size ** 2 * v.num_patches
    H, pin = spec.text.hidden_size, spec.projector.input_size
    projector = spec.tokens_per_tile * (2 * pin * H + 2 * H * H)
    return float(num_tiles * (v.num_layers * n * per_token_layer + embed + projector))


def llm_forward_flops(spec: InternVLSpec, seq_lens: list[int]) -> float:
    t = spec.text
    h, d = t.hidden_size, t.kv_channels
    q, kv = t.num_attention_heads * d, t.num_query_groups * d
    mlp = 2 * h * t.ffn_hidden_size * (3 if t.gated_linear_unit else 2)
    linear = 2 * h * (q + 2 * kv) + 2 * q * h + mlp
    total = 0.0
    for s in seq_lens:
        total += s * (t.num_layers * (linear + 2 * 2 * s * q) + 2 * h * t.vocab_size)
    return total


@dataclass
class StepFlops:
    vit: float
    llm: float

    @property
    def total(self) -> float:
        return self.vit + self.llm


def step_flops(spec: InternVLSpec, num_tiles: int, seq_lens: list[int]) -> StepFlops:
    """Forward + backward FLOPs of one step over these tiles and (padded) sequence lengths."""
    v, t = spec.vision, spec.text
    vit_trains = not (v.frozen and spec.projector.frozen)
    vit_grads = vit_trains or v.lora is not None or v.unfreeze_last_layers > 0
    vit_mult = 3 if vit_trains else (2 if vit_grads else 1)
    llm_mult = 3 if not t.frozen else (2 if vit_grads or t.lora is not None else 1)
    return StepFlops(vit_mult * vit_forward_flops(spec, num_tiles), llm_mult * llm_forward_flops(spec, seq_lens))
