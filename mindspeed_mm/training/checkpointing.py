"""Training checkpoints: the converter's on-disk layout plus optimizer state in model space.

A save is ``<save>/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt``, each written by the
lowest rank holding it (under expert parallelism a file per (tp, ep) pair megatron's ranks have, with that EP
rank's experts under local indices, `checkpoint.mm_format`), each holding

- ``model`` (``model0..`` under VPP): exactly what mm-convert writes, so `mm_to_hf`, `resplit` and a later
  `--load` read training saves and conversions alike;
- ``optimizer``: every trainable parameter's optimizer state (Adam's ``exp_avg``/``exp_avg_sq``, the fp32
  ``main_param`` under bf16/fp16) *in model space*: tensors shaped like the rank's parameter and keyed by its
  name. The distributed optimizer's DP shards are gathered for the save (an expert's over the expert-data-parallel
  group that shards it) and cut again on load. Because these
  tensors shard exactly like the weights, a checkpoint resumes at another TP/PP/VPP/DP layout through the same
  merge/shard functions the converter uses;
- ``opt_param_scheduler``, ``rng_state`` (one per data-parallel rank), ``iteration``,
  ``consumed_train_samples`` and the run's ``args``;
- ``data_state`` (packed runs only): the packer's state, the same on every rank (`data.packing`), so a resume
  continues with bit-identical packs;
- ``training_state`` (preference training): the bco_pair reward baseline and where the reference came from.

The save is written into ``.iter_N.tmp`` and renamed into place after every rank has written; the metadata and
then ``latest_checkpointed_iteration.txt`` are replaced last, so a process killed mid-save leaves the previous
checkpoint as the latest and intact. Everything is read with ``weights_only=True``, but for checkpoints without
our metadata (MindSpeed-MM's): their layout is discovered (`checkpoint.discover`) and only their weights are read,
with the allowlist reader (`runtime.chunks.Resharder`).
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import ChainedOptimizer, DistributedOptimizer, Float16OptimizerWithFloat16Params
from torch import Tensor

from mindspeed_mm.checkpoint.adapters import check_same_loras
from mindspeed_mm.checkpoint.atomic import replace_dir, replace_file
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.checkpoint.mm_format import (
    META_FILE,
    TRACKER_FILE,
    MMCheckpointMeta,
    chunk_key,
    plain_int,
    rank_file,
    save_rank_object,
    write_meta,
)
from mindspeed_mm.parallel.layout import LayoutPlan, rank_file_keys
from mindspeed_mm.runtime.chunks import Checkpoint, check_base, checkpoint_weights, open_checkpoint, this_rank

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedState"]

MAIN_PARAM = "main_param"


def _module(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def model_state(chunk, trainable_only: bool = False) -> dict[str, Tensor]:
    """The chunk's tensors as rank files hold them; `trainable_only`: an adapter save's (its base is frozen)."""
    keep = {n for n, p in _module(chunk).named_parameters() if p.requires_grad} if trainable_only else None
    return {k: v for k, v in _module(chunk).state_dict().items()
            if not k.endswith("_extra_state") and (keep is None or k in keep)}


# ------------------------------------------------------------------------------------------------------------
# Optimizer state <-> model space
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Slot:
    """Where a model parameter's optimizer state lives: the inner torch optimizer, its main parameter, and
    (distributed optimizer) the flat range of the parameter this DP rank owns."""
    inner: torch.optim.Optimizer
    main: Tensor
    owner: Any
    start: int = 0
    end: Optional[int] = None  # None: the whole parameter


def _leaf_optimizers(optimizer) -> list:
    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def _slots(optimizer) -> dict[Tensor, _Slot]:
    slots: dict[Tensor, _Slot] = {}
    for opt in _leaf_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            for p, (gi, go) in opt.model_param_group_index_map.items():
                r = opt._get_model_param_range_map(p)["param"]
                slots[p] = _Slot(opt.optimizer, opt.optimizer.param_groups[gi]["params"][go], opt, r.start, r.end)
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for model_g, main_g in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p, m in zip(model_g, main_g):
                    slots[p] = _Slot(opt.optimizer, m, opt)
            for g in opt.fp32_from_fp32_groups:
                for p in g:
                    slots[p] = _Slot(opt.optimizer, p, opt)
        else:  # FP32Optimizer: the model parameters are the optimizer's parameters
            for g in opt.optimizer.param_groups:
                for p in g["params"]:
                    slots[p] = _Slot(opt.optimizer, p, opt)
    return slots


def _is_expert(p: Tensor) -> bool:
    """megatron's mark of an expert parameter under expert parallelism (reduced over expert-DP ranks only)."""
    return not getattr(p, "allreduce", True)


