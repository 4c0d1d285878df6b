"""The checkpoint to generate with: its model and layout, checked against the run, built and loaded.

`from_pretrained` is an `mm-convert` output directory (any TP/PP/VPP layout, read from its
`mm_convert_meta.json`), a MindSpeed-MM checkpoint directory (conversion or training save: no metadata, so its
layout is read off its files and the model keys must be in the inference JSON) or one rank's
`model_optim_rng.pt` of a single-rank conversion (the reference's way; model keys in the JSON too). The run's layout is the checkpoint's: torchrun must start
tp * pp processes, and a run of another size stops before building anything, saying what to launch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mindspeed_mm.config.model_spec import InternVLSpec, architecture_differences, load_model_spec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.config import InferenceConfigError
from mindspeed_mm.parallel.layout import LayoutPlan, plan_layout

if TYPE_CHECKING:  # torch only where a model is built: the checks before it run in a process without it
    from mindspeed_mm.inference.stages import StageRunner

__all__ = ["CheckpointInfo", "LayoutMismatch", "build_runner", "inspect_checkpoint", "plan_for"]


class LayoutMismatch(UserError):
    """The checkpoint's TP x PP layout needs another number of processes than the run has."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: str  # "mm_dir" | "rank_file"
    spec: InternVLSpec
    plan: LayoutPlan  # the split it was saved at (one rank for a single rank file)
    tp_style: str = "mm"  # the rank files' TP convention (models.internvl.sharding.TP_STYLES)

    @property
    def tp(self) -> int:
        return self.plan.parallel.tp

    @property
    def pp(self) -> int:
        return self.plan.parallel.pp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return f"TP{self.tp} x PP{self.pp}" + (f" x VPP{self.plan.vpp}" if self.plan.vpp else "")


def _one_rank(spec: InternVLSpec) -> LayoutPlan:
    return plan_layout(spec, ParallelSizes(), 1, [[spec.vision.num_layers]], [[spec.text.num_layers]])


def _check_same_model(json_spec: InternVLSpec, ckpt_spec: InternVLSpec, where: str) -> None:
    """The inference JSON's model must be the checkpoint's; its run settings (freeze, layout, ...) may differ."""
    diffs = architecture_differences(json_spec, ckpt_spec)
    if diffs:
        key, mine, theirs = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if diffs[1:] else ""
        raise InferenceConfigError(key, f"{mine!r} in the inference JSON, but the checkpoint {where} has "
                                   f"{theirs!r}{more}")


def inspect_checkpoint(from_pretrained: str | Path, model: dict | None = None, source: str = "<dict>"
                       ) -> CheckpointInfo:
    """What the checkpoint holds and how it is split, without loading weights. `model`: the inference JSON's
    model keys (reference schema), checked against a converted checkpoint's own, required for a .pt file."""
    from mindspeed_mm.checkpoint.discover import discover
    from mindspeed_mm.checkpoint.mm_format import META_FILE, TRACKER_FILE, checkpoint_meta, has_meta

    path = Path(from_pretrained)
    json_spec = load_model_spec(model, source) if model is not None else None
    if path.is_file():
        if json_spec is None:
            raise InferenceConfigError("text_decoder", f"from_pretrained is a single file ({path}): the inference "
                                       f"JSON must give the model keys (text_decoder, image_encoder, ...)")
        return CheckpointInfo(path, "rank_file", json_spec, _one_rank(json_spec))
    if not path.is_dir():
        raise FileNotFoundError(f"from_pretrained: no checkpoint at {path}")
    if not (path / TRACKER_FILE).is_file() and not (path / "release").is_dir():
        raise InferenceConfigError("from_pretrained", f"{path} is not an mm-convert output or a training save (no "
                                   f"{TRACKER_FILE} or release/); convert an HF checkpoint with `mm-convert "
                                   "InternVLConverter hf_to_mm` first")
    if not has_meta(path):
        # MindSpeed-MM's conversion or training save: the model from the JSON, the layout from the files.
        if json_spec is None:
            raise InferenceConfigError("text_decoder", f"{path} has no {META_FILE} (not written by mm-convert): "
                                       f"the inference JSON must give the model keys (text_decoder, "
                                       f"image_encoder, ...)")
        found = discover(path, json_spec, told_as="from_pretrained")
        return CheckpointInfo(path, "mm_dir", json_spec, found.plan, found.tp_style)
    meta = checkpoint_meta(path)
    spec = meta.spec()
    plan = meta.plan(spec)
    if json_spec is not None:
        _check_same_model(json_spec, spec, str(path))
        spec = dataclasses.replace(spec, text=dataclasses.replace(
            spec.text, max_position_embeddings=json_spec.text.max_position_embeddings))
    return CheckpointInfo(path, "mm_dir", spec, plan, meta.tp_style)


