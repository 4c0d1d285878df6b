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

from mindspeed_mm.checkpoint.opening import Checkpoint, open_base, open_checkpoint
from mindspeed_mm.checkpoint.fingerprint import add_stats, check_fingerprint, tensor_stats
from mindspeed_mm.checkpoint.mm_format import (
    MMCheckpointMeta, chunk_key, has_meta, iteration_dir, load_rank_object, plain_int,
    rank_file, read_rank_file,
)
from mindspeed_mm.checkpoint.torch_file import StoredTensor
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict
from mindspeed_mm.models.internvl.params import OUTPUT_LAYER, lookup, tp_kind
from mindspeed_mm.models.internvl.sharding import (
    ExpertShard, global_name, local_state_dict, merge_tensor, shard_tensor, stage_name,
)
from mindspeed_mm.parallel.layout import LayoutPlan, rank_file_keys

__all__ = ["build_model_chunks", "load_full_weights", "load_converted_weights", "Resharder", "Checkpoint",
           "open_checkpoint", "checkpoint_weights", "this_rank", "counted_parameters", "base_fingerprint", "base_reference", "load_adapters"]


def build_model_chunks(spec: InternVLSpec, plan: LayoutPlan, cp_algo: str = "megatron_cp_algo",
                       seed: int = 1234) -> list[InternVLModel]:
    """One InternVLModel per virtual-pipeline chunk held by this rank, in chunk order; `seed` draws the LoRA
    adapters' initial A (the same at every layout)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(plan.num_chunks):
        chunk = InternVLModel(spec, plan=plan, stage=plan.stage(pp_rank, v), cp_algo=cp_algo, seed=seed)
        if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
            chunk.cuda(torch.cuda.current_device())  # configs initialise on CPU (use_cpu_initialization)
        chunks.append(chunk)
    return chunks


def load_full_weights(chunks: list[InternVLModel], full: Mapping[str, Tensor]) -> None:
    """Load this rank's slices of an unsharded state dict (TP and expert-parallel ranks from megatron's groups)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        load_full_state_dict(chunk, local_state_dict(full, chunk.spec, chunk.plan, tp_rank, chunk.stage,
                                                     ep_rank=chunk.experts.rank))


def _as_torch(t: StoredTensor) -> Tensor:
    x = torch.from_numpy(t.array)  # a view of the file's private mapping, as torch.load(mmap=True) gives
    return x.view(getattr(torch, t.dtype)) if t.dtype == "bfloat16" else x  # numpy holds bfloat16 as uint16