def _dp_groups(optimizer) -> dict[bool, Any]:
    """The distributed optimizer's DP group of dense (False) and expert (True) parameters: under expert
    parallelism megatron chains an optimizer for the experts, sharded over the expert-data-parallel group."""
    groups: dict[bool, Any] = {}
    for opt in _leaf_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            for p in opt.model_param_group_index_map:
                groups.setdefault(_is_expert(p), opt.data_parallel_group)
    return groups


def optimizer_state_model_space(optimizer, chunks) -> dict[str, Any]:
    """{"step", "kinds", "chunks": [{kind: {local name: tensor shaped like the parameter}}]}; a collective over
    the distributed optimizer's DP group. Empty ``kinds`` before the first step."""
    slots = _slots(optimizer)
    kinds: list[str] = []
    step = 0
    for s in slots.values():
        state = s.inner.state.get(s.main, {})
        if state:
            kinds = sorted(k for k in state if k != "step")
            step = int(state["step"]) if "step" in state else 0
            break
    if any(s.main is not p for p, s in slots.items()) and kinds:
        kinds.append(MAIN_PARAM)
    groups = _dp_groups(optimizer)
    sharded = {e: g is not None and torch.distributed.get_world_size(g) > 1 for e, g in groups.items()}
    out: list[dict[str, dict[str, Tensor]]] = []
    # model-space buffers filled from a DP shard, summed below over the DP group that shards them (dense
    # parameters' or, under expert parallelism, the experts')
    pending: dict[bool, list[Tensor]] = {False: [], True: []}
    for chunk in chunks:
        per_kind: dict[str, dict[str, Tensor]] = {k: {} for k in kinds}
        for name, p in _module(chunk).named_parameters():
            s = slots.get(p)
            expert = _is_expert(p)
            if s is None:
                if p.requires_grad and sharded.get(expert, False):
                    # the distributed optimizer left this DP rank no part of it: contribute zeros, so that
                    # every DP rank reduces the same list of buffers
                    for kind in kinds:
                        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                        per_kind[kind][name] = buf.view(p.shape)
                        pending[expert].append(buf)
                continue  # frozen: no optimizer state
            for kind in kinds:
                src = s.main.detach() if kind == MAIN_PARAM else s.inner.state[s.main][kind]
                if s.end is None:
                    per_kind[kind][name] = src.detach().reshape(p.shape).float().clone()
                else:
                    buf = torch.zeros(p.numel(), dtype=torch.float32, device=src.device)
                    buf[s.start:s.end] = src.detach().reshape(-1).float()
                    per_kind[kind][name] = buf.view(p.shape)
                    pending[expert].append(buf)
        out.append(per_kind)
    for expert, bufs in pending.items():
        if bufs and sharded.get(expert, False):
            flat = torch.cat(bufs)
            torch.distributed.all_reduce(flat, group=groups[expert])
            offset = 0
            for buf in bufs:
                buf.copy_(flat[offset:offset + buf.numel()])
                offset += buf.numel()
    return {"step": step, "kinds": kinds, "chunks": [{k: {n: t.cpu() for n, t in d.items()} for k, d in c.items()}
                                                    for c in out]}


