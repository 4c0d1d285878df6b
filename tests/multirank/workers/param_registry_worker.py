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
from mindspeed_mm.models.internvl.sharding import shard_slice
from mindspeed_mm.parallel.layout import plan_layout
from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config


def record(preset: str, tp: int) -> dict:
    initialize_model_parallel(tp=tp)
    rank = torch.distributed.get_rank() % tp
    spec = spec_from_hf_config(tiny_native_config(preset))
    plan = plan_layout(spec, ParallelSizes(tp=tp, dp=2 // tp), 2)
    model = InternVLModel(spec, plan=plan, stage=plan.stage(0))
    built = {n: {"shape": list(p.shape), "split": bool(getattr(p, "tensor_model_parallel", False)),
                 "dim": getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None}
             for n, p in model.named_parameters()}
    registry = {}
    for p in params(spec):
        sl = shard_slice(p.name, p.shape, spec, tp, rank, plan.padded_vocab_size)
        split = p.tp != "replicate"  # megatron marks its parallel layers at TP1 too
        registry[p.name] = {"shape": list(sl.shape(p.shape)), "split": split,
                            "dim": TP_DIM.get(p.tp, 0) if split else None, "kind": p.tp}
    return {"built": built, "registry": registry}


def main(prefix: str) -> None:
    apply_device_adaptor(force=True)
    init_distributed(backend="gloo")
    out = {f"{preset}/tp{tp}": record(preset, tp) for preset in ("vit300m", "vit6b") for tp in (1, 2)}
    with open(f"{prefix}.rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(out, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