class Resharder:
    """Reads a checkpoint saved at layout `old` in TP style `style` and cuts what this rank holds at `new`
    through the registry's merge/shard functions; at the same layout and our style, a rank's own file as it is.
    Under expert parallelism each (tp, ep) file holds its EP rank's experts under local indices (global =
    ep_rank * local count + j), renumbered here for `new`'s EP rank.

    `foreign`: a checkpoint without our metadata (another tool's), whose files may pickle objects that
    torch.load(weights_only=True) refuses (MindSpeed-MM's training saves): read with the allowlist reader, of
    each file only the weights (``_extra_state`` entries dropped, counted in `extra_state`) and the entries
    that are plain ints."""

    def __init__(self, iter_dir: Path, spec: InternVLSpec, old: LayoutPlan, new: LayoutPlan, style: str = "mm",
                 foreign: bool = False):
        self.iter_dir, self.spec, self.old, self.new, self.style = iter_dir, spec, old, new, style
        self.foreign, self.extra_state = foreign, 0
        self._objs: dict[tuple[int, int, int], dict] = {}

    @property
    def same(self) -> bool:
        return self.style == "mm" and self.old.same_split(self.new)

    def obj(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        key = (tp_rank, pp_rank, ep_rank)
        if key not in self._objs:
            path = rank_file(self.iter_dir, tp_rank, pp_rank, self.old.parallel.pp, ep_rank, self.old.parallel.ep)
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

    def section(self, pick: Callable[[dict, int], Optional[dict]], tp_rank: int, pp_rank: int,
                ep_rank: int = 0) -> list[dict]:
        """`pick(rank_object, vpp_rank)` -> that chunk's {local name: tensor} (or None), cut for this rank at
        `new` (one dict per chunk)."""
        old = self.old.parallel
        num_experts = self.spec.text.num_experts
        # global name -> {TP rank (an expert's: expert-TP rank) -> shard}; of the copies of a dense tensor that
        # every EP rank's file holds, the lowest EP rank's
        where: dict[str, dict[int, Tensor]] = {}
        for stage in self.old.stages:
            for t, e in rank_file_keys(old):
                experts = ExpertShard.of(num_experts, old.ep, e)
                sd = pick(self.obj(t, stage.stage % old.pp, e), stage.stage // old.pp) or {}
                for local, tensor in sd.items():
                    name = global_name(local, stage, experts)
                    r = t % old.expert_tp if lookup(name)[0].per_expert else t
                    where.setdefault(name, {}).setdefault(r, tensor)
        new = self.new.parallel
        experts = ExpertShard.of(num_experts, new.ep, ep_rank)
        out = []
        for v in range(self.new.num_chunks):
            stage = self.new.stage(pp_rank, v)
            sd = {}
            for name, shards in where.items():
                local = stage_name(name, stage, experts)
                if local is None:
                    continue
                full = merge_tensor(name, [shards[t] for t in range(len(shards))], self.spec, self.style)
                sd[local] = shard_tensor(name, full, self.spec, new.tp, tp_rank, self.new.padded_vocab_size,
                                         etp=new.expert_tp).clone()
            out.append(sd)
        return out

    def weights(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> list[dict[str, Tensor]]:
        """This rank's model chunks at `new`."""
        if self.same:
            obj = self.obj(tp_rank, pp_rank, ep_rank)
            return [obj[chunk_key(v, self.new.num_chunks)] for v in range(self.new.num_chunks)]
        return self.section(lambda o, v: o.get(chunk_key(v, self.old.num_chunks)), tp_rank, pp_rank, ep_rank)


def load_converted_weights(chunks: list[InternVLModel], mm_dir, style: str = "mm") -> None:
    """Load this rank's part of an MM checkpoint saved at the chunks' layout in TP style `style` (an
    mm-convert output, a training save, an adapter save on top of its base, or a MindSpeed-MM one without
    metadata: see `Resharder`)."""
    spec, plan = chunks[0].spec, chunks[0].plan
    mm_dir = Path(mm_dir)
    if has_meta(mm_dir):
        ckpt = open_checkpoint(mm_dir, spec, "from_pretrained")
    else:
        ckpt = Checkpoint(mm_dir, iteration_dir(mm_dir), MMCheckpointMeta.from_plan(
            plan, spec, source_format="native", source_hf_dir=None, hf_config={}, tp_style=style), plan, True)
    weights, _ = checkpoint_weights(ckpt, spec, plan)
    for chunk, state in zip(chunks, weights):
        load_full_state_dict(chunk, state)
    check_base(chunks, ckpt)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints as a whole: their layout, and adapter saves on top of their base
# ------------------------------------------------------------------------------------------------------------

def checkpoint_weights(ckpt: Checkpoint, spec: InternVLSpec, plan: LayoutPlan) -> tuple[list[dict], Resharder]:
    """This rank's full chunk state dicts at `plan`, and the checkpoint's Resharder (for its other sections).
    An adapter save's tensors go on top of its base's, each resharded from the layout it was saved at."""
    ranks = this_rank(plan)
    resharder = Resharder(ckpt.it_dir, spec, ckpt.plan, plan, ckpt.meta.tp_style, ckpt.foreign)
    weights = resharder.weights(*ranks)
    if ckpt.meta.base is not None:
        base = open_base(ckpt.root, ckpt.meta, spec)
        under = Resharder(base.it_dir, spec, base.plan, plan, base.meta.tp_style, base.foreign)
        weights = [{**b, **w} for b, w in zip(under.weights(*ranks), weights)]
    return weights, resharder


def this_rank(plan: LayoutPlan) -> tuple[int, int, int]:
    """(tp_rank, pp_rank, ep_rank) of this process: which rank file of `plan` is its own."""
    ep_rank = parallel_state.get_expert_model_parallel_rank() if plan.parallel.ep > 1 else 0
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
            ep_rank)


def counted_parameters(chunks):
    """(full-model name, parameter) of what this rank contributes when a figure is summed over all ranks once per
    element of the full model: every TP slice (a replicated tensor on TP rank 0 only), one DP and CP replica,
    the tied embeddings' second copy (the LLM's last stage's output layer) never. Vocabulary padding rows are
    in the slices: zeros, for a caller to leave out where it counts elements. Under expert parallelism the EP
    ranks are data-parallel ones holding other experts: an expert's slice counts on expert-data-parallel rank 0
    (every expert-TP rank of every EP rank)."""
    dense = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        chunk = chunk.module if hasattr(chunk, "module") else chunk
        sparse = chunk.plan.parallel.ep > 1
        expert = sparse and parallel_state.get_expert_data_parallel_rank() == 0
        for local_name, p in chunk.named_parameters():
            if local_name == OUTPUT_LAYER and chunk.stage.has_tied_output:
                continue
            name = global_name(local_name, chunk.stage, chunk.experts)
            if not (expert if sparse and lookup(name)[0].per_expert else dense):
                continue
            if tp_kind(name) == "replicate" and tp_rank != 0:
                continue
            yield name, p


def base_fingerprint(chunks: list[InternVLModel], names: Optional[set] = None) -> dict[str, list[float]]:
    """`checkpoint.fingerprint` of the model's frozen parameters (or of `names`), over all ranks
    (`counted_parameters`). Collective."""
    local: dict[str, list[float]] = {}
    for name, p in counted_parameters(chunks):
        if name in names if names is not None else not p.requires_grad:
            add_stats(local, name, tensor_stats(p.detach()))
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    out: dict[str, list[float]] = {}
    for part in gathered:
        for name, stats in part.items():
            add_stats(out, name, stats)
    return dict(sorted(out.items()))


def base_reference(ckpt: Checkpoint, chunks: list[InternVLModel]) -> dict:
    """What an adapter save trained from `ckpt` records of its base: `ckpt` itself when it holds every weight,
    else `ckpt`'s own base (resuming an adapter save). Collective."""
    if ckpt.meta.base is not None:
        return ckpt.meta.base
    return {"dir": str(ckpt.root), "iteration": ckpt.it_dir.name, "fingerprint": base_fingerprint(chunks)}


def check_base(chunks: list[InternVLModel], ckpt: Checkpoint, loaded: Optional[str] = None) -> None:
    """The base loaded into `chunks` (from `loaded`; default: the one `ckpt` records) must be the one the
    adapters of `ckpt` were trained on. Collective."""
    base = ckpt.meta.base
    if base is not None:
        actual = base_fingerprint(chunks, set(base["fingerprint"]))
        where = loaded or f"{base['dir']}/{base.get('iteration', '')}"
        check_fingerprint(base["fingerprint"], actual, where, str(ckpt.root))


def load_adapters(chunks: list[InternVLModel], full: Mapping[str, Tensor], source: str) -> None:
    """Load full-model adapter matrices (and any other trainable tensors) into this rank's chunks: every LoRA
    parameter of the chunks must be given, each with its full shape."""
    from mindspeed_mm.models.internvl.params import is_adapter, lookup

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    spec = chunks[0].spec
    for chunk in chunks:
        own = dict(chunk.global_names())
        wanted = {n for n in own if is_adapter(n)}
        missing = sorted(wanted - set(full))
        if missing:
            raise CheckpointFormatError(f"{source}: no tensor for {len(missing)} adapter matrices of the model, "
                                        f"e.g. {missing[0]} (other targets or layers?)")
        with torch.no_grad():
            for name in wanted | (set(full) & set(own)):
                t = full[name]
                shape = tuple(lookup(name)[0].shape(spec))
                if tuple(t.shape) != shape:
                    raise CheckpointFormatError(f"{source}: {name} has shape {tuple(t.shape)}, the model's is "
                                                f"{shape} (another rank or model?)")
                own[name].copy_(shard_tensor(name, t, spec, chunk.plan.parallel.tp, tp_rank,
                                             chunk.plan.padded_vocab_size,
                                             etp=chunk.plan.parallel.expert_tp).to(own[name].dtype))


def load_adapter_dir(path, chunks: list[InternVLModel], log: Callable[[str], None] = print) -> None:
    """`--load-adapter`: adapters on top of the loaded base, from a PEFT adapter directory (transformers' native
    InternVL names) or an adapter save of ours (any layout; its base's fingerprint checked against the loaded
    one). Every LoRA parameter of the chunks must be given."""
    from mindspeed_mm.checkpoint.adapters import check_same_loras, is_peft_dir, read_peft_adapter
    from mindspeed_mm.models.internvl.params import is_adapter

    spec, plan = chunks[0].spec, chunks[0].plan
    if is_peft_dir(path):
        _, loras, tensors = read_peft_adapter(path)
        check_same_loras(spec, loras, str(path))
        load_adapters(chunks, tensors, str(path))
        log(f"loaded the PEFT adapter {path} ({len(tensors)} matrices)")
        return
    ckpt = open_checkpoint(path, spec, "--load-adapter")
    if ckpt.meta.base is None:
        raise CheckpointFormatError(f"--load-adapter {ckpt.root}: a full checkpoint, not an adapter save (use --load)")
    saved = ckpt.meta.spec()
    check_same_loras(spec, {"vision": saved.vision.lora, "text": saved.text.lora}, str(ckpt.root))
    resharder = Resharder(ckpt.it_dir, spec, ckpt.plan, plan, ckpt.meta.tp_style)
    weights = resharder.weights(*this_rank(plan))
    with torch.no_grad():
        for chunk, sd in zip(chunks, weights):
            own = dict(chunk.named_parameters())
            missing = sorted(n for n in own if is_adapter(n) and n not in sd)
            if missing or set(sd) - set(own):
                raise CheckpointFormatError(f"--load-adapter {ckpt.root}: does not fit the model (missing "
                                            f"{missing[:3]}, unexpected {sorted(set(sd) - set(own))[:3]})")
            for name, t in sd.items():
                own[name].copy_(t)
    check_base(chunks, ckpt, loaded="by --load")
    log(f"loaded the adapters of {ckpt.it_dir} (their base's fingerprint matches the loaded one)")
