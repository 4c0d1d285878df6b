"""A sparse LLM's step figures: the load-balancing loss and each sparse layer's expert load.

The last pipeline stage's reports (`pipeline.moe_reports`) hold, per micro-batch, the load-balancing loss times
its coefficient and the tokens each layer sent to each expert (padding not counted, every token counted once
whatever TP, CP or the pipeline split); summed over the step's micro-batches and data-parallel ranks, then given
to every rank, so whichever rank logs has them.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from mindspeed_mm.config.model_spec import InternVLSpec


def step_figures(moe: list[dict], spec: InternVLSpec, is_last_stage: bool, device) -> dict:
    """`load_balancing_loss` (the mean over the step's micro-batches, times its coefficient), `expert_load`
    ([sparse layer][expert] token counts over the global batch) and its per-layer `expert_load_min`/`_max`."""
    layers, experts = len(spec.text.moe_layers), spec.text.num_experts
    t = torch.zeros(2 + layers * experts, dtype=torch.float64, device=device)
    if is_last_stage:
        for r in moe:
            t[0] += float(r["aux"])
            t[1] += 1
            t[2:] += r["load"].reshape(-1).to(t)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(t, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    load = t[2:].reshape(layers, experts).round().long()
    return {"load_balancing_loss": float(t[0] / t[1].clamp(min=1)),
            "expert_load": {str(i): row for i, row in zip(spec.text.moe_layers, load.tolist())},
            "expert_load_min": load.min(1).values.tolist(), "expert_load_max": load.max(1).values.tolist()}
