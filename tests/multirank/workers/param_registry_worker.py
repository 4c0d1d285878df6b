"""2 ranks: the parameter registry against the model megatron builds, at TP1 and TP2, for both ViT styles.

For every parameter of InternVLModel (full model, one stage) this rank's name, shape and tensor-parallel
attributes (megatron's `tensor_model_parallel`, `partition_dim`) are recorded next to what the registry says
(`params`, `shard_slice`, `TP_DIM`). vit6b has 5 ViT heads: TP2 splits them 3 + 2.

Usage: torchrun --nproc_per_node 2 param_registry_worker.py OUT_PREFIX
"""
import json
import sys

import torch

from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.device import apply_device_adaptor
from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.model import InternVLModel
from mindspeed_mm.models.internvl.params import TP_DIM, params
from mindspeed_mm.models.internvl.sharding import shard_slice, stage_name
from mindspeed_mm.parallel.layout import plan_layout
from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config


def record(preset: str, tp: int, pp: int = 1) -> dict:
    """At pp 2 (tied embeddings) each rank builds its own stage, the LLM split 1 + 1 layers: the last stage's
    copy of the embedding is megatron's `output_layer.weight`."""
    initialize_model_parallel(tp=tp, pp=pp)
    rank = torch.distributed.get_rank() % tp
    spec = spec_from_hf_config(tiny_native_config(preset))
    plan = plan_layout(spec, ParallelSizes(tp=tp, pp=pp, dp=2 // tp // pp), 2,
                       [[spec.vision.num_layers] + [0] * (pp - 1)], [[1] * pp] if pp > 1 else None)
    stage = plan.stage(torch.distributed.get_rank() // tp if pp > 1 else 0)
    model = InternVLModel(spec, plan=plan, stage=stage)
    built = {n: {"shape": list(p.shape), "split": bool(getattr(p, "tensor_model_parallel", False)),
                 "dim": getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None}
             for n, p in model.named_parameters()}
    registry = {}
    for p in params(spec):
        local = stage_name(p.name, stage)
        if local is None:
            continue
        sl = shard_slice(p.name, p.shape, spec, tp, rank, plan.padded_vocab_size)
        split = p.tp != "replicate"  # megatron marks its parallel layers at TP1 too
        registry[local] = {"shape": list(sl.shape(p.shape)), "split": split,
                           "dim": TP_DIM.get(p.tp, 0) if split else None, "kind": p.tp}
    return {"built": built, "registry": registry}


CASES = {f"{preset}/tp{tp}": (preset, tp) for preset in ("vit300m", "vit6b") for tp in (1, 2)}
# the other LLM kinds at TP2 (Qwen3's q/k norms replicated, no qkv bias), tied embeddings at TP2 and PP2
CASES.update({f"{preset}/tp2": (preset, 2) for preset in ("qwen3_vit6b", "internlm3_vit300m", "qwen3_tied")})
CASES["qwen3_tied/pp2"] = ("qwen3_tied", 1, 2)


def main(prefix: str) -> None:
    apply_device_adaptor(force=True)
    init_distributed(backend="gloo")
    out = {case: record(*args) for case, args in CASES.items()}
    with open(f"{prefix}.rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(out, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