def load_optimizer_state_model_space(optimizer, chunks, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state_model_space` for this rank's chunks (already resharded to this layout)."""
    kinds, step = state["kinds"], state["step"]
    if not kinds:
        return
    slots = _slots(optimizer)
    for opt in _leaf_optimizers(optimizer):
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
    with torch.no_grad():
        for chunk, per_kind in zip(chunks, state["chunks"]):
            for name, p in _module(chunk).named_parameters():
                s = slots.get(p)
                if s is None:
                    continue
                for kind in kinds:
                    saved = per_kind[kind].get(name)
                    if saved is None:
                        raise CheckpointFormatError(f"optimizer state {kind!r} of {name} is missing from the "
                                                    f"checkpoint (was it frozen when saved?)")
                    if kind == MAIN_PARAM and s.main is p:
                        continue
                    dst = s.main if kind == MAIN_PARAM else s.inner.state[s.main][kind]
                    src = saved.reshape(-1)[s.start:s.end] if s.end is not None else saved.reshape(dst.shape)
                    dst.copy_(src.reshape(dst.shape).to(dst.dtype))
                if s.owner.config.optimizer == "adam":
                    # torch Adam keeps a step per parameter, as a float tensor
                    s.inner.state[s.main]["step"] = torch.tensor(float(step), dtype=torch.float32)
    for opt in _leaf_optimizers(optimizer):
        if isinstance(opt, (DistributedOptimizer, Float16OptimizerWithFloat16Params)):
            opt._copy_main_params_to_model_params()


# ------------------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"random": random.getstate(), "np": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                  *np_state[2:]],
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["random"]) if not isinstance(state["random"], tuple) else state["random"])
    n = state["np"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _all_gather_states(state: dict, group) -> list[dict]:
    """Every rank's `state` (tensors and plain values), through torch.save bytes: `all_gather_object` pickles
    tensors in a form torch 2.13 cannot read back, and this way the bytes are read with weights_only=True."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    out = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(out, padded, group=group)
    return [torch.load(io.BytesIO(o[:int(n.item())].cpu().numpy().tobytes()), weights_only=True)
            for o, n in zip(out, sizes)]


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _dp_cp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


# ------------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------------

def _is_writer(plan: LayoutPlan) -> bool:
    """Whether this rank writes its rank file: the lowest rank holding its (tp, pp, ep) file. Without expert
    parallelism that is data- and context-parallel rank 0; under it the EP ranks are DP ranks, and which
    (tp, ep) pairs exist (`parallel.layout.rank_file_keys`) and the lowest rank of each come from the ranks'
    own coordinates. Collective under expert parallelism."""
    if plan.parallel.ep == 1:
        return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
    mine = this_rank(plan)
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    keys = {(t, e) for t, _, e in everyone}
    if keys != set(rank_file_keys(plan.parallel)):
        raise AssertionError(f"the ranks hold (tp, ep) pairs {sorted(keys)}, the layout's files are "
                             f"{list(rank_file_keys(plan.parallel))}")
    return everyone.index(mine) == torch.distributed.get_rank()


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, chunks, plan: LayoutPlan, meta: MMCheckpointMeta,
                    optimizer=None, scheduler=None, consumed_train_samples: int = 0, args: Optional[dict] = None,
                    save_optim: bool = True, save_rng: bool = True, log: Callable[[str], None] = print,
                    data_state: Optional[dict] = None, training_state: Optional[dict] = None) -> Path:
    """Write iteration `iteration` and make it the latest; a collective over all ranks. `data_state`: the
    packed data iterator's state (`training.data.data_state`), saved when not None; `training_state`: a
    training mode's own state (preference training's reward baseline and reference), likewise."""
    save_dir = Path(save_dir).absolute()
    name = f"iter_{iteration:07d}"
    tmp, final = save_dir / f".{name}.tmp", save_dir / name
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".iter_*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()

    obj: dict[str, Any] = {chunk_key(v, len(chunks)): model_state(c, trainable_only=meta.base is not None)
                           for v, c in enumerate(chunks)}
    if save_optim and optimizer is not None:
        obj["optimizer"] = optimizer_state_model_space(optimizer, chunks)  # collective over DP
        obj["grad_scaler"] = _grad_scaler_state(optimizer)
        obj["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    if save_rng:
        obj["rng_state"] = _all_gather_states(_rng_state(), _dp_cp_group())
    obj.update(iteration=iteration, consumed_train_samples=consumed_train_samples, args=args or {})
    if data_state is not None:
        obj["data_state"] = data_state
    if training_state is not None:
        obj["training_state"] = training_state
    if _is_writer(plan):
        tp_rank, pp_rank, ep_rank = this_rank(plan)
        save_rank_object(rank_file(tmp, tp_rank, pp_rank, plan.parallel.pp, ep_rank, plan.parallel.ep), obj)
    torch.distributed.barrier()
    if rank0:
        meta = dataclasses.replace(meta, iteration=str(iteration))
        write_meta(tmp, meta)
        replace_dir(tmp, final, overwrite=True)  # a re-save of the same iteration swaps, never deletes first
        replace_file(save_dir / META_FILE, (final / META_FILE).read_text())
        replace_file(save_dir / TRACKER_FILE, str(iteration))
        log(f"saved checkpoint {final}")
    torch.distributed.barrier()
    return final


def _grad_scaler_state(optimizer):
    scalers = [getattr(o, "grad_scaler", None) for o in _leaf_optimizers(optimizer)]
    return [s.state_dict() if s is not None else None for s in scalers]


# ------------------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedState:
    iteration: int
    consumed_train_samples: int
    meta: MMCheckpointMeta
    optimizer_loaded: bool
    same_layout: bool
    checkpoint: Checkpoint
    data_state: Optional[dict] = None  # the packed data iterator's state (None: not packed, or a fresh start)
    training_state: Optional[dict] = None  # the training mode's state (preference training), None likewise


def load_checkpoint(load_dir: str | os.PathLike, chunks, plan: LayoutPlan, optimizer=None, scheduler=None,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    log: Callable[[str], None] = print) -> LoadedState:
    """Load a converter output or a training save into this rank's chunks (any saved layout), then, unless
    told otherwise, the optimizer state, LR schedule and RNG. `release` checkpoints and `finetune` start at
    iteration 0 with a fresh optimizer."""
    from mindspeed_mm.models.internvl.model import load_full_state_dict
    from mindspeed_mm.models.internvl.params import is_adapter

    spec = _module(chunks[0]).spec
    ckpt = open_checkpoint(load_dir, spec, "--load")
    load_dir, it_dir, meta, old, foreign = ckpt.root, ckpt.it_dir, ckpt.meta, ckpt.plan, ckpt.foreign
    tp_rank, pp_rank, ep_rank = this_rank(plan)
    weights, resharder = checkpoint_weights(ckpt, spec, plan)
    same = resharder.same
    if not same:
        log(f"loading {it_dir} saved at {old.describe()}"
            f"{'' if meta.tp_style == 'mm' else f' ({meta.tp_style} convention)'} into {plan.describe()}: "
            f"resharding")
    if meta.base is not None:
        log(f"{it_dir} holds adapters and trainable parameters: the frozen base from {meta.base['dir']}/"
            f"{meta.base.get('iteration', '')}")
    saved = None if foreign else meta.spec()
    if saved is not None and (saved.vision.lora or saved.text.lora):
        check_same_loras(spec, {"vision": saved.vision.lora, "text": saved.text.lora}, str(it_dir))
    fresh = not any(is_adapter(n) for sd in weights for n in sd)
    fresh = fresh and any(is_adapter(n) for c in chunks for n, _ in _module(c).named_parameters())
    fresh = bool(_any_rank(fresh))
    for chunk, sd in zip(chunks, weights):
        if fresh:  # a checkpoint without adapters under a LoRA run: its adapters start as initialised
            sd = {**{n: p.detach() for n, p in _module(chunk).named_parameters() if is_adapter(n)}, **sd}
        load_full_state_dict(_module(chunk), sd)
    check_base([_module(c) for c in chunks], ckpt)
    if optimizer is not None:
        optimizer.reload_model_params()  # main params are copies made when the optimizer was built

    own = resharder.obj(tp_rank, pp_rank, ep_rank) if same else resharder.obj(0, 0)
    saved_iteration = plain_int(own.get("iteration"))
    release = it_dir.name == "release" or saved_iteration is None
    if fresh and not (release or finetune):
        log(f"note: {it_dir} has no adapters: the LoRA run starts from its weights at iteration 0 with a fresh "
            f"optimizer (as --finetune)")
    finetune = finetune or fresh
    iteration = 0 if (release or finetune) else saved_iteration
    consumed = 0 if (release or finetune) else plain_int(own.get("consumed_train_samples")) or 0
    if foreign:
        # Their optimizer state is megatron's own (DP-sharded, by its param order) and their scheduler and RNG
        # sit in objects this reader leaves unread: only the weights carry over.
        log(f"note: {load_dir} has no {META_FILE} (MindSpeed-MM's layout, {old.describe()}, {meta.tp_style} "
            f"convention): loaded the weights only; optimizer, LR schedule and RNG start afresh"
            f"{f', skipped {resharder.extra_state} _extra_state entries' if resharder.extra_state else ''}")
    optimizer_loaded = False
    if optimizer is not None and load_optim and not (release or finetune or foreign):
        saved = own.get("optimizer")
        if saved is None:
            raise CheckpointFormatError(f"{it_dir}: saved without optimizer state (--no-save-optim); resume "
                                        f"with --no-load-optim or --finetune")
        if same:
            state = saved
        else:
            state = {"step": saved["step"], "kinds": saved["kinds"], "chunks": [{} for _ in chunks]}
            for kind in saved["kinds"]:
                per_chunk = resharder.section(
                    lambda o, v, k=kind: o["optimizer"]["chunks"][v].get(k), tp_rank, pp_rank, ep_rank)
                for c, sd in zip(state["chunks"], per_chunk):
                    c[kind] = sd
        load_optimizer_state_model_space(optimizer, chunks, state)
        for opt, s in zip(_leaf_optimizers(optimizer), own.get("grad_scaler") or []):
            if s is not None and getattr(opt, "grad_scaler", None) is not None:
                opt.grad_scaler.load_state_dict(s)
        if scheduler is not None and own.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(own["opt_param_scheduler"])
        optimizer_loaded = True
    if load_rng and not (release or finetune or foreign) and "rng_state" in own:
        states = own["rng_state"]
        if same and len(states) == torch.distributed.get_world_size(_dp_cp_group()):
            _set_rng_state(states[torch.distributed.get_rank(_dp_cp_group())])
        else:
            log("note: RNG states not restored (the data-parallel layout changed)")
    log(f"loaded {it_dir} (iteration {iteration}, {consumed} samples consumed"
        f"{', optimizer state' if optimizer_loaded else ''})")
    data_state = None if (release or finetune or foreign) else own.get("data_state")
    training_state = None if (release or finetune or foreign) else own.get("training_state")
    return LoadedState(iteration, consumed, meta, optimizer_loaded, same, ckpt, data_state, training_state)
