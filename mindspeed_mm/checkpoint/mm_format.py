"""The MM (Megatron) on-disk checkpoint layout the converter writes and reads, its metadata, and atomic
directory writes.

Layout (the reference system's, so its users' tooling keeps working)::

    <mm_dir>/latest_checkpointed_iteration.txt          "release"
    <mm_dir>/release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
    <mm_dir>/mm_convert_meta.json                       layout, model spec, source format, dtypes (ours)
    <mm_dir>/model.json                                 the model JSON at this layout, for --mm-model (ours)

Each ``model_optim_rng.pt`` holds ``{"model": sd, "checkpoint_version": 3.0}``, or ``model0 .. model{V-1}``
instead of ``model`` under virtual pipeline parallelism (one per chunk, ``vpp_rank`` order); the ``_{pp:03d}``
suffix appears only when pp > 1, the ``_{ep:03d}`` one (megatron's) only when ep > 1. Under expert parallelism a
file holds its TP rank's dense slices and its EP rank's experts with local indices (0..E/ep-1), cut at expert-TP
rank tp % etp; only the (tp, ep) pairs megatron's ranks have get a file (`parallel.layout.rank_file_keys`).
``sd`` is exactly ``sharding.local_state_dict(full, spec, plan, tp_rank,
stage, tp_style)`` of the chunk's stage: ``tp_style`` "mm" (ours, the default) or "mindspeed" (MindSpeed-MM's
files, which differ only at TP > 1: projector whole on every rank, vocabulary in unpadded uneven row blocks).
MindSpeed-MM writes no metadata file; such a checkpoint's layout and style are read off its files
(`discover.py`). Files are read back lazily: by the model through ``torch.load(mmap=True, weights_only=True)``,
by the converter (and for other tools' training saves, which weights_only refuses) without torch
(`read_rank_file`).
"""
from __future__ import annotations

import ctypes
import mmap
import re
import sys

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from mindspeed_mm.checkpoint import torch_file
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.checkpoint.streaming_save import LazyTensor, no_crc32, save_streaming
from mindspeed_mm.config.model_spec import InternVLSpec, spec_from_dict, to_dict
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.models.internvl.sharding import TP_STYLES
from mindspeed_mm.parallel.layout import LayoutPlan, plan_layout

if TYPE_CHECKING:
    import torch

__all__ = [
    "META_FILE", "MODEL_JSON", "TRACKER_FILE", "RANK_FILE", "CHECKPOINT_VERSION", "MMCheckpointMeta",
    "rank_dir_name", "chunk_key", "rank_file", "write_meta", "read_meta", "model_json", "write_model_json",
    "iteration_dir", "save_rank_file", "load_rank_file",
    "save_rank_object", "load_rank_object", "checkpoint_meta", "RankFile", "read_rank_file", "drop_resident_pages",
    "chunk_count", "EXTRA_STATE", "has_meta", "plain_int",
]

META_FILE = "mm_convert_meta.json"
MODEL_JSON = "model.json"  # the model spec at the checkpoint's layout, written beside it
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
META_VERSION = 1


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")


