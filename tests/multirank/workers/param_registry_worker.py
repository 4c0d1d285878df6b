"""2 ranks: the parameter registry against the model megatron builds, at TP1 and TP2, for both ViT styles.

For every parameter of InternVLModel (full model, one stage) this rank's name, shape and tensor-parallel
attributes (megatron's `tensor_model_parallel`, `partition_dim`) are recorded next to what the registry says
(`params`, `shard_slice`, `TP_DIM`). vit6b has 5 ViT heads: TP2 splits them 3 + 2. The "+lora" cases put
LoRA on every linear of both modules (the registry's adapter rows, `params(spec, adapters=True)`) and also
record how far this rank's LoRA A matrices are from `shard_tensor` of the ones the model draws at TP1 (the init
is layout independent: 0).

Usage: torchrun --nproc_per_node 2 param_registry_worker.py OUT_PREFIX
"""
import dataclasses
import json
import sys

import torch

from mindspeed_mm.config.model_spec import lora_spec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.device import apply_device_adaptor
from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.model import InternVLModel
from mindspeed_mm.models.internvl.params import TP_DIM, params
from mindspeed_mm.models.internvl.sharding import shard_slice, shard_tensor, stage_name
from mindspeed_mm.parallel.layout import plan_layout
from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config


def with_lora(spec):
    """LoRA on every linear of the ViT (rank 2) and of the LLM (rank 4)."""
    vision = lora_spec("vision", {"rank": 2, "alpha": 6, "dropout": 0.0}, "vision.lora")
    text = lora_spec("text", {"rank": 4, "alpha": 8, "dropout": 0.0}, "text.lora")
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, lora=vision),
                               text=dataclasses.replace(spec.text, lora=text))


def tp1_lora_a(preset: str) -> dict:
    """The full LoRA A matrices InternVLModel draws at TP1."""
    initialize_model_parallel(tp=1)
    model = InternVLModel(with_lora(spec_from_hf_config(tiny_native_config(preset))))
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_a" in n}


def record(preset: str, tp: int, pp: int = 1, lora: bool = False) -> dict:
    """At pp 2 (tied embeddings) each rank builds its own stage, the LLM split 1 + 1 layers: the last stage's
    copy of the embedding is megatron's `output_layer.weight`."""
    full_a = tp1_lora_a(preset) if lora else {}
    initialize_model_parallel(tp=tp, pp=pp)
    rank = torch.distributed.get_rank() % tp
    spec = spec_from_hf_config(tiny_native_config(preset))
    if lora:
        spec = with_lora(spec)
    plan = plan_layout(spec, ParallelSizes(tp=tp, pp=pp, dp=2 // tp // pp), 2,
                       [[spec.vision.num_layers] + [0] * (pp - 1)], [[1] * pp] if pp > 1 else None)
    stage = plan.stage(torch.distributed.get_rank() // tp if pp > 1 else 0)
    model = InternVLModel(spec, plan=plan, stage=stage)
    built = {n: {"shape": list(p.shape), "split": bool(getattr(p, "tensor_model_parallel", False)),
                 "dim": getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None,
                 "stride": getattr(p, "partition_stride", None) if getattr(p, "tensor_model_parallel", False)
                 else None}
             for n, p in model.named_parameters()}
    a_init = {n: (p.detach() - shard_tensor(n, full_a[n], spec, tp, rank, plan.padded_vocab_size)).abs().max().item()
              for n, p in model.named_parameters() if n in full_a}
    b_init = {n: p.detach().abs().max().item() for n, p in model.named_parameters() if ".lora_b" in n}
    registry = {}
    for p in params(spec, adapters=lora):
        local = stage_name(p.name, stage)
        if local is None:
            continue
        sl = shard_slice(p.name, p.shape, spec, tp, rank, plan.padded_vocab_size)
        split = p.tp != "replicate"  # megatron marks its parallel layers at TP1 too
        registry[local] = {"shape": list(sl.shape(p.shape)), "split": split,
                           "dim": TP_DIM.get(p.tp, 0) if split else None, # megatron's stride: 2 for its [gate; up] fc1
                           "stride": (2 if p.tp == "glu" else 1) if split else None,
                           "kind": p.tp}
    return {"built": built, "registry": registry, "lora_a_init": a_init, "lora_b_init": b_init}


CASES = {f"{preset}/tp{tp}": (preset, tp) for preset in ("vit300m", "vit6b") for tp in (1, 2)}
# the other LLM kinds at TP2 (Qwen3's q/k norms replicated, no qkv bias), tied embeddings at TP2 and PP2
CASES.update({f"{preset}/tp2": (preset, 2) for preset in ("qwen3_vit6b", "internlm3_vit300m", "qwen3_tied")})
CASES["qwen3_tied/pp2"] = ("qwen3_tied", 1, 2)
# LoRA on both modules at TP2: the default preset and vit6b (the ViT's LoRA B of q/k/v and A of its
# projection cut by heads, 3 + 2)
CASES.update({f"{preset}+lora/tp2": (preset, 2, 1, True) for preset in ("vit300m", "vit6b")})


def main(prefix: str) -> None:
    apply_device_adaptor(force=True)
    init_distributed(backend="gloo")
    out = {case: record(*args) for case, args in CASES.items()}
    with open(f"{prefix}.rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(out, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
