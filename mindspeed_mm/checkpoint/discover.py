"""The layout of an MM checkpoint that records none (no `mm_convert_meta.json`: MindSpeed-MM's converter output
or training save), read off its files and checked against the model spec.

- TP and PP sizes: the rank directories ``mp_rank_{tp:02d}[_{pp:03d}]`` (the grid must be complete);
- VPP: the number of ``model*`` chunks per file;
- layers per (virtual) stage, ViT and LLM: the layer indices in the key names (renumbered from 0 per stage);
- the TP style (`models.internvl.sharding.TP_STYLES`): from the projector, whole on every TP rank in
  MindSpeed-MM's files and split in ours (the styles coincide at TP 1, read as "mm").

Every tensor of every rank file is then checked, by name and shape, against what the registry says that rank
holds in that style. Only the pickles are read (`read_rank_file`); no tensor data is touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mindspeed_mm.checkpoint.mm_format import RankFile, iteration_dir, rank_dir_name, rank_file, read_rank_file
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.params import params
from mindspeed_mm.models.internvl.sharding import shard_slice, stage_name
from mindspeed_mm.parallel.layout import LayoutError, LayoutPlan, plan_layout

__all__ = ["Discovered", "discover"]

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
_VIT_LAYER = re.compile(r"image_encoder\.encoder\.encoder\.layers\.(\d+)\.")
_LLM_LAYER = re.compile(r"text_decoder\.decoder\.layers\.(\d+)\.")
_STYLE_PROBE = "image_encoder.projector.linear_fc1.weight"  # TP-split in "mm", whole in "mindspeed"


@dataclass(frozen=True)
class Discovered:
    iter_dir: Path
    plan: LayoutPlan
    tp_style: str


def _grid(iter_dir: Path) -> tuple[int, int]:
    found: dict[tuple[int, int], str] = {}
    suffixed = set()
    for p in sorted(iter_dir.iterdir()):
        if not p.name.startswith("mp_rank_"):
            continue
        m = _RANK_DIR.fullmatch(p.name)
        if not m or not p.is_dir():
            raise CheckpointFormatError(f"{p}: not a rank directory mp_rank_XX[_YYY] (expert parallelism is not "
                                        f"supported)")
        found[(int(m.group(1)), int(m.group(2) or 0))] = p.name
        suffixed.add(m.group(2) is not None)
    if not found:
        raise CheckpointFormatError(f"{iter_dir}: no mp_rank_* rank directories")
    if len(suffixed) > 1:
        raise CheckpointFormatError(f"{iter_dir}: mixes rank directories with and without a pipeline suffix "
                                    f"({sorted(found.values())[:4]})")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    if suffixed == {True} and pp == 1:
        raise CheckpointFormatError(f"{iter_dir}: rank directories have a pipeline suffix but there is only one "
                                    f"pipeline rank ({sorted(found.values())[0]})")
    for p in range(pp):
        for t in range(tp):
            if (t, p) not in found:
                raise CheckpointFormatError(f"{iter_dir}: rank directory {rank_dir_name(t, p, pp)} is missing "
                                            f"(the others make TP{tp} x PP{pp})")
    return tp, pp


def _layer_count(rf: RankFile, v: int, pattern: re.Pattern, what: str) -> int:
    ids = sorted({int(m.group(1)) for k in rf.chunks[v] for m in [pattern.match(k)] if m})
    if ids != list(range(len(ids))):
        raise CheckpointFormatError(f"{rf.path}: chunk {v} holds {what} layers {ids}, not 0..{len(ids) - 1} "
                                    f"(layers are renumbered from 0 on every stage)")
    return len(ids)


def discover(mm_dir: Path, spec: InternVLSpec, told: Optional[LayoutPlan] = None,
             told_as: str = "--cfg.parallel_config") -> Discovered:
    """The layout and TP style of the checkpoint at `mm_dir` (its tracker's iteration), from its files.
    `told`: the layout the user gave (`told_as` names where), which must be the one found."""
    iter_dir = iteration_dir(Path(mm_dir))
    tp, pp = _grid(iter_dir)
    files = {(t, p): read_rank_file(rank_file(iter_dir, t, p, pp)) for p in range(pp) for t in range(tp)}
    vpp = len(files[0, 0].chunks)
    for rf in files.values():
        if len(rf.chunks) != vpp:
            raise CheckpointFormatError(f"{rf.path}: has {len(rf.chunks)} model chunk(s), "
                                        f"{files[0, 0].path} has {vpp}")
    vit = [[_layer_count(files[0, p], v, _VIT_LAYER, "ViT") for p in range(pp)] for v in range(vpp)]
    llm = [[_layer_count(files[0, p], v, _LLM_LAYER, "LLM") for p in range(pp)] for v in range(vpp)]
    for what, counts, total in (("ViT", vit, spec.vision.num_layers), ("LLM", llm, spec.text.num_layers)):
        if sum(map(sum, counts)) != total:
            raise CheckpointFormatError(f"{iter_dir}: the rank files hold {what} layers {counts} per stage "
                                        f"(sum {sum(map(sum, counts))}), but the model config has {total}: a "
                                        f"checkpoint of another model (check --cfg.hf_config.hf_dir)?")
    try:
        plan = plan_layout(spec, ParallelSizes(tp=tp, pp=pp, vpp=vpp), tp * pp, vit, llm)
    except (LayoutError, ValueError) as e:
        raise CheckpointFormatError(f"{iter_dir}: the layout its files hold (TP{tp} PP{pp} VPP{vpp}, vit {vit}, "
                                    f"llm {llm}) is not one this model runs: {e}") from None
    if told is not None and not told.same_split(plan):
        raise LayoutError(f"{told_as} says {told.describe()}, but the rank files in {iter_dir} hold "
                          f"{plan.describe()} (leave {told_as} out to take the files' layout)")

    shapes = {p.name: p.shape for p in params(spec)}
    # global name -> [(stage, local name)]: tied embeddings are held twice (the last stage's output layer)
    where: dict[str, list[tuple[int, str]]] = {}
    for name in shapes:
        for s in plan.stages:
            local = stage_name(name, s)
            if local is not None:
                where.setdefault(name, []).append((s.stage, local))

    style = "mm"
    if tp > 1:
        stage, local = where[_STYLE_PROBE][0]
        probe = files[0, stage % pp].chunks[stage // pp].get(local)
        style = "mindspeed" if probe is not None and tuple(probe.array.shape) == shapes[_STYLE_PROBE] else "mm"

    for (t, p), rf in files.items():
        for v, sd in enumerate(rf.chunks):
            stage = plan.stage(p, v)
            want = {}
            for name, held in where.items():
                for s, local in held:
                    if s == stage.stage:
                        want[local] = shard_slice(name, shapes[name], spec, tp, t, plan.padded_vocab_size,
                                                  style).shape(shapes[name])
            extra, missing = sorted(set(sd) - set(want)), sorted(set(want) - set(sd))
            if extra:
                raise CheckpointFormatError(f"{rf.path}: chunk {v} has tensor(s) the model does not place on "
                                            f"stage {stage.stage} of {plan.describe()}: {extra[:3]}")
            if missing:
                raise CheckpointFormatError(f"{rf.path}: chunk {v} lacks {missing[:3]} (stage {stage.stage} of "
                                            f"{plan.describe()})")
            for local, shape in want.items():
                got = tuple(sd[local].array.shape)
                if got != shape:
                    raise CheckpointFormatError(
                        f"{rf.path}: chunk {v} {local} has shape {got}, expected {shape} at TP{tp} (TP rank {t}, "
                        f"{'MindSpeed-MM' if style == 'mindspeed' else 'mm-convert'} convention, read off "
                        f"{_STYLE_PROBE}); a checkpoint of another model (check --cfg.hf_config.hf_dir)?")
    return Discovered(iter_dir, plan, style)
