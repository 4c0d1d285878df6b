"""Parallel sizes of a run, and the per-stage layer lists a user writes for a checkpoint's layout."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["ParallelSizes", "ParallelConfig"]


@dataclass(frozen=True)
class ParallelSizes:
    """tp/pp/cp/dp degrees, virtual-pipeline chunks per stage (``vpp``, None = not interleaved; 1 becomes None) and
    sequence parallelism (``sp``, needs tp > 1). ``world_size = tp * pp * cp * dp``.

    Expert parallelism, as megatron-core folds it: ``ep`` experts' ranks and ``etp`` (None: = tp, megatron's
    default) the experts' own TP size. The experts regroup the ranks of one pipeline stage (tp*cp*dp of them)
    into etp x ep x expert-DP, so ep adds no ranks and tp*cp*dp must be a multiple of etp*ep."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    dp: int = 1
    ep: int = 1
    etp: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelSizes.{name} must be an int >= 1, got {value!r}")
        if self.etp is not None:
            if isinstance(self.etp, bool) or not isinstance(self.etp, int) or self.etp < 1:
                raise ValueError(f"ParallelSizes.etp must be null or an int >= 1, got {self.etp!r}")
            if self.etp not in (1, self.tp):
                # the checkpoint's TP slicing knows an expert unsplit or split as the dense MLP is, nothing between
                raise ValueError(f"ParallelSizes.etp={self.etp}: expert tensor parallelism must be 1 or tp={self.tp}")
            if self.etp < self.tp and self.ep == 1:
                # megatron marks expert weights `allreduce=False` (reduced over the expert-DP group) only at
                # ep > 1; at ep 1 DDP would reduce them over DP alone, missing the other TP ranks' tokens
                raise ValueError(f"ParallelSizes.etp={self.etp} below tp={self.tp} needs ep > 1 (megatron-core "
                                 "reduces expert gradients over the expert-data-parallel group only under EP)")
        stage_ranks, expert_mp = self.tp * self.cp * self.dp, self.expert_tp * self.ep
        if stage_ranks % expert_mp:
            raise ValueError(f"ParallelSizes: tp*cp*dp = {self.tp}*{self.cp}*{self.dp} = {stage_ranks} ranks per "
                             f"pipeline stage are not a multiple of etp*ep = {self.expert_tp}*{self.ep} = {expert_mp}")
        if self.vpp is not None:
            if isinstance(self.vpp, bool) or not isinstance(self.vpp, int) or self.vpp < 1:
                raise ValueError(f"ParallelSizes.vpp must be null or an int >= 1, got {self.vpp!r}")
            if self.vpp > 1 and self.pp == 1:
                raise ValueError(f"ParallelSizes.vpp={self.vpp} needs pp > 1")
            if self.vpp == 1:  # the one place VPP is normalised: megatron takes None for "not interleaved"
                object.__setattr__(self, "vpp", None)
        if not isinstance(self.sp, bool):
            raise ValueError(f"ParallelSizes.sp must be a bool, got {self.sp!r}")
        if self.sp and self.tp == 1:
            raise ValueError("ParallelSizes.sp (sequence parallelism) needs tp > 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        """The experts' TP size megatron runs: etp, or tp when unset."""
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard: the ranks the expert gradients are reduced over."""
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    @classmethod
    def from_world_size(cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1,
                        vpp: Optional[int] = None, sp: bool = False, ep: int = 1,
                        etp: Optional[int] = None) -> "ParallelSizes":
        """Derive dp from the number of ranks; the model-parallel product must divide it."""
        mp = tp * pp * cp
        if world_size < 1 or world_size % mp:
            raise ValueError(f"world size {world_size} is not a multiple of tp*pp*cp = {tp}*{pp}*{cp} = {mp}")
        return cls(tp=tp, pp=pp, cp=cp, vpp=vpp, sp=sp, dp=world_size // mp, ep=ep, etp=etp)

    @classmethod
    def smallest(cls, *, tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None, sp: bool = False,
                 ep: int = 1, etp: Optional[int] = None) -> "ParallelSizes":
        """The fewest ranks these degrees run on: dp 1, or as many replicas as the expert groups need (EP2 at TP1
        takes two data-parallel ranks). For checks made before the world size is known."""
        try:
            expert_mp = (tp if etp is None else etp) * ep
            dp = max(1, expert_mp // math.gcd(tp * cp, expert_mp))
        except (TypeError, ZeroDivisionError):  # bad degrees: the constructor says which
            dp = 1
        return cls(tp=tp, pp=pp, cp=cp, vpp=vpp, sp=sp, dp=dp, ep=ep, etp=etp)


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ParallelConfig:
    """A layout as the reference's converter spells it (`--cfg.parallel_config.*`); `parallel.layout.
    plan_from_parallel_config` validates it against a model and says what every stage holds."""
    llm_pp_layers: Optional[List[List[int]]] = _h(
        "LLM decoder layers per pipeline stage, one inner list per virtual stage: [[6,8,8,6]] is pp=4; "
        "[[2,2],[2,2]] is pp=2, vpp=2. pp = len(inner list), vpp = len(outer list). Default: pp=1.", default=None)
    vit_pp_layers: Optional[List[List[int]]] = _h(
        "ViT layers per pipeline stage, same shape as llm_pp_layers, e.g. [[24,0,0,0]]. Default: all ViT layers "
        "on the first stage.", default=None)
    tp_size: int = _h("Tensor-parallel size; must divide the LLM's key/value head count.", default=1)
    vit_tp_size: int = _h("Accepted for compatibility with the reference; must be 0 (= tp_size) or tp_size.",
                          default=0)
    ep_size: int = _h("Expert-parallel size: experts per rank = num_experts / ep_size; 1 for a dense LLM.",
                      default=1)
    etp_size: int = _h("The experts' tensor-parallel size: 0 (= tp_size, megatron's default), 1 or tp_size.",
                       default=0)
