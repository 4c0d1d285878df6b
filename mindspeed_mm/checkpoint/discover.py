"""The layout of an MM checkpoint that records none (no `mm_convert_meta.json`: MindSpeed-MM's converter output
or training save), read off its files and checked against the model spec.

- TP, PP and EP sizes: the rank directories ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`` (the grid must be
  complete: every (tp, ep) pair megatron's ranks have, `parallel.layout.rank_file_keys`, on every pipeline
  rank); the experts' TP size from which pairs there are (etp 1 at TP > 1 leaves fewer);
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

from mindspeed_mm.checkpoint.mm_format import (
    RANK_FILE, RankFile, iteration_dir, rank_dir_name, rank_file, read_rank_file,
)
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.params import params
from mindspeed_mm.models.internvl.sharding import ExpertShard, shard_slice, stage_name
from mindspeed_mm.parallel.layout import LayoutError, LayoutPlan, plan_layout, rank_file_keys

__all__ = ["Discovered", "discover"]

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
_VIT_LAYER = re.compile(r"image_encoder\.encoder\.encoder\.layers\.(\d+)\.")
_LLM_LAYER = re.compile(r"text_decoder\.decoder\.layers\.(\d+)\.")
_STYLE_PROBE = "image_encoder.projector.linear_fc1.weight"  # TP-split in "mm", whole in "mindspeed"


@dataclass(frozen=True)
class Discovered:
    iter_dir: Path
    plan: LayoutPlan
    tp_style: str


def _grid(iter_dir: Path, spec: InternVLSpec) -> tuple[int, int, int, int]:
    """(tp, pp, ep, etp) of the rank directories: megatron's ``mp_rank_XX[_YYY][_ZZZ]``, the pipeline suffix only
    when pp > 1 and the expert one only when ep > 1; one suffix alone is read as the EP rank when the files it
    tells apart hold the same tensor names (one stage, other experts), else as the pipeline rank."""
    found: dict[tuple[int, ...], str] = {}
    for p in sorted(iter_dir.iterdir()):
        if not p.name.startswith("mp_rank_"):
            continue
        m = _RANK_DIR.fullmatch(p.name)
        if not m or not p.is_dir():
            raise CheckpointFormatError(f"{p}: not a rank directory mp_rank_XX[_YYY][_ZZZ]")
        found[tuple(int(g) for g in m.groups() if g is not None)] = p.name
    if not found:
        raise CheckpointFormatError(f"{iter_dir}: no mp_rank_* rank directories")
    lengths = {len(k) for k in found}
    if len(lengths) > 1:
        raise CheckpointFormatError(f"{iter_dir}: mixes rank directories with different numbers of suffixes "
                                    f"({sorted(found.values())[:4]})")
    (n,) = lengths
    if n == 1:
        grid = {(t, 0, 0) for (t,) in found}
    elif n == 3:
        grid = set(found)
    else:
        others = sorted(k for k in found if k[1] > 0)
        as_ep = False
        if spec.text.moe and others and (0, 0) in found:
            first, other = (read_rank_file(iter_dir / found[k] / RANK_FILE) for k in ((0, 0), others[0]))
            as_ep = [set(c) for c in first.chunks] == [set(c) for c in other.chunks]
        grid = {(t, 0, x) if as_ep else (t, x, 0) for t, x in found}
    tp, pp, ep = (max(k[i] for k in grid) + 1 for i in range(3))
    if pp == 1 and n == 3:
        raise CheckpointFormatError(f"{iter_dir}: rank directories have a pipeline suffix but there is only one "
                                    f"pipeline rank ({sorted(found.values())[0]})")
    if n == 2 and pp == 1 and ep == 1:
        raise CheckpointFormatError(f"{iter_dir}: rank directories have a pipeline or expert suffix but only its "
                                    f"rank 0 is there ({sorted(found.values())[0]}): the others are missing?")
    # the experts' TP size: the pattern of (tp, ep) files megatron's ranks leave (etp 1 at TP > 1: fewer files)
    best = None
    for etp in dict.fromkeys([tp, 1] if ep > 1 else [tp]):
        try:
            keys = rank_file_keys(ParallelSizes.smallest(tp=tp, ep=ep, etp=etp))
        except ValueError:
            continue
        want = {(t, p, e) for p in range(pp) for t, e in keys}
        if grid <= want and (best is None or len(want - grid) < len(best[1] - grid)):
            best = (etp, want)
    etp, want = best
    missing = sorted(want - grid, key=lambda k: (k[1], k[2], k[0]))
    if missing:
        t, p, e = missing[0]
        raise CheckpointFormatError(f"{iter_dir}: rank directory {rank_dir_name(t, p, pp, e, ep)} is missing "
                                    f"(the others make TP{tp} x PP{pp}" + (f" x EP{ep}" if ep > 1 else "") + ")")
    return tp, pp, ep, etp


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
    tp, pp, ep, etp = _grid(iter_dir, spec)
    keys = rank_file_keys(ParallelSizes.smallest(tp=tp, ep=ep, etp=etp))
    files = {(t, p, e): read_rank_file(rank_file(iter_dir, t, p, pp, e, ep)) for p in range(pp) for t, e in keys}
    first = {p: files[0, p, 0] for p in range(pp)}  # rank 0's pair is always a file
    vpp = len(files[0, 0, 0].chunks)
    for rf in files.values():
        if len(rf.chunks) != vpp:
            raise CheckpointFormatError(f"{rf.path}: has {len(rf.chunks)} model chunk(s), "
                                        f"{files[0, 0, 0].path} has {vpp}")
    vit = [[_layer_count(first[p], v, _VIT_LAYER, "ViT") for p in range(pp)] for v in range(vpp)]
    llm = [[_layer_count(first[p], v, _LLM_LAYER, "LLM") for p in range(pp)] for v in range(vpp)]
    for what, counts, total in (("ViT", vit, spec.vision.num_layers), ("LLM", llm, spec.text.num_layers)):
        if sum(map(sum, counts)) != total:
            raise CheckpointFormatError(f"{iter_dir}: the rank files hold {what} layers {counts} per stage "
                                        f"(sum {sum(map(sum, counts))}), but the model config has {total}: a "
                                        f"checkpoint of another model (check --cfg.hf_config.hf_dir)?")
    try:
        par = ParallelSizes.smallest(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp)
        plan = plan_layout(spec, par, par.world_size, vit, llm)
    except (LayoutError, ValueError) as e:
        raise CheckpointFormatError(f"{iter_dir}: the layout its files hold (TP{tp} PP{pp} VPP{vpp}"
                                    f"{f' EP{ep} ETP{etp}' if ep > 1 else ''}, vit {vit}, "
                                    f"llm {llm}) is not one this model runs: {e}") from None
    if told is not None and not told.same_split(plan):
        raise LayoutError(f"{told_as} says {told.describe()}, but the rank files in {iter_dir} hold "
                          f"{plan.describe()} (leave {told_as} out to take the files' layout)")

    shapes = {p.name: p.shape for p in params(spec)}
    # global name -> [(stage, local name)]: tied embeddings are held twice (the last stage's output layer)
    # (ep_rank, global name) -> [(stage, local name)]: an EP rank's files hold its own experts
    where: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for e in range(ep):
        experts = ExpertShard.of(spec.text.num_experts, ep, e)
        for name in shapes:
            for s in plan.stages:
                local = stage_name(name, s, experts)
                if local is not None:
                    where.setdefault((e, name), []).append((s.stage, local))

    style = "mm"
    if tp > 1:
        stage, local = where[0, _STYLE_PROBE][0]
        probe = files[0, stage % pp, 0].chunks[stage // pp].get(local)
        style = "mindspeed" if probe is not None and tuple(probe.array.shape) == shapes[_STYLE_PROBE] else "mm"

    for (t, p, e), rf in files.items():
        for v, sd in enumerate(rf.chunks):
            stage = plan.stage(p, v)
            want = {}
            for (held_by, name), held in where.items():
                for s, local in held:
                    if s == stage.stage and held_by == e:
                        want[local] = shard_slice(name, shapes[name], spec, tp, t, plan.padded_vocab_size,
                                                  style, etp).shape(shapes[name])
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
