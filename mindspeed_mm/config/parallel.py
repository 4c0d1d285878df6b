"""Parallel sizes of a run, and the per-stage layer lists a user writes for a checkpoint's layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["ParallelSizes", "ParallelConfig"]


@dataclass(frozen=True)
class ParallelSizes:
    """tp/pp/cp/dp degrees, virtual-pipeline chunks per stage (``vpp``, None = not interleaved; 1 becomes None) and
    sequence parallelism (``sp``, needs tp > 1). ``world_size = tp * pp * cp * dp``."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelSizes.{name} must be an int >= 1, got {value!r}")
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

    @classmethod
    def from_world_size(cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1,
                        vpp: Optional[int] = None, sp: bool = False) -> "ParallelSizes":
        """Derive dp from the number of ranks; the model-parallel product must divide it."""
        mp = tp * pp * cp
        if world_size < 1 or world_size % mp:
            raise ValueError(f"world size {world_size} is not a multiple of tp*pp*cp = {tp}*{pp}*{cp} = {mp}")
        return cls(tp=tp, pp=pp, cp=cp, vpp=vpp, sp=sp, dp=world_size // mp)


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
    ep_size: int = _h("Accepted for compatibility with the reference; InternVL3 has no experts, must be 1.",
                      default=1)
