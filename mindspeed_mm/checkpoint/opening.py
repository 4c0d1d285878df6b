"""Which checkpoint a path names and how it was saved: the iteration read, its metadata (or, for MindSpeed-MM's
files without any, what `discover` reads off them) and its layout; and for an adapter save, its frozen base.
Torch-free: the converter, training and inference open checkpoints the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mindspeed_mm.checkpoint.discover import discover
from mindspeed_mm.checkpoint.mm_format import (
    META_FILE, MMCheckpointMeta, checkpoint_meta, has_meta, iteration_dir, read_meta,
)
from mindspeed_mm.config.model_spec import InternVLSpec, architecture_differences
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.parallel.layout import LayoutPlan

__all__ = ["Checkpoint", "open_checkpoint", "open_base"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint to read: its directory, the iteration read, what it records (or, `foreign`, what was found
    in its files) and the layout it was saved at."""
    root: Path
    it_dir: Path
    meta: MMCheckpointMeta
    plan: LayoutPlan
    foreign: bool


def open_checkpoint(load_dir, spec: InternVLSpec, told_as: str, iteration: Optional[str] = None) -> Checkpoint:
    """The checkpoint at `load_dir` (the tracker's iteration, or `iteration`), checked against `spec`. Without our
    metadata (MindSpeed-MM's conversions and saves) its layout and TP style are read off its files."""
    root = Path(load_dir).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{told_as} {root}: no such directory")
    it_dir = root / iteration if iteration else iteration_dir(root)
    if not it_dir.is_dir():
        raise FileNotFoundError(f"{told_as} {root}: iteration {iteration} is missing ({it_dir})")
    if not has_meta(root):
        found = discover(root, spec, told_as=told_as)
        meta = MMCheckpointMeta.from_plan(found.plan, spec, source_format="native", source_hf_dir=None, hf_config={},
                                          tp_style=found.tp_style)
        return Checkpoint(root, it_dir, meta, found.plan, True)
    meta = read_meta(it_dir) if (it_dir / META_FILE).is_file() else checkpoint_meta(root)
    return Checkpoint(root, it_dir, meta, meta.plan(spec), False)


def open_base(save: Path, meta: MMCheckpointMeta, spec: InternVLSpec) -> Checkpoint:
    """The frozen base the adapter save at `save` (its metadata `meta`) names; errors say which base is gone or
    unfit."""
    root = Path(meta.base["dir"])
    iteration = meta.base.get("iteration")
    if not root.is_dir():
        raise CheckpointFormatError(f"{save} holds adapters only, and its base {root} is gone (no such "
                                    f"directory): restore the base checkpoint there")
    it_dir = root / iteration if iteration else iteration_dir(root)
    if not it_dir.is_dir():
        raise CheckpointFormatError(f"{save} holds adapters only, and its base {root} lacks iteration "
                                    f"{iteration} ({it_dir})")
    if not has_meta(root) and iteration_dir(root) != it_dir:
        raise CheckpointFormatError(f"{save}: its base {root} has no {META_FILE}, and only its latest iteration "
                                    f"is read ({iteration_dir(root).name}, not {iteration})")
    base = open_checkpoint(root, spec, f"the base of {save}", iteration)
    if base.meta.base is not None:
        raise CheckpointFormatError(f"{save}: its base {root} is an adapter save itself (export that one "
                                    f"merged first and train from it)")
    if not base.foreign:
        diffs = architecture_differences(base.meta.spec(), spec)
        if diffs:
            key, theirs, mine = diffs[0]
            raise CheckpointFormatError(f"{save}: its base {root} is another model ({key} {theirs!r} there, "
                                        f"{mine!r} in the adapter save)")
    return base