def chunk_key(vpp_rank: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{vpp_rank}"


def rank_file(iter_dir: Path, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> Path:
    return Path(iter_dir) / rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep) / RANK_FILE


@dataclass
class MMCheckpointMeta:
    """What `mm_convert_meta.json` records: enough to read the checkpoint back without being told the layout."""
    tp: int
    pp: int
    vpp: int
    vit_pp_layers: list[list[int]]
    llm_pp_layers: list[list[int]]
    padded_vocab_size: int
    model_spec: dict  # config.model_spec.to_dict
    source_format: str  # "native" | "original"
    source_hf_dir: Optional[str]  # absolute; non-weight files (tokenizer, ...) are copied from here by mm_to_hf
    hf_config: dict  # the source config.json, verbatim
    dtypes: dict[str, int] = field(default_factory=dict)  # tensor dtype -> count (e.g. {"bfloat16": 412})
    iteration: str = "release"
    meta_version: int = META_VERSION
    tp_style: str = "mm"  # whose TP convention the rank files follow (models.internvl.sharding.TP_STYLES)
    # an adapter save (LoRA): {"dir", "iteration", "fingerprint"} of the frozen base its rank files hold only the
    # adapters and trainable parameters for (checkpoint.fingerprint); None: the rank files hold every weight
    base: Optional[dict] = None
    # expert parallelism of the rank files (absent in older metadata: one EP rank); etp None: the experts cut as tp
    ep: int = 1
    etp: Optional[int] = None

    def __post_init__(self) -> None:
        if self.tp_style not in TP_STYLES:
            raise CheckpointFormatError(f"{META_FILE}: tp_style {self.tp_style!r} is not one of {list(TP_STYLES)}")

    @classmethod
    def from_plan(cls, plan: LayoutPlan, spec: InternVLSpec, **kw: Any) -> "MMCheckpointMeta":
        p = plan.parallel
        kw = {"ep": p.ep, "etp": p.expert_tp if p.ep > 1 else None, **kw}
        return cls(tp=p.tp, pp=p.pp, vpp=plan.num_chunks,
                   vit_pp_layers=[list(r) for r in plan.vit_pp_layers],
                   llm_pp_layers=[list(r) for r in plan.llm_pp_layers],
                   padded_vocab_size=plan.padded_vocab_size, model_spec=to_dict(spec), **kw)

    def spec(self) -> InternVLSpec:
        return spec_from_dict(self.model_spec, source=META_FILE)

    def plan(self, spec: Optional[InternVLSpec] = None) -> LayoutPlan:
        spec = spec or self.spec()
        try:
            par = ParallelSizes.smallest(tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=self.etp)
        except ValueError as e:
            raise CheckpointFormatError(f"{META_FILE}: {e}") from None
        plan = plan_layout(spec, par, par.world_size, self.vit_pp_layers, self.llm_pp_layers)
        if plan.padded_vocab_size != self.padded_vocab_size:
            raise CheckpointFormatError(f"{META_FILE}: padded_vocab_size {self.padded_vocab_size} does not match the "
                                        f"layout's {plan.padded_vocab_size}")
        return plan


def write_meta(mm_dir: Path, meta: MMCheckpointMeta) -> None:
    (Path(mm_dir) / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")


def model_json(spec: InternVLSpec, plan: LayoutPlan) -> dict:
    """The model JSON (reference schema) of a checkpoint written at `plan`: the spec with each module's
    `pipeline_num_layers` as the layout splits it (a flat list, or one list per virtual stage under VPP), so
    `pretrain_vlm.py --mm-model` and `inference_vlm.py` take it as it is."""
    raw = to_dict(spec)
    flat = plan.num_chunks == 1
    for module, layers in ((raw["image_encoder"]["vision_encoder"], plan.vit_pp_layers),
                           (raw["text_decoder"], plan.llm_pp_layers)):
        module["pipeline_num_layers"] = list(layers[0]) if flat else [list(r) for r in layers]
    return raw


def write_model_json(mm_dir: Path, spec: InternVLSpec, plan: LayoutPlan) -> None:
    (Path(mm_dir) / MODEL_JSON).write_text(json.dumps(model_json(spec, plan), indent=4) + "\n")


def read_meta(mm_dir: Path) -> MMCheckpointMeta:
    path = Path(mm_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not written by mm-convert?); pass the layout and "
                                f"--cfg.hf_config.hf_dir instead")
    try:
        raw = json.loads(path.read_text())
        return MMCheckpointMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: invalid metadata: {e}") from None


def has_meta(mm_dir: Path) -> bool:
    """Whether the checkpoint records its layout (`checkpoint_meta` reads it); else `discover` finds it."""
    mm_dir = Path(mm_dir)
    if (mm_dir / META_FILE).is_file():
        return True
    try:
        return (iteration_dir(mm_dir) / META_FILE).is_file()
    except FileNotFoundError:  # not a checkpoint at all: the caller's next step says so
        return False


def plain_int(value: Any) -> Optional[int]:
    """`value` if it is an int as pickled by plain Python (not a bool, not a stand-in), else None."""
    return value if type(value) is int else None


def checkpoint_meta(mm_dir: Path) -> MMCheckpointMeta:
    """The metadata of the iteration the tracker names (each training save records its own layout, which may
    differ from an earlier save's in the same directory), else the directory's."""
    it = iteration_dir(mm_dir)
    return read_meta(it) if (Path(it) / META_FILE).is_file() else read_meta(mm_dir)


def iteration_dir(mm_dir: Path) -> Path:
    """`release/` or `iter_{N:07d}/`, as `latest_checkpointed_iteration.txt` says (release if it is absent)."""
    mm_dir = Path(mm_dir)
    tracker = mm_dir / TRACKER_FILE
    name = "release"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release":
            try:
                name = f"iter_{int(text):07d}"
            except ValueError:
                raise CheckpointFormatError(f"{tracker}: expected 'release' or an iteration number, got {text!r}")
    out = mm_dir / name
    if not out.is_dir():
        raise FileNotFoundError(f"checkpoint directory is missing: {out}")
    return out


def save_rank_file(path: Path, chunks: list[dict[str, LazyTensor]], writers: int = 1,
                   direct_io: bool = True) -> int:
    """Write one rank's chunks, each tensor produced only while the chunks of the file holding it are written
    (`writers` threads, O_DIRECT where the filesystem takes it unless `direct_io` is False); returns the size.
    The file is what `save_rank_object` would write for the same tensors, byte for byte but for the 40-digit
    serialization id (`streaming_save`), and is written without torch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_streaming(path, {**{chunk_key(v, len(chunks)): sd for v, sd in enumerate(chunks)},
                                 "checkpoint_version": CHECKPOINT_VERSION}, writers, direct_io)


def save_rank_object(path: Path, obj: dict[str, Any]) -> int:
    """Write one rank's file (chunks under `chunk_key` names plus, for training saves, optimizer state etc.)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {**obj, "checkpoint_version": CHECKPOINT_VERSION}
    with no_crc32():
        torch.save(obj, path)
    return path.stat().st_size


def load_rank_object(path: Path) -> dict[str, Any]:
    """One rank's whole file, memory-mapped (tensors are read on first touch); never unpickles code."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file is missing: {path}")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointFormatError(f"{path}: cannot read checkpoint file: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def chunk_count(path: Path, obj: Any) -> int:
    """How many model chunks a rank file holds: 1 for ``model``, V for ``model0 .. model{V-1}``."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    if "model" in obj:
        return 1
    n = 0
    while f"model{n}" in obj:
        n += 1
    if not n:
        raise CheckpointFormatError(f"{path}: no 'model' or 'model0' entry (found {sorted(map(str, obj))[:6]})")
    return n


def _chunks(path: Path, obj: Any, num_chunks: Optional[int]) -> list[dict]:
    if num_chunks is None:
        num_chunks = chunk_count(path, obj)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    keys = [chunk_key(v, num_chunks) for v in range(num_chunks)]
    if any(not isinstance(obj.get(k), dict) for k in keys):
        raise CheckpointFormatError(f"{path}: expected keys {keys} (vpp={num_chunks}), found {sorted(obj)}")
    extra = sorted(k for k in obj if isinstance(k, str) and re.fullmatch(r"model\d*", k) and k not in keys)
    if extra:
        raise CheckpointFormatError(f"{path}: has {extra} beyond the {num_chunks} chunk(s) the layout says")
    return [obj[k] for k in keys]


EXTRA_STATE = "_extra_state"  # Transformer Engine's per-module metadata in megatron state dicts: not weights


def load_rank_file(path: Path, num_chunks: int) -> list[dict[str, "torch.Tensor"]]:
    """One rank's chunks, memory-mapped (tensors are read on first touch); never unpickles code."""
    return _chunks(path, load_rank_object(path), num_chunks)


@dataclass
class RankFile:
    """One rank's chunks read without torch: each tensor a `torch_file.StoredTensor`, a numpy view of one
    private mapping of the file at `base` (so a tensor's place in the file is its address minus `base`).
    `extra_state`: the ``*._extra_state`` entries dropped from the chunks; `other`: the file's entries besides
    the chunks, as read (plain values, or `torch_file.StandIn` records of anything else)."""
    path: Path
    chunks: list[dict[str, torch_file.StoredTensor]]
    base: int
    extra_state: int = 0
    other: dict = field(default_factory=dict)


def read_rank_file(path: Path, num_chunks: Optional[int] = None) -> RankFile:
    """`load_rank_file` for the converter, which must not pay torch's import, and for files torch.load's
    weights_only refuses (MindSpeed-MM's training saves pickle an argparse.Namespace with enums in it): the
    pickle is read with the allowlist, anything outside it an inert stand-in (`torch_file.load`), and the
    chunks must then hold only tensors. `num_chunks` None: as many as the file has."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file is missing: {path}")
    try:
        obj, mapping = torch_file.load(path, stand_ins=True)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:
        raise CheckpointFormatError(f"{path}: cannot read checkpoint file: {e}") from e
    chunks, extra = [], 0
    for v, sd in enumerate(_chunks(path, obj, num_chunks)):
        kept = {}
        for k, t in sd.items():
            if isinstance(k, str) and k.endswith(EXTRA_STATE):
                extra += 1
            elif isinstance(t, torch_file.StoredTensor):
                kept[k] = t
            else:
                raise CheckpointFormatError(f"{path}: chunk {v} entry {k!r} is not a tensor of a supported dtype "
                                            f"({t!r})")
        chunks.append(kept)
    other = {k: v for k, v in obj.items() if not (isinstance(k, str) and re.fullmatch(r"model\d*", k))}
    return RankFile(path, chunks, base, extra, other)


def _span(x: Any) -> tuple[int, int]:
    """The address range of a torch tensor's storage, or of the bytes a numpy array views."""
    if isinstance(x, np.ndarray):
        lo = x.__array_interface__["data"][0]
        if x.size == 0:
            return lo, lo
        return lo, lo + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.strides)) + x.itemsize
    lo = x.untyped_storage().data_ptr()
    return lo, lo + x.untyped_storage().nbytes()


def drop_resident_pages(t: Any) -> None:
    """Let the kernel drop the mapped pages under a tensor (its whole storage) or numpy array (the bytes it
    views) once copied out: touched pages of a mapping stay resident until it is unmapped, which for a
    resharding run means whole source files. The mapping is private and unmodified, so a later touch
    re-reads the file. Linux only; elsewhere (and for memory not in a mapping) the pages simply stay."""
    if _libc is None:
        return
    start, end = _span(t)
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the range only
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
