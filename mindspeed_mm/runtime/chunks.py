"""This rank's model chunks for a layout, built and loaded: the one way training and inference get them.

One InternVLModel per virtual-pipeline chunk this rank holds (megatron's groups say which), loaded from an
unsharded state dict, an mm-convert output or a training save.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.checkpoint.mm_format import iteration_dir, load_rank_file, rank_file
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict
from mindspeed_mm.models.internvl.sharding import local_state_dict
from mindspeed_mm.parallel.layout import LayoutPlan

__all__ = ["build_model_chunks", "load_full_weights", "load_converted_weights"]


def build_model_chunks(spec: InternVLSpec, plan: LayoutPlan, cp_algo: str = "megatron_cp_algo") -> list[InternVLModel]:
    """One InternVLModel per virtual-pipeline chunk held by this rank, in chunk order."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(plan.num_chunks):
        chunk = InternVLModel(spec, plan=plan, stage=plan.stage(pp_rank, v), cp_algo=cp_algo)
        if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
            chunk.cuda(torch.cuda.current_device())  # configs initialise on CPU (use_cpu_initialization)
        chunks.append(chunk)
    return chunks


def load_full_weights(chunks: list[InternVLModel], full: Mapping[str, Tensor]) -> None:
    """Load this rank's slices of an unsharded state dict (TP rank from megatron's groups)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        load_full_state_dict(chunk, local_state_dict(full, chunk.spec, chunk.plan, tp_rank, chunk.stage))


def load_converted_weights(chunks: list[InternVLModel], mm_dir) -> None:
    """Load this rank's file of an mm-convert checkpoint (`release/mp_rank_XX[_YYY]/model_optim_rng.pt`)."""
    plan = chunks[0].plan
    path = rank_file(iteration_dir(Path(mm_dir)), parallel_state.get_tensor_model_parallel_rank(),
                     parallel_state.get_pipeline_model_parallel_rank(), plan.parallel.pp)
    for chunk, state in zip(chunks, load_rank_file(path, plan.num_chunks)):
        load_full_state_dict(chunk, state)
