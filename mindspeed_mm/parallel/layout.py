"""The layout plan: which layers, embeddings and heads every (virtual) pipeline stage holds, validated
before any process group is built.

Users write the pipeline split per module, as in the reference system: `vit_pp_layers [[24,0,0,0]]`,
`llm_pp_layers [[6,8,8,6]]`, one inner list per virtual stage (`[vpp][pp]`). Stages are numbered in the
interleaved schedule's order, `stage = vpp_rank * pp + pp_rank`. The ViT occupies a contiguous run of
stages starting at stage 0 and the LLM a contiguous run ending at the last one; they may share one stage
(the ViT's last and the LLM's first), where the image features are spliced in without a boundary.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.config.parallel import ParallelConfig, ParallelSizes
from mindspeed_mm.errors import UserError
from mindspeed_mm.parallel.sharding import uneven_split


class LayoutError(UserError):
    """A layout the project cannot run; the message names the offending field and value."""


@dataclass(frozen=True)
class StagePlan:
    stage: int
    vit_layers: range  # global ViT layer indices held by this stage
    llm_layers: range
    has_vit_embed: bool  # patch/position embeddings (the ViT's first stage)
    has_projector: bool  # pixel shuffle + projector (the ViT's last stage)
    has_llm_embed: bool  # token embeddings + image splice (the LLM's first stage)
    has_llm_head: bool  # final norm, output layer, loss (the LLM's last stage = the last stage)
    # tied embeddings, the head without the embedding: megatron's copy of the token embeddings as the output
    # layer (`output_layer.weight`, as MindSpeed-MM's files hold it), kept equal by the training loop
    # (`training.pipeline`: the copies' gradients are summed, see `LayoutPlan.tied_embedding_pp_ranks`)
    has_tied_output: bool = False

    @property
    def has_vit(self) -> bool:
        return self.has_vit_embed or len(self.vit_layers) > 0 or self.has_projector

    @property
    def has_llm(self) -> bool:
        return len(self.llm_layers) > 0


@dataclass(frozen=True)
class LayoutPlan:
    parallel: ParallelSizes
    vit_pp_layers: tuple[tuple[int, ...], ...]  # [vpp][pp]
    llm_pp_layers: tuple[tuple[int, ...], ...]
    stages: tuple[StagePlan, ...]  # flat, in schedule order
    padded_vocab_size: int  # the vocabulary padded to a multiple of TP (padding logits are masked)

    @property
    def num_chunks(self) -> int:
        return len(self.vit_pp_layers)

    @property
    def vpp(self) -> Optional[int]:
        """Virtual stages per rank as megatron takes them: None unless interleaved."""
        return self.num_chunks if self.num_chunks > 1 else None

    @property
    def tied_embedding_pp_ranks(self) -> tuple[int, ...]:
        """The pipeline ranks holding a copy of tied embeddings split over stages: the LLM's first stage's and
        the last (the output layer's copy, `has_tied_output`), one rank when both are chunks of the same rank;
        () when there is one copy. Training sums the copies' gradients over megatron's embedding group, which
        `distributed.initialize_model_parallel` builds of these ranks (megatron's default, the first and last
        pipeline rank, assumes the LLM's embedding on pipeline rank 0; here the ViT comes first)."""
        if not any(s.has_tied_output for s in self.stages):
            return ()
        first = next(s.stage for s in self.stages if s.has_llm_embed)
        pp = self.parallel.pp
        return tuple(sorted({first % pp, pp - 1}))

    def stage(self, pp_rank: int, vpp_rank: int = 0) -> StagePlan:
        return self.stages[vpp_rank * self.parallel.pp + pp_rank]

    def same_split(self, other: "LayoutPlan") -> bool:
        """Whether both put the same layers and experts on the same ranks at the same TP sizes (dp and cp aside)."""
        key = lambda p: (p.parallel.tp, p.parallel.pp, p.num_chunks, p.vit_pp_layers, p.llm_pp_layers,  # noqa: E731
                         p.parallel.ep, p.parallel.expert_tp)
        return key(self) == key(other)

    def describe(self) -> str:
        p = self.parallel
        experts = (f" EP{p.ep}" if p.ep > 1 else "") + (f" ETP{p.expert_tp}" if p.expert_tp != p.tp else "")
        return (f"TP{p.tp} PP{p.pp}" + (f" VPP{self.num_chunks}" if self.num_chunks > 1 else "") + experts
                + f" vit{[list(r) for r in self.vit_pp_layers]} llm{[list(r) for r in self.llm_pp_layers]}")


def rank_file_keys(parallel: ParallelSizes) -> tuple[tuple[int, int], ...]:
    """(tp_rank, ep_rank) of every rank file of one pipeline stage, as megatron's ranks hold them: the experts
    regroup a stage's ranks etp-first (expert-TP rank r % etp, EP rank (r // etp) % ep) over the same ranks the
    dense TP ranks (r % tp) come from, so only the pairs some rank has get a file. With etp == tp that is every
    pair; with etp 1, tp 2, ep 2 only (0, 0) and (1, 1). The pattern repeats every lcm(tp, etp * ep) ranks."""
    tp, ep, etp = parallel.tp, parallel.ep, parallel.expert_tp
    return tuple(sorted({(r % tp, (r // etp) % ep) for r in range(math.lcm(tp, etp * ep))}))


def dense_file_key(parallel: ParallelSizes, tp_rank: int) -> tuple[int, int]:
    """The rank file a dense tensor's TP slice `tp_rank` is read from: every EP rank's file holds it, the
    lowest is read."""
    return min(k for k in rank_file_keys(parallel) if k[0] == tp_rank)


def expert_file_key(parallel: ParallelSizes, ep_rank: int, etp_rank: int) -> tuple[int, int]:
    """The rank file an expert of EP rank `ep_rank` is read from at expert-TP rank `etp_rank`: one whose TP rank
    cuts the experts there (tp_rank % etp), the lowest."""
    etp = parallel.expert_tp
    return min(k for k in rank_file_keys(parallel) if k[1] == ep_rank and k[0] % etp == etp_rank)


def head_partition(num_heads: int, tp: int) -> list[int]:
    """Heads per TP rank without padding: the first `num_heads % tp` ranks get one more (25 on 8: 4,3,...,3)."""
    return uneven_split(num_heads, tp)


def _normalise(name: str, layers, pp: int, vpp: int, num_layers: int) -> tuple[tuple[int, ...], ...]:
    if layers is None:  # even split over pp*vpp stages, remainder to the last ones
        n = pp * vpp
        flat = [num_layers // n + (i >= n - num_layers % n) for i in range(n)]
        return tuple(tuple(flat[v * pp:(v + 1) * pp]) for v in range(vpp))
    if isinstance(layers, Sequence) and layers and all(isinstance(x, int) for x in layers):
        layers = [layers]
    if not (isinstance(layers, Sequence) and layers and all(isinstance(x, Sequence) for x in layers)):
        raise LayoutError(f"{name}: expected a list of lists of layer counts, got {layers!r}")
    out = tuple(tuple(x) for x in layers)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for row in out for n in row):
        raise LayoutError(f"{name}: layer counts must be integers >= 0, got {layers!r}")
    if len(out) != vpp:
        raise LayoutError(f"{name}: {len(out)} virtual-stage list(s) but the run has vpp={vpp}: {layers!r}")
    for row in out:
        if len(row) != pp:
            raise LayoutError(f"{name}: {list(row)} has {len(row)} entries but the run has pp={pp}")
    total = sum(map(sum, out))
    if total != num_layers:
        raise LayoutError(f"{name}: {[list(r) for r in out]} sums to {total} but the model has {num_layers} layers")
    return out


def _contiguous_run(name: str, counts: list[int]) -> tuple[int, int]:
    nonzero = [i for i, n in enumerate(counts) if n]
    first, last = nonzero[0], nonzero[-1]
    if nonzero != list(range(first, last + 1)):
        raise LayoutError(f"{name}: the stages holding layers must be consecutive in schedule order "
                          f"(stage = vpp_rank*pp + pp_rank), got per-stage counts {counts}")
    return first, last


@dataclass(frozen=True)
class LayoutNames:
    """What the user called the inputs a layout error names: the keys of the file or the flags they wrote."""
    vit: str = "vit_pp_layers"
    llm: str = "llm_pp_layers"
    tp: str = "tensor_model_parallel_size"
    ep: str = "expert_model_parallel_size"
    etp: str = "expert_tensor_parallel_size"


def _check_experts(spec: InternVLSpec, parallel: ParallelSizes, names: LayoutNames) -> ParallelSizes:
    """The expert split against the LLM; a dense LLM's plan forgets etp, which nothing of it uses (so layouts
    differing only there hold the same rank files)."""
    t = spec.text
    if not t.moe:
        if parallel.ep > 1:
            raise LayoutError(f"{names.ep}={parallel.ep}: the LLM (text_decoder.model_id {t.model_id!r}) has no "
                              "experts; expert parallelism needs a mixture-of-experts LLM (qwen3_moe)")
        return dataclasses.replace(parallel, etp=None) if parallel.etp is not None else parallel
    if t.num_experts % parallel.ep:
        raise LayoutError(f"{names.ep}={parallel.ep}: text_decoder.num_experts={t.num_experts} cannot be split "
                          "evenly over it")
    if t.moe_ffn_hidden_size % parallel.expert_tp:
        raise LayoutError(f"{names.etp}={parallel.expert_tp}: text_decoder.moe_ffn_hidden_size="
                          f"{t.moe_ffn_hidden_size} is not divisible by it")
    return parallel


def plan_layout(spec: InternVLSpec, parallel: ParallelSizes, world_size: Optional[int] = None,
                vit_pp_layers=None, llm_pp_layers=None, names: LayoutNames = LayoutNames()) -> LayoutPlan:
    """Validate a layout against the model and the world, and say what every stage holds.

    The per-stage lists default to the spec's `pipeline_num_layers`, then to an even split. Errors name the
    inputs as `names` says."""
    tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
    vpp = parallel.vpp or 1
    if world_size is not None:
        if pp > world_size:
            raise LayoutError(f"pipeline_model_parallel_size={pp} is more stages than the {world_size} ranks")
        if world_size % (tp * pp * cp):
            raise LayoutError(f"world size {world_size} is not a multiple of tp*pp*cp = {tp}*{pp}*{cp}")
        etp, ep = parallel.expert_tp, parallel.ep
        if world_size % (etp * ep * pp):
            raise LayoutError(f"world size {world_size} is not a multiple of etp*ep*pp = {etp}*{ep}*{pp} "
                              f"({names.etp}, {names.ep}, pipeline_model_parallel_size)")
    v, t = spec.vision, spec.text
    parallel = _check_experts(spec, parallel, names)
    if t.num_query_groups % tp:
        raise LayoutError(f"{names.tp}={tp}: the LLM's num_query_groups={t.num_query_groups} "
                          "cannot be split evenly over it")
    for name, size in (("text_decoder.hidden_size", t.hidden_size), ("text_decoder.ffn_hidden_size", t.ffn_hidden_size),
                       ("vision_encoder.hidden_size", v.hidden_size), ("vision_encoder.ffn_hidden_size", v.ffn_hidden_size)):
        if size % tp:
            raise LayoutError(f"{names.tp}={tp}: {name}={size} is not divisible by it")
    if v.num_attention_heads < tp:
        raise LayoutError(f"{names.tp}={tp}: more ranks than the ViT's {v.num_attention_heads} heads")
    vit = _normalise(names.vit, vit_pp_layers if vit_pp_layers is not None else v.pipeline_num_layers,
                     pp, vpp, v.num_layers)
    llm = _normalise(names.llm, llm_pp_layers if llm_pp_layers is not None else t.pipeline_num_layers,
                     pp, vpp, t.num_layers)
    vit_flat = [n for row in vit for n in row]
    llm_flat = [n for row in llm for n in row]
    n_stages = len(vit_flat)
    v_first, v_last = _contiguous_run(names.vit, vit_flat)
    l_first, l_last = _contiguous_run(names.llm, llm_flat)
    if v_first != 0:
        raise LayoutError(f"{names.vit}: the ViT must start on the first stage, per-stage counts {vit_flat}")
    if l_last != n_stages - 1:
        raise LayoutError(f"{names.llm}: the LLM must end on the last stage (it computes the loss), "
                          f"per-stage counts {llm_flat}")
    if l_first < v_last:
        raise LayoutError(f"{names.llm}: LLM layers on stage {l_first} come before the ViT's last stage "
                          f"{v_last} (vit {vit_flat}, llm {llm_flat})")
    if l_first > v_last + 1:
        raise LayoutError(f"stages {list(range(v_last + 1, l_first))} hold no layers (vit {vit_flat}, llm {llm_flat})")

    stages, v_off, l_off = [], 0, 0
    for s in range(n_stages):
        stages.append(StagePlan(
            stage=s,
            vit_layers=range(v_off, v_off + vit_flat[s]),
            llm_layers=range(l_off, l_off + llm_flat[s]),
            has_vit_embed=s == v_first, has_projector=s == v_last,
            has_llm_embed=s == l_first, has_llm_head=s == l_last,
            has_tied_output=t.tied and s == l_last != l_first,
        ))
        v_off += vit_flat[s]
        l_off += llm_flat[s]
    padded_vocab = -(-t.vocab_size // tp) * tp
    return LayoutPlan(parallel, vit, llm, tuple(stages), padded_vocab)


def plan_from_parallel_config(spec: InternVLSpec, pc: ParallelConfig) -> LayoutPlan:
    """The layout a user wrote as per-stage lists (`ParallelConfig`), validated against the model; errors
    name the field."""
    for name in ("ep_size", "etp_size"):
        value = getattr(pc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "ep_size" else 0):
            raise LayoutError(f"parallel_config.{name} must be an integer >= {1 if name == 'ep_size' else 0}, "
                              f"got {value!r}")
    if pc.vit_tp_size not in (0, pc.tp_size):
        raise LayoutError(f"parallel_config.vit_tp_size={pc.vit_tp_size}: a separate ViT TP size is not supported "
                          f"(use 0 or tp_size={pc.tp_size})")
    if isinstance(pc.tp_size, bool) or not isinstance(pc.tp_size, int) or pc.tp_size < 1:
        raise LayoutError(f"parallel_config.tp_size must be an integer >= 1, got {pc.tp_size!r}")
    llm, vit = pc.llm_pp_layers, pc.vit_pp_layers
    for name, val in (("llm_pp_layers", llm), ("vit_pp_layers", vit)):
        if val is not None and not (isinstance(val, (list, tuple)) and val
                                    and all(isinstance(r, (list, tuple)) and r for r in val)):
            raise LayoutError(f"parallel_config.{name}: expected a non-empty list of non-empty lists, got {val!r}")
        if val is not None and len({len(r) for r in val}) > 1:
            raise LayoutError(f"parallel_config.{name}: {_compact(val)} has inner lists of lengths "
                              f"{[len(r) for r in val]}; each needs one entry per pipeline stage")
    if llm is not None and vit is not None and (len(llm), len(llm[0])) != (len(vit), len(vit[0])):
        # pp and vpp are read off llm_pp_layers: name it too, not vit_pp_layers alone
        n, what, run = ((len(vit[0]), "entries", f"pp={len(llm[0])}") if len(vit[0]) != len(llm[0])
                        else (len(vit), "virtual-stage lists", f"vpp={len(llm)}"))
        raise LayoutError(f"parallel_config: vit_pp_layers {_compact(vit)} has {n} {what} but the run has {run}, read "
                          f"off llm_pp_layers {_compact(llm)}; give both the same [vpp][pp] shape")
    shape_src = llm if llm is not None else vit
    if shape_src is None:
        pp, vpp = 1, 1
    else:
        vpp, pp = len(shape_src), len(shape_src[0])
    if llm is None:
        if pp * vpp > 1:
            raise LayoutError("parallel_config.llm_pp_layers is required when vit_pp_layers spans several stages")
        llm = [[spec.text.num_layers]]
    if vit is None:
        vit = [[spec.vision.num_layers if (v, p) == (0, 0) else 0 for p in range(pp)] for v in range(vpp)]
    try:  # as few ranks as the split takes: EP may need data-parallel replicas (EP2 at TP1: two ranks)
        par = ParallelSizes.smallest(tp=pc.tp_size, pp=pp, vpp=vpp, ep=pc.ep_size, etp=pc.etp_size or None)
    except ValueError as e:
        raise LayoutError(f"parallel_config: {e}") from None
    return plan_layout(spec, par, par.world_size, vit, llm, _PARALLEL_CONFIG_NAMES)


_PARALLEL_CONFIG_NAMES = LayoutNames("parallel_config.vit_pp_layers", "parallel_config.llm_pp_layers",
                                     "parallel_config.tp_size", "parallel_config.ep_size", "parallel_config.etp_size")


def _compact(rows) -> str:
    return json.dumps(rows, separators=(",", ":"))
