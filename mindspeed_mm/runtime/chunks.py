"""This rank's model chunks for a layout, built and loaded: the one way training and inference get them.

One InternVLModel per virtual-pipeline chunk this rank holds (megatron's groups say which), loaded from an
unsharded state dict, an mm-convert output, a training save, or a MindSpeed-MM checkpoint (no metadata: its
layout and TP style discovered, `checkpoint.discover`). A checkpoint of another layout or style is merged and
re-cut for this one (`Resharder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.checkpoint.mm_format import (
    chunk_key, has_meta, iteration_dir, load_rank_object, plain_int, rank_file, read_rank_file,
)
from mindspeed_mm.checkpoint.torch_file import StoredTensor
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict
from mindspeed_mm.models.internvl.sharding import global_name, local_state_dict, merge_tensor, shard_tensor, stage_name
from mindspeed_mm.parallel.layout import LayoutPlan

__all__ = ["build_model_chunks", "load_full_weights", "load_converted_weights", "Resharder"]


def build_model_chunks(spec: InternVLSpec, plan: LayoutPlan, cp_algo: str = "megatron_cp_algo",
                       seed: int = 1234) -> list[InternVLModel]:
    """One InternVLModel per virtual-pipeline chunk held by this rank, in chunk order (`seed`: LoRA's A)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(plan.num_chunks):
        chunk = InternVLModel(spec, plan=plan, stage=plan.stage(pp_rank, v), cp_algo=cp_algo, seed=seed)
        if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
            chunk.cuda(torch.cuda.current_device())  # configs initialise on CPU (use_cpu_initialization)
        chunks.append(chunk)
    return chunks


def load_full_weights(chunks: list[InternVLModel], full: Mapping[str, Tensor]) -> None:
    """Load this rank's slices of an unsharded state dict (TP rank from megatron's groups)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        load_full_state_dict(chunk, local_state_dict(full, chunk.spec, chunk.plan, tp_rank, chunk.stage))


def _as_torch(t: StoredTensor) -> Tensor:
    x = torch.from_numpy(t.array)  # a view of the file's private mapping, as torch.load(mmap=True) gives
    return x.view(getattr(torch, t.dtype)) if t.dtype == "bfloat16" else x  # numpy holds bfloat16 as uint16


class Resharder:
    """Reads a checkpoint saved at layout `old` in TP style `style` and cuts what this rank holds at `new`
    through the registry's merge/shard functions; at the same layout and our style, a rank's own file as it is.

    `foreign`: a checkpoint without our metadata (another tool's), whose files may pickle objects that
    torch.load(weights_only=True) refuses (MindSpeed-MM's training saves): read with the allowlist reader, of
    each file only the weights (``_extra_state`` entries dropped, counted in `extra_state`) and the entries
    that are plain ints."""

    def __init__(self, iter_dir: Path, spec: InternVLSpec, old: LayoutPlan, new: LayoutPlan, style: str = "mm",
                 foreign: bool = False):
        self.iter_dir, self.spec, self.old, self.new, self.style = iter_dir, spec, old, new, style
        self.foreign, self.extra_state = foreign, 0
        self._objs: dict[tuple[int, int], dict] = {}

    @property
    def same(self) -> bool:
        return self.style == "mm" and self.old.same_split(self.new)

    def obj(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        key = (tp_rank, pp_rank)
        if key not in self._objs:
            path = rank_file(self.iter_dir, tp_rank, pp_rank, self.old.parallel.pp)
            if not self.foreign:
                self._objs[key] = load_rank_object(path)
            else:
                rf = read_rank_file(path, self.old.num_chunks)
                self.extra_state += rf.extra_state
                obj: dict[str, Any] = {k: v for k, v in rf.other.items() if plain_int(v) is not None}
                # megatron keeps the data position only in its pickled args (a Namespace, read as a stand-in)
                args = getattr(rf.other.get("args"), "state", None)
                consumed = plain_int(args.get("consumed_train_samples")) if isinstance(args, dict) else None
                if consumed is not None:
                    obj.setdefault("consumed_train_samples", consumed)
                for v, sd in enumerate(rf.chunks):
                    obj[chunk_key(v, len(rf.chunks))] = {k: _as_torch(t) for k, t in sd.items()}
                self._objs[key] = obj
        return self._objs[key]

    def section(self, pick: Callable[[dict, int], Optional[dict]], tp_rank: int, pp_rank: int) -> list[dict]:
        """`pick(rank_object, vpp_rank)` -> that chunk's {local name: tensor} (or None), cut for this rank at
        `new` (one dict per chunk)."""
        old_pp, old_tp = self.old.parallel.pp, self.old.parallel.tp
        where: dict[str, dict[int, Tensor]] = {}
        for stage in self.old.stages:
            for t in range(old_tp):
                sd = pick(self.obj(t, stage.stage % old_pp), stage.stage // old_pp) or {}
                for local, tensor in sd.items():
                    where.setdefault(global_name(local, stage), {})[t] = tensor
        out = []
        for v in range(self.new.num_chunks):
            stage = self.new.stage(pp_rank, v)
            sd = {}
            for name, shards in where.items():
                local = stage_name(name, stage)
                if local is None:
                    continue
                full = merge_tensor(name, [shards[t] for t in range(old_tp)], self.spec, self.style)
                sd[local] = shard_tensor(name, full, self.spec, self.new.parallel.tp, tp_rank,
                                         self.new.padded_vocab_size).clone()
            out.append(sd)
        return out

    def weights(self, tp_rank: int, pp_rank: int) -> list[dict[str, Tensor]]:
        """This rank's model chunks at `new`."""
        if self.same:
            obj = self.obj(tp_rank, pp_rank)
            return [obj[chunk_key(v, self.new.num_chunks)] for v in range(self.new.num_chunks)]
        return self.section(lambda o, v: o.get(chunk_key(v, self.old.num_chunks)), tp_rank, pp_rank)


def load_converted_weights(chunks: list[InternVLModel], mm_dir, style: str = "mm") -> None:
    """Load this rank's part of an MM checkpoint saved at the chunks' layout in TP style `style` (an
    mm-convert output, or a MindSpeed-MM one without metadata: see `Resharder`)."""
    plan = chunks[0].plan
    mm_dir = Path(mm_dir)
    resharder = Resharder(iteration_dir(mm_dir), chunks[0].spec, plan, plan, style, foreign=not has_meta(mm_dir))
    weights = resharder.weights(parallel_state.get_tensor_model_parallel_rank(),
                                parallel_state.get_pipeline_model_parallel_rank())
    for chunk, state in zip(chunks, weights):
        load_full_state_dict(chunk, state)