def check_world(info: CheckpointInfo, world_size: int) -> None:
    if world_size != info.world_size:
        raise LayoutMismatch(
            f"{info.path} is split {info.describe()} ({info.world_size} process(es)), but this run has "
            f"{world_size}: launch `torchrun --nproc_per_node {info.world_size} ...`, or reshard it with "
            f"`mm-convert InternVLConverter resplit` to the layout you want to run")


def _with_dtype(spec: InternVLSpec, dtype: str) -> InternVLSpec:
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, params_dtype=dtype),
                               text=dataclasses.replace(spec.text, params_dtype=dtype))


def plan_for(info: CheckpointInfo, tp: int | None = None, pp: int | None = None) -> LayoutPlan:
    """The checkpoint's layout, or one model instance at TP x PP (layers split evenly), which the loader
    reshards the checkpoint to. A single rank file runs at its own layout only."""
    tp, pp = tp or info.tp, pp or info.pp
    if (tp, pp) == (info.tp, info.pp):
        if info.plan.parallel.ep == 1:
            return info.plan
        # generation runs TP x PP processes, no expert parallelism: every rank loads all its stage's experts
        p = info.plan.parallel
        return plan_layout(info.spec, ParallelSizes(tp=p.tp, pp=p.pp, vpp=p.vpp), p.tp * p.pp,
                           info.plan.vit_pp_layers, info.plan.llm_pp_layers)
    if info.kind == "rank_file":
        raise LayoutMismatch(f"{info.path} is one rank file: it runs at TP1 x PP1 only; convert the checkpoint "
                             f"with `mm-convert` to run TP{tp} x PP{pp}")
    spec = dataclasses.replace(info.spec, vision=dataclasses.replace(info.spec.vision, pipeline_num_layers=None),
                               text=dataclasses.replace(info.spec.text, pipeline_num_layers=None))
    # The ViT's layers, then the LLM's, cut into pp runs of (nearly) equal count: a stage never holds ViT
    # layers after LLM ones.
    nv, nl = spec.vision.num_layers, spec.text.num_layers
    total = nv + nl
    bounds = [total * k // pp for k in range(pp + 1)]
    vit = [max(0, min(nv, hi) - lo) for lo, hi in zip(bounds, bounds[1:])]
    llm = [(hi - lo) - v for (lo, hi), v in zip(zip(bounds, bounds[1:]), vit)]
    return plan_layout(spec, ParallelSizes(tp=tp, pp=pp), tp * pp, [vit], [llm])


def build_runner(info: CheckpointInfo, dtype: str, plan: LayoutPlan | None = None) -> StageRunner:
    """Megatron's groups for `plan` (default: the checkpoint's layout, its experts unsplit: `plan_for`), this
    rank's chunks built and loaded (resharded when the plan is not the checkpoint's), in eval mode. Needs the default process group
    (`init_distributed`) of a multiple of the plan's TP x PP processes: each TP x PP group is one model, the
    data-parallel groups are its copies."""
    import torch

    from mindspeed_mm.checkpoint.mm_format import load_rank_file
    from mindspeed_mm.distributed import initialize_model_parallel
    from mindspeed_mm.inference.stages import StageRunner
    from mindspeed_mm.models.internvl.model import load_full_state_dict
    from mindspeed_mm.runtime.chunks import build_model_chunks, load_converted_weights

    plan = plan or plan_for(info)
    size = plan.parallel.tp * plan.parallel.pp
    world = torch.distributed.get_world_size()
    if world % size:
        raise LayoutMismatch(f"{world} process(es) cannot hold copies of a TP{plan.parallel.tp} x "
                             f"PP{plan.parallel.pp} model: launch a multiple of {size}")
    initialize_model_parallel(tp=plan.parallel.tp, pp=plan.parallel.pp, vpp=plan.vpp)
    chunks = build_model_chunks(_with_dtype(info.spec, dtype), plan)
    if info.kind == "mm_dir":
        load_converted_weights(chunks, info.path, info.tp_style)
    else:
        (state,) = load_rank_file(info.path, 1)
        load_full_state_dict(chunks[0], state)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
        merge_adapters(chunk)
    return StageRunner(chunks)


def merge_adapters(chunk) -> int:
    """Fold every LoRA adapter into its linear's weight (W + alpha/r B A, this rank's slice): generation then
    runs the plain model, at its speed. Returns the number of linears merged."""
    from mindspeed_mm.models.lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    n = 0
    for module in chunk.modules():
        if isinstance(module, (LoRAColumnParallelLinear, LoRARowParallelLinear)) and not module.lora_merged:
            module.merge_lora_()
            n += 1
    return n
