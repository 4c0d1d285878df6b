"""Run a tiny InternVL3 at a parallel layout through the real training path and collect what a test
compares against the single-rank run: micro-batch losses, gradients or parameters after Adam steps,
each rank's slices merged back into full-model tensors by the inverse sharding functions.

The same function runs in-process at world size 1 (the reference) and under torchrun (the layout).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.parallel.layout import plan_layout
from mindspeed_mm.models.internvl.sharding import full_state_dict
from tests.helpers.batches import make_microbatches
from mindspeed_mm.runtime.chunks import build_model_chunks, load_converted_weights, load_full_weights
from mindspeed_mm.training.pipeline import forward_backward, microbatch_losses, local_tensors, train_step, wrap_ddp


@dataclass
class LayoutArgs:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sp: bool = False
    cp_algo: str = "megatron_cp_algo"
    vit_pp_layers: list | None = None
    llm_pp_layers: list | None = None
    microbatches: int = 2
    adam_steps: int = 0
    distributed_optimizer: bool = False
    seed: int = 0
    mm_dir: str | None = None  # load the weights from this mm-convert output instead of slicing the HF ones

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LayoutArgs":
        return cls(**json.loads(text))


def trainable_spec(hf_dir) -> InternVLSpec:
    """The checkpoint's spec with every module trainable, so every gradient is compared."""
    spec = spec_from_hf_dir(hf_dir)
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, freeze=False),
                               projector=dataclasses.replace(spec.projector, freeze=False),
                               text=dataclasses.replace(spec.text, freeze=False))


def run_layout(hf_dir, args: LayoutArgs) -> dict:
    """Needs megatron's groups initialised at (tp, pp, cp, vpp). Returns this rank's share."""
    spec, plan = layout_plan(hf_dir, args, torch.distributed.get_world_size())
    chunks = build_model_chunks(spec, plan, args.cp_algo)
    if args.mm_dir:
        load_converted_weights(chunks, args.mm_dir)
    else:
        _, fmt, state = load_hf_checkpoint(hf_dir)
        load_full_weights(chunks, hf_to_mm(state, spec, fmt))
    model = wrap_ddp(chunks, args.distributed_optimizer)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    microbatches = make_microbatches(spec, args.microbatches * dp, seed=args.seed)[dp_rank::dp]

    losses = []
    if args.adam_steps == 0:
        losses.append(microbatch_losses(forward_backward(model, microbatches)))
        what = "grad"
    else:
        optimizer = get_megatron_optimizer(
            # eps 1e-6: some gradients are zero up to rounding (the ViT's key bias cannot change a softmax),
            # and with eps 1e-8 Adam would turn that rounding noise into updates of up to lr in size.
            OptimizerConfig(optimizer="adam", lr=1e-4, adam_eps=1e-6, weight_decay=0.01, clip_grad=1.0, bf16=False, fp16=False,
                            params_dtype=torch.float32, use_distributed_optimizer=args.distributed_optimizer),
            model)
        for _ in range(args.adam_steps):
            losses.append(microbatch_losses(train_step(model, optimizer, microbatches)[0]))
        what = "param"
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": dp_rank,
        "cp_rank": parallel_state.get_context_parallel_rank(),
        "losses": losses,
        "tensors": local_tensors(model, what),
    }


def layout_plan(hf_dir, args: LayoutArgs, world: int):
    spec = trainable_spec(hf_dir)
    parallel = ParallelSizes.from_world_size(world, tp=args.tp, pp=args.pp, cp=args.cp, vpp=args.vpp, sp=args.sp)
    return spec, plan_layout(spec, parallel, world, args.vit_pp_layers, args.llm_pp_layers)


def merge_rank_results(results: list[dict], spec: InternVLSpec, plan) -> dict:
    """Full-model tensors from every rank's slices; losses per DP rank (last stage only has them)."""
    shards = {}
    for r in results:
        if r["dp_rank"] == 0 and r["cp_rank"] == 0:
            for stage, tensors in r["tensors"].items():
                shards[(r["tp_rank"], stage)] = tensors
    losses = {r["dp_rank"]: r["losses"] for r in results if r["losses"] and r["losses"][0]}
    return {"tensors": full_state_dict(shards, spec, plan), "losses": losses}


def save_rank_result(out_dir, result: dict) -> None:
    rank = torch.distributed.get_rank()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def load_rank_results(out_dir) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(Path(out_dir).glob("rank*.pt"))]
