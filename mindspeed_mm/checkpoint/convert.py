"""Streaming InternVL3 checkpoint conversion: HF (either format) -> MM, MM -> HF, MM -> MM (resplit).

Every function takes a typed config (the dataclasses below, which are also the `mm-convert` CLI's options)
and returns a :class:`ConvertSummary`. Tensors are only sliced and concatenated, never cast, so every
direction is bit-exact. Memory stays bounded by a few chunks, not a file: each rank file is streamed
(`streaming_save`) front to back in 8 MiB chunks, written with O_DIRECT where the filesystem takes it, and
several rank files are written at once (`workers`). Sources are memory-mapped and read only as each output
rank's pieces: row pieces and column slices (`streaming_save.SideBySide`) are copied from the mapping
straight into the chunk that holds them, their source pages let go at once. resplit cuts each new shard
straight from the old shards (`parallel.sharding.slice_from_shards`), never building a full tensor. Output
goes to a temporary directory beside the target, renamed into place only when complete.

hf_to_mm and resplit never import torch: tensors are numpy views of the mapped files (bfloat16 as uint16
of the same bytes, the dtype carried by name), rank files are read with an allowlist unpickler
(`torch_file.load`) and written by `streaming_save`. torch's import and teardown (~1.7 s) would otherwise
cost more than copying a 2B checkpoint. mm_to_hf writes safetensors through torch.

The per-parameter mapping is `models.internvl.hf_mapping` and the per-rank slicing `parallel.sharding`, so a
converted shard is by construction ``local_state_dict(hf_to_mm(source), spec, plan, tp_rank, stage)``.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

import numpy as np

from mindspeed_mm.checkpoint.hf_formats import (
    NATIVE, ORIGINAL, SAFE_INDEX, SAFE_SINGLE, ST_DTYPES, CheckpointFormatError, detect_format,
    read_safetensors_header, safetensors_array, safetensors_dtype_name,
    native_config_to_original, normalize_native_key, original_config_to_native, read_hf_config, read_json,
)
from mindspeed_mm.checkpoint.mm_format import (
    META_FILE, TRACKER_FILE, MMCheckpointMeta, RankFile, atomic_output_dir, check_output_dir, checkpoint_meta,
    drop_resident_pages, iteration_dir, rank_file, read_rank_file, save_rank_file, write_meta,
)
from mindspeed_mm.checkpoint.streaming_save import LazyTensor, SideBySide, owned
from mindspeed_mm.config.model_spec import InternVLSpec, spec_from_hf_dir
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.internvl.hf_mapping import Rule, mapping_rules, pieces_from_parts
from mindspeed_mm.parallel.layout import LayoutError, LayoutPlan, plan_layout
from mindspeed_mm.parallel.sharding import Slice, cat, shard_slice, slice_from_shards, stage_name

# No `if TYPE_CHECKING: import torch` here: jsonargparse executes such blocks of the module that defines the
# CLI's dataclasses when it resolves their annotations, which would import torch.
Array = np.ndarray  # a tensor's elements as numpy sees them: bfloat16 as uint16 of the same bytes

__all__ = [
    "HFConfig", "ParallelConfig", "HFToMMConfig", "MMToHFConfig", "ResplitConfig", "ConvertSummary",
    "hf_to_mm", "mm_to_hf", "resplit", "mm_param_shapes", "plan_from_parallel_config", "HFSource", "MMSource",
]


# ------------------------------------------------------------------------------------------------------------
# Configs (also the CLI's options: `--cfg.<field>`; the `help` metadata is what `--help` prints)
# ------------------------------------------------------------------------------------------------------------

def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


_DIRECT_IO_HELP = ("Write rank files with O_DIRECT (past the page cache) where the filesystem takes it; False: "
                   "ordinary buffered writes.")
_WORKERS_HELP = ("Rank files written at once (0: one per CPU core, at most 8), each by two or more threads "
                 "holding an 8 MiB chunk apiece.")


@dataclass
class HFConfig:
    hf_dir: Optional[str] = _h(
        "HF checkpoint directory (config.json + *.safetensors, either InternVL3 format). hf_to_mm: the source. "
        "mm_to_hf: where config.json, the tokenizer and other non-weight files are taken from (default: the "
        "source directory recorded in the MM metadata).", default=None)


@dataclass
class ParallelConfig:
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


@dataclass
class HFToMMConfig:
    mm_dir: str = _h("Output MM checkpoint directory (must not exist or be empty unless overwrite).")
    hf_config: HFConfig = _h("The HF source.", default_factory=HFConfig)
    parallel_config: ParallelConfig = _h("The MM layout to write.", default_factory=ParallelConfig)
    trust_remote_code: bool = _h("Accepted for compatibility and ignored: config.json is read as data and no "
                                 "code shipped with a checkpoint is ever executed.", default=False)
    overwrite: bool = _h("Replace a non-empty output directory (only once the new one is complete).",
                         default=False)
    progress: bool = _h("Show a progress bar.", default=True)
    workers: int = _h(_WORKERS_HELP, default=0)
    direct_io: bool = _h(_DIRECT_IO_HELP, default=True)


@dataclass
class MMToHFConfig:
    mm_dir: str = _h("Input MM checkpoint directory (written by mm-convert).")
    save_hf_dir: str = _h("Output HF checkpoint directory (must not exist or be empty unless overwrite).")
    hf_format: Optional[str] = _h("'native' (transformers InternVLForConditionalGeneration) or 'original' "
                                  "(InternVLChatModel). Default: the format the MM checkpoint was made from.",
                                  default=None)
    hf_config: HFConfig = _h("Where the config and tokenizer come from.", default_factory=HFConfig)
    parallel_config: Optional[ParallelConfig] = _h(
        "The MM checkpoint's layout. Optional: read from its metadata; when given, it is checked against it "
        "(needed, with hf_config.hf_dir, only for a checkpoint without metadata).", default=None)
    max_shard_size: Union[int, str] = _h("Largest safetensors file to write, bytes or e.g. '5GB', '500MB'.",
                                         default="5GB")
    trust_remote_code: bool = _h("Accepted for compatibility and ignored (no checkpoint code is executed).",
                                 default=False)
    overwrite: bool = _h("Replace a non-empty output directory.", default=False)
    progress: bool = _h("Show a progress bar.", default=True)


@dataclass
class ResplitConfig:
    mm_dir: str = _h("Input MM checkpoint directory (written by mm-convert).")
    save_mm_dir: str = _h("Output MM checkpoint directory (must not exist or be empty unless overwrite).")
    parallel_config: ParallelConfig = _h("The new layout.", default_factory=ParallelConfig)
    overwrite: bool = _h("Replace a non-empty output directory.", default=False)
    progress: bool = _h("Show a progress bar.", default=True)
    workers: int = _h(_WORKERS_HELP, default=0)
    direct_io: bool = _h(_DIRECT_IO_HELP, default=True)


@dataclass
class ConvertSummary:
    command: str
    output: str
    layout: str
    files: int
    bytes: int
    seconds: float
    source_format: str

    def line(self) -> str:
        return (f"{self.command}: {self.layout} -> {self.output}: {self.files} files, "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.2f}s")


def _log(msg: str) -> None:
    print(f"mm-convert: {msg}", file=sys.stderr, flush=True)


def _workers(n: int) -> int:
    if n < 0:
        raise UserError(f"workers: must be >= 0 (0 = one per CPU core), got {n}")
    return n or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="file", disable=not enabled, file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# Layouts and shapes
# ------------------------------------------------------------------------------------------------------------

def plan_from_parallel_config(spec: InternVLSpec, pc: ParallelConfig) -> LayoutPlan:
    """Validate the user's layout lists against the model (errors name the field)."""
    if pc.ep_size != 1:
        raise LayoutError(f"parallel_config.ep_size={pc.ep_size}: InternVL3 has no experts, only 1 is supported")
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
    try:
        par = ParallelSizes(tp=pc.tp_size, pp=pp, vpp=vpp if vpp > 1 else None)
    except ValueError as e:
        raise LayoutError(f"parallel_config: {e}") from None
    try:
        return plan_layout(spec, par, pc.tp_size * pp, vit, llm)
    except LayoutError as e:
        msg = str(e).replace("tensor_model_parallel_size", "parallel_config.tp_size")
        raise LayoutError(f"parallel_config.{msg}" if msg.startswith(("vit_pp", "llm_pp")) else msg) from None


def _compact(rows) -> str:
    return json.dumps(rows, separators=(",", ":"))


def _layout_str(plan: LayoutPlan) -> str:
    p = plan.parallel
    return (f"TP{p.tp} PP{p.pp}" + (f" VPP{plan.num_chunks}" if plan.num_chunks > 1 else "")
            + f" vit{[list(r) for r in plan.vit_pp_layers]} llm{[list(r) for r in plan.llm_pp_layers]}")


def mm_param_shapes(spec: InternVLSpec) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every parameter of ours, from the spec alone."""
    v, t = spec.vision, spec.text
    C, F, H = v.hidden_size, v.ffn_hidden_size, t.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    e = "image_encoder.encoder.embeddings."
    out[e + "class_embedding"] = (1, 1, C)
    out[e + "position_embedding"] = (1, v.num_patches + 1, C)
    out[e + "patch_embedding.weight"] = (C, v.num_channels, v.patch_size, v.patch_size)
    out[e + "patch_embedding.bias"] = (C,)
    for i in range(v.num_layers):
        L = f"image_encoder.encoder.encoder.layers.{i}."
        out[L + "self_attention.linear_qkv.weight"] = (3 * C, C)
        out[L + "self_attention.linear_qkv.bias"] = (3 * C,)
        out[L + "self_attention.linear_proj.weight"] = (C, C)
        out[L + "self_attention.linear_proj.bias"] = (C,)
        for x in ("q_layernorm.weight", "k_layernorm.weight"):
            out[L + "self_attention." + x] = (C,)
        for x in ("ls1", "ls2", "input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                  "pre_mlp_layernorm.bias", "mlp.linear_fc2.bias"):
            out[L + x] = (C,)
        out[L + "mlp.linear_fc1.weight"] = (F, C)
        out[L + "mlp.linear_fc1.bias"] = (F,)
        out[L + "mlp.linear_fc2.weight"] = (C, F)
    P, pin = "image_encoder.projector.", spec.projector.input_size
    out.update({P + "norm.weight": (pin,), P + "norm.bias": (pin,), P + "linear_fc1.weight": (H, pin),
                P + "linear_fc1.bias": (H,), P + "linear_fc2.weight": (H, H), P + "linear_fc2.bias": (H,)})
    d, heads, groups = t.kv_channels, t.num_attention_heads, t.num_query_groups
    out["text_decoder.embedding.word_embeddings.weight"] = (t.vocab_size, H)
    out["text_decoder.output_layer.weight"] = (t.vocab_size, H)
    out["text_decoder.decoder.final_layernorm.weight"] = (H,)
    for i in range(t.num_layers):
        L = f"text_decoder.decoder.layers.{i}."
        out[L + "self_attention.linear_qkv.weight"] = ((heads + 2 * groups) * d, H)
        out[L + "self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * d,)
        out[L + "self_attention.linear_proj.weight"] = (H, heads * d)
        out[L + "input_layernorm.weight"] = (H,)
        out[L + "pre_mlp_layernorm.weight"] = (H,)
        out[L + "mlp.linear_fc1.weight"] = (2 * t.ffn_hidden_size, H)
        out[L + "mlp.linear_fc2.weight"] = (H, t.ffn_hidden_size)
    return out


def _check_shape(name: str, t: Any, shapes: dict, where: str) -> None:
    want = shapes.get(name)
    if want is not None and tuple(t.shape) != want:
        raise CheckpointFormatError(f"{where}: {name} has shape {tuple(t.shape)}, the model config needs {want}")


def _placement(rules: list[Rule], plan: LayoutPlan) -> list[list[Rule]]:
    """The rules each stage holds; every parameter must land on exactly one stage."""
    per_stage: list[list[Rule]] = [[] for _ in plan.stages]
    for r in rules:
        held = [s.stage for s in plan.stages if stage_name(r.mm, s) is not None]
        if len(held) != 1:
            raise AssertionError(f"{r.mm}: held by stages {held}, expected exactly one")
        per_stage[held[0]].append(r)
    return per_stage


# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------

class MappedFiles:
    """Source files mapped into this process, so that the writer can let a tensor's mapped pages go once it is
    copied out (`drop_pages`) and leave memory of its own alone. Writer threads look mappings up while
    readers add them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ranges: dict[Path, tuple[int, int]] = {}  # path -> (lo, hi address)

    def add(self, path: Path, lo: int, size: int) -> None:
        with self._lock:
            self._ranges.setdefault(path, (lo, lo + size))

    def _holds(self, ptr: int) -> bool:
        with self._lock:
            return any(lo <= ptr < hi for lo, hi in self._ranges.values())

    def drop_pages(self, a: Array) -> None:
        """Let the kernel drop the mapped pages under `a` once stored (touched pages of a mapping stay resident
        until it is unmapped: a whole file's worth). Arrays outside the mapped files are left alone."""
        if self._holds(a.__array_interface__["data"][0]):
            drop_resident_pages(a)

    def gather(self, pieces: list[Array], dim: int) -> Array:
        """`pieces` joined along `dim` into memory of their own, the mapped pages under them let go."""
        out = cat(pieces, dim)
        for p in pieces:
            self.drop_pages(p)
        return out

    def close(self) -> None:
        with self._lock:
            self._ranges.clear()


def columns(pieces: list[Array], dim: int) -> SideBySide:
    """Pieces of a column slice, joined into the output a block of rows at a time from where they lie."""
    if dim != 1 or any(p.ndim != 2 for p in pieces):
        raise AssertionError(f"only 2-D weights are cut along columns, got dim {dim}, "
                             f"shapes {[p.shape for p in pieces]}")
    return SideBySide(tuple(pieces))


class HFSource:
    """An HF checkpoint directory read lazily: names, shapes and dtypes from the headers, tensors on demand."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir).absolute()
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory does not exist: {self.dir}")
        self.config = read_hf_config(self.dir)
        try:
            self.format = detect_format(self.config)
        except ValueError as e:
            raise CheckpointFormatError(f"{self.dir / 'config.json'}: {e}") from None
        index_path, single = self.dir / SAFE_INDEX, self.dir / SAFE_SINGLE
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointFormatError(f"{index_path}: no weight_map")
            by_file: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                by_file.setdefault(fname, []).append(key)
            self.layout = f"sharded ({len(by_file)} files, {index_path.name})"
        elif single.exists():
            by_file = {SAFE_SINGLE: None}  # type: ignore[dict-item]
            self.layout = "single file (model.safetensors)"
        else:
            others = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
            raise FileNotFoundError(f"checkpoint file is missing: {single} (and no {index_path.name}){hint}")
        self.files: dict[str, Path] = {}  # normalised name -> file
        self.stored: dict[str, str] = {}  # normalised name -> name in the file
        self.dtypes: Counter = Counter()
        self.headers: dict[Path, tuple[dict, int]] = {}
        for fname, keys in sorted(by_file.items()):
            path = self.dir / fname
            header, data_start = self.headers[path] = read_safetensors_header(path)
            present = set(header) - {"__metadata__"}
            for k in (sorted(present) if keys is None else keys):
                if k not in present:
                    raise CheckpointFormatError(f"{path}: tensor {k!r} (listed in the index) is not in this file")
                name = normalize_native_key(k) if self.format == NATIVE else k
                if name in self.files:
                    raise CheckpointFormatError(f"{path}: tensor {k!r} also appears in {self.files[name]}")
                self.files[name], self.stored[name] = path, k
                self.dtypes[safetensors_dtype_name(header[k]["dtype"])] += 1
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.mapped = MappedFiles()

    def _entry(self, name: str) -> tuple[dict, int]:
        header, data_start = self.headers[self.files[name]]
        return header[self.stored[name]], data_start

    def dtype(self, rule: Rule) -> str:
        """The dtype name of our tensor `rule.mm`: that of its HF parts, which must agree (nothing is cast)."""
        codes = {k: self._entry(k)[0]["dtype"] for k in rule.hf}
        for k, code in codes.items():
            if code not in ST_DTYPES:
                raise CheckpointFormatError(f"{self.files[k]}: tensor {self.stored[k]!r} has dtype {code}, which "
                                            f"is not supported (supported: {sorted(ST_DTYPES)})")
        if len(set(codes.values())) > 1:
            raise CheckpointFormatError(f"{self.files[rule.hf[0]]}: tensors {[self.stored[k] for k in rule.hf]}, "
                                        f"which form one parameter, have different dtypes {list(codes.values())}")
        return ST_DTYPES[codes[rule.hf[0]]]

    def read(self, name: str, dim: int = 0, start: int | None = None, end: int | None = None) -> Array:
        """Tensor `name`, or only its index range [start, end) along `dim` (0 or 1), as a view of the mapped
        file: nothing is read until the writer touches it, and `drop_pages` lets the pages go after."""
        path = self.files[name]
        with self._lock:  # writer threads read at once
            m = self._maps.get(path)
            if m is None:
                with open(path, "rb") as f:
                    m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self.mapped.add(path, ctypes.addressof(ctypes.c_char.from_buffer(m)), len(m))
        entry, data_start = self._entry(name)
        try:
            if dim == 0:
                return safetensors_array(m, entry, data_start, start, end)
            return safetensors_array(m, entry, data_start)[:, start:end]
        except Exception as e:
            raise CheckpointFormatError(f"{path}: cannot read tensor {self.stored[name]!r}: {e}") from e

    def check_parts(self, rule: Rule, mm_shape: tuple[int, ...]) -> None:
        """The HF tensors of `rule` have the shapes the model config implies (checked from the headers)."""
        want = rule.op.part_shapes(mm_shape)
        got = [tuple(self._entry(k)[0]["shape"]) for k in rule.hf]
        if got != want:
            raise CheckpointFormatError(f"{self.files[rule.hf[0]]}: {list(rule.hf)} have shapes {got}, the model "
                                        f"config needs {want} (for {rule.mm})")

    def release(self) -> None:
        # Unmapped when the last tensor viewing a mapping is gone (closing one that is viewed would raise).
        self.mapped.close()
        self._maps.clear()

    def check_rules(self, rules: list[Rule]) -> None:
        wanted = [k for r in rules for k in r.hf]
        dup = [k for k, n in Counter(wanted).items() if n > 1]
        assert not dup, f"mapping uses HF tensors twice: {dup[:3]}"
        unknown = sorted(set(self.files) - set(wanted))
        if unknown:
            raise CheckpointFormatError(
                f"{self.files[unknown[0]]}: {len(unknown)} tensor(s) the InternVL3 mapping does not know, e.g. "
                f"{[self.stored[k] for k in unknown[:3]]}")
        missing = sorted(set(wanted) - set(self.files))
        if missing:
            raise CheckpointFormatError(f"{self.dir}: {len(missing)} tensor(s) the model needs are missing, e.g. "
                                        f"{missing[:3]}")


class MMSource:
    """An MM checkpoint read lazily: `get(global_name)` merges the tensor from its TP shards."""

    def __init__(self, mm_dir: Path, meta: MMCheckpointMeta, spec: InternVLSpec, plan: LayoutPlan):
        self.iter_dir = iteration_dir(mm_dir)
        self.spec, self.plan, self.meta = spec, plan, meta
        self.tp, self.pp, self.vpp = plan.parallel.tp, plan.parallel.pp, plan.num_chunks
        self._open: dict[tuple[int, int], RankFile] = {}
        self._lock = threading.Lock()
        self.mapped = MappedFiles()
        self.shapes = mm_param_shapes(spec)
        self.where: dict[str, tuple[int, str]] = {}  # global name -> (stage index, local name)
        self.unused: set[tuple[Path, int, str]] = set()
        self.dtypes: Counter = Counter()
        expected: dict[tuple[int, int], set[str]] = {}
        for s in plan.stages:
            expected[(s.stage % self.pp, s.stage // self.pp)] = set()
        rules = mapping_rules(spec, NATIVE)
        for r in rules:
            for s in plan.stages:
                local = stage_name(r.mm, s)
                if local is not None:
                    self.where[r.mm] = (s.stage, local)
                    expected[(s.stage % self.pp, s.stage // self.pp)].add(local)
        for pp_rank in range(self.pp):  # inventory (pickles only): every file, chunk and key as the layout says
            for tp_rank in range(self.tp):
                rf = self._file(tp_rank, pp_rank)
                path = rf.path
                for v, sd in enumerate(rf.chunks):
                    want = expected[(pp_rank, v)]
                    extra, missing = sorted(set(sd) - want), sorted(want - set(sd))
                    if extra:
                        raise CheckpointFormatError(f"{path}: chunk {v} has tensor(s) this layout does not place "
                                                    f"there: {extra[:3]}")
                    if missing:
                        raise CheckpointFormatError(f"{path}: chunk {v} lacks {missing[:3]}")
                    self.unused.update((path, v, k) for k in sd)
                    self.dtypes.update(t.dtype for t in sd.values())

    def _file(self, tp_rank: int, pp_rank: int) -> RankFile:
        with self._lock:  # writer threads read at once
            rf = self._open.get((tp_rank, pp_rank))
            if rf is None:
                path = rank_file(self.iter_dir, tp_rank, pp_rank, self.pp)
                rf = self._open[(tp_rank, pp_rank)] = read_rank_file(path, self.vpp)
                if rf.base is not None:
                    self.mapped.add(path, rf.base, path.stat().st_size)
            return rf

    def _chunk(self, tp_rank: int, stage: int) -> tuple[Path, int, dict]:
        rf = self._file(tp_rank, stage % self.pp)
        return rf.path, stage // self.pp, rf.chunks[stage // self.pp]

    def _cut(self, name: str, sl: Slice) -> tuple[int, list[Array]]:
        stage, local = self.where[name]
        shards = []
        for tp_rank in range(self.tp):
            path, v, sd = self._chunk(tp_rank, stage)
            shards.append(sd[local].array)
            with self._lock:  # writer threads read at once
                self.unused.discard((path, v, local))
        try:
            return slice_from_shards(name, self.shapes[name], self.spec, shards, self.plan.padded_vocab_size, sl)
        except ValueError as e:
            raise CheckpointFormatError(f"{self.iter_dir}: {e}") from None

    def pieces(self, name: str, sl: Slice) -> list[Union[Array, SideBySide]]:
        """Slice `sl` (of another layout) of the full tensor `name`, as views of this checkpoint's shards whose
        concatenation along dim 0 it is (`slice_from_shards`): row pieces as they lie, a column slice a
        block of rows at a time from the mapped shards (`SideBySide`)."""
        dim, pieces = self._cut(name, sl)
        return pieces if dim == 0 else [columns(pieces, dim)]

    def get(self, name: str) -> Array:
        """The full tensor `name`, in memory of its own (the mapped source pages are let go)."""
        dim, pieces = self._cut(name, Slice(0, ((0, self.shapes[name][0]),)))
        return self.mapped.gather(pieces, dim)

    def tensor(self, name: str) -> Any:
        """`get(name)` as a torch tensor of its dtype (sharing the memory)."""
        import torch

        return torch.from_numpy(self.get(name)).view(getattr(torch, self.dtype(name)))

    def dtype(self, name: str) -> str:
        stage, local = self.where[name]
        return self._chunk(0, stage)[2][local].dtype

    def release(self) -> None:
        with self._lock:
            self._open.clear()
        self.mapped.close()


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

def _write_mm(tmp: Path, spec: InternVLSpec, plan: LayoutPlan,
              get_slice: Callable[[str, Slice], list[Array]],
              dtype_of: Callable[[str], str], progress: bool, desc: str, workers: int, direct_io: bool,
              after_write: Optional[Callable[[Array], None]] = None) -> tuple[int, int]:
    """Write every rank file of `plan` into `tmp/release`, `workers` files at a time; returns (files, bytes).
    `get_slice(name, sl)` reads just a rank's part of a full tensor (or its row pieces), so no full tensor
    need be in memory; it runs in the writer threads when they first fill a chunk holding that part
    (`save_streaming`), so it must be thread-safe. Files are written concurrently, and each by several threads,
    so that copying into one chunk overlaps the disk's writing of another."""
    shapes = mm_param_shapes(spec)
    per_stage = _placement(mapping_rules(spec, NATIVE), plan)
    tp, pp = plan.parallel.tp, plan.parallel.pp
    iter_dir = tmp / "release"
    jobs = [(tp_rank, pp_rank) for pp_rank in range(pp) for tp_rank in range(tp)]
    # `workers` files at once, each stored by enough threads to use every worker, plus one: files differ in
    # size (a resplit to TP1 PP2 writes 2.24 and 1.65 GiB at 2B), and the largest file's tail would otherwise
    # run on one core.
    writers = workers // min(workers, len(jobs)) + (workers > 1)
    workers = max(1, min(workers, len(jobs)))

    def write(tp_rank: int, pp_rank: int) -> int:
        chunks = []
        for v in range(plan.num_chunks):
            stage = plan.stage(pp_rank, v)
            sd: dict[str, LazyTensor] = {}
            for r in per_stage[stage.stage]:
                sl = shard_slice(r.mm, shapes[r.mm], spec, tp, tp_rank, plan.padded_vocab_size)
                local = stage_name(r.mm, stage)
                sd[local] = LazyTensor(sl.shape(shapes[r.mm]), dtype_of(r.mm),  # type: ignore[index]
                                       partial(get_slice, r.mm, sl), f"{r.mm} (tp_rank {tp_rank})",
                                       after_write)
            chunks.append(sd)
        return save_rank_file(rank_file(iter_dir, tp_rank, pp_rank, pp), chunks, writers, direct_io)

    n_bytes = 0
    bar = _progress(None, len(jobs), desc, progress)
    with ThreadPoolExecutor(workers, thread_name_prefix="write_mm") as pool:
        futures = [pool.submit(write, *job) for job in jobs]
        try:
            for f in as_completed(futures):
                n_bytes += f.result()
                bar.update(1)
        finally:
            for f in futures:
                f.cancel()
            bar.close()
    (tmp / TRACKER_FILE).write_text("release")
    return len(jobs), n_bytes


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB')")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def _copy_non_weight_files(src: Optional[Path], dst: Path) -> list[str]:
    if src is None or not src.is_dir():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if (p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", SAFE_INDEX)
                and not p.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def _target_config(config: dict, src_fmt: str, fmt: str, spec: InternVLSpec) -> dict:
    if src_fmt == fmt:
        out = json.loads(json.dumps(config))
    elif fmt == NATIVE:
        out = original_config_to_native(config, image_token_id=spec.img_context_token_id)
    else:
        out = native_config_to_original(config)
    if fmt == NATIVE:
        out["tie_word_embeddings"] = False
    return out


# ------------------------------------------------------------------------------------------------------------
# The three commands
# ------------------------------------------------------------------------------------------------------------

def hf_to_mm(cfg: HFToMMConfig) -> ConvertSummary:
    t0 = time.perf_counter()
    if not cfg.hf_config.hf_dir:
        raise UserError("hf_config.hf_dir is required: the HF checkpoint to convert (--cfg.hf_config.hf_dir DIR)")
    workers = _workers(cfg.workers)
    check_output_dir(Path(cfg.mm_dir).absolute(), cfg.overwrite)
    if cfg.trust_remote_code:
        _log("note: trust_remote_code is ignored; config.json is read as data and no checkpoint code is run")
    src = HFSource(cfg.hf_config.hf_dir)
    _log(f"{src.dir}: detected HF format '{src.format}', {src.layout}, {len(src.files)} tensors "
         f"({dict(src.dtypes)})")
    spec = spec_from_hf_dir(src.dir)
    rules = mapping_rules(spec, src.format)
    src.check_rules(rules)
    plan = plan_from_parallel_config(spec, cfg.parallel_config)
    by_mm = {r.mm: r for r in rules}
    used: Counter = Counter()
    used_lock = threading.Lock()

    shapes = mm_param_shapes(spec)
    dtypes = {}
    for r in rules:  # shapes and dtypes from the headers, before anything is written
        src.check_parts(r, shapes[r.mm])
        dtypes[r.mm] = src.dtype(r)

    def get_slice(name: str, sl: Slice) -> list[Union[Array, SideBySide]]:
        """Views of the mapped source, copied into the output's chunks and let go by `after_write`: row
        pieces as they are, a column slice a block of rows at a time (`SideBySide`)."""
        r = by_mm[name]
        with used_lock:
            used.update(r.hf)
        pieces = pieces_from_parts(r, sl, src.read)
        return pieces if sl.dim == 0 else [columns(pieces, sl.dim)]

    with atomic_output_dir(cfg.mm_dir, cfg.overwrite) as tmp:
        files, n_bytes = _write_mm(tmp, spec, plan, get_slice, dtypes.__getitem__, cfg.progress, "hf_to_mm",
                                   workers, cfg.direct_io,
                                   after_write=src.mapped.drop_pages)
        src.release()
        tp = plan.parallel.tp
        wrong = {k: n for k, n in used.items() if n != tp}
        if set(used) != set(src.files) or wrong:
            raise AssertionError(f"source tensors not used exactly once per TP rank: unused "
                                 f"{sorted(set(src.files) - set(used))[:3]}, miscounted {list(wrong.items())[:3]}")
        write_meta(tmp, MMCheckpointMeta.from_plan(plan, spec, source_format=src.format, source_hf_dir=str(src.dir),
                                                   hf_config=src.config, dtypes=dict(src.dtypes)))
    s = ConvertSummary("hf_to_mm", str(Path(cfg.mm_dir).absolute()), f"{src.format} HF -> MM {_layout_str(plan)}",
                       files, n_bytes, time.perf_counter() - t0, src.format)
    return s


def _meta_and_plan(mm_dir: Path, pc: Optional[ParallelConfig], hf_dir: Optional[str]
                   ) -> tuple[MMCheckpointMeta, InternVLSpec, LayoutPlan]:
    if not mm_dir.is_dir():
        raise FileNotFoundError(f"mm_dir: no such directory: {mm_dir}")
    if (mm_dir / META_FILE).is_file():
        meta = checkpoint_meta(mm_dir)
        spec = meta.spec()
        plan = meta.plan(spec)
        if pc is not None:
            told = plan_from_parallel_config(spec, pc)
            if (told.parallel.tp, told.parallel.pp, told.num_chunks, told.vit_pp_layers, told.llm_pp_layers) != (
                    plan.parallel.tp, plan.parallel.pp, plan.num_chunks, plan.vit_pp_layers, plan.llm_pp_layers):
                raise LayoutError(f"parallel_config says {_layout_str(told)} but {mm_dir / META_FILE} records "
                                  f"{_layout_str(plan)}")
        return meta, spec, plan
    if pc is None or not hf_dir:
        raise FileNotFoundError(f"{mm_dir / META_FILE}: missing (not written by mm-convert?); pass "
                                "--cfg.parallel_config.* and --cfg.hf_config.hf_dir to describe the checkpoint")
    config = read_hf_config(hf_dir)
    spec = spec_from_hf_dir(hf_dir)
    plan = plan_from_parallel_config(spec, pc)
    meta = MMCheckpointMeta.from_plan(plan, spec, source_format=detect_format(config),
                                      source_hf_dir=str(Path(hf_dir).absolute()), hf_config=config)
    return meta, spec, plan


def mm_to_hf(cfg: MMToHFConfig) -> ConvertSummary:
    t0 = time.perf_counter()
    mm_dir = Path(cfg.mm_dir).absolute()
    out_dir = Path(cfg.save_hf_dir).absolute()
    if cfg.hf_format not in (None, NATIVE, ORIGINAL):
        raise UserError(f"hf_format: expected 'native' or 'original', got {cfg.hf_format!r}")
    max_bytes = _parse_size(cfg.max_shard_size)
    check_output_dir(out_dir, cfg.overwrite)
    if cfg.trust_remote_code:
        _log("note: trust_remote_code is ignored; no checkpoint code is run")
    meta, spec, plan = _meta_and_plan(mm_dir, cfg.parallel_config, cfg.hf_config.hf_dir)
    fmt = cfg.hf_format or meta.source_format
    src = MMSource(mm_dir, meta, spec, plan)
    _log(f"{mm_dir}: MM {_layout_str(plan)} from {meta.source_format} HF -> {fmt} HF")
    shapes = mm_param_shapes(spec)
    rules = mapping_rules(spec, fmt)
    config_dir = Path(cfg.hf_config.hf_dir).absolute() if cfg.hf_config.hf_dir else (
        Path(meta.source_hf_dir) if meta.source_hf_dir else None)
    with atomic_output_dir(out_dir, cfg.overwrite) as tmp:
        from safetensors.torch import save_file

        parts: list[tuple[str, list[str], int]] = []  # (temp name, keys, bytes)
        cur: dict[str, Any] = {}  # torch tensors
        cur_bytes = 0
        total = 0

        def flush() -> None:
            nonlocal cur, cur_bytes
            name = f".part-{len(parts):05d}.safetensors"
            save_file(cur, str(tmp / name), metadata={"format": "pt"})
            parts.append((name, list(cur), cur_bytes))
            cur, cur_bytes = {}, 0
            src.release()

        bar = _progress(rules, len(rules), f"mm_to_hf ({fmt})", cfg.progress)
        bar.unit = "tensor"
        for r in bar:
            full = src.tensor(r.mm)
            _check_shape(r.mm, full, shapes, str(src.iter_dir))
            out = {k: owned(t) for k, t in zip(r.hf, r.op.split(full))}
            del full
            nb = sum(t.numel() * t.element_size() for t in out.values())
            if cur and cur_bytes + nb > max_bytes:
                flush()
            cur.update(out)
            cur_bytes += nb
            total += nb
        if cur:
            flush()
        if src.unused:
            path, v, k = sorted(src.unused)[0]
            raise CheckpointFormatError(f"{path}: {len(src.unused)} tensor(s) were not used, e.g. chunk {v} {k!r}")
        if len(parts) == 1:
            os.replace(tmp / parts[0][0], tmp / SAFE_SINGLE)
            names = [SAFE_SINGLE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
            weight_map = {}
            for (tmp_name, keys, _), name in zip(parts, names):
                os.replace(tmp / tmp_name, tmp / name)
                weight_map.update({k: name for k in keys})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = meta.hf_config
        if cfg.hf_config.hf_dir:
            config = read_hf_config(cfg.hf_config.hf_dir)
        src_fmt = detect_format(config)
        (tmp / "config.json").write_text(json.dumps(_target_config(config, src_fmt, fmt, spec), indent=2,
                                                    sort_keys=True) + "\n")
        copied = _copy_non_weight_files(config_dir, tmp)
        if config_dir is None or not config_dir.is_dir():
            _log(f"warning: no source HF directory ({config_dir}); tokenizer files were not copied")
        n_bytes = sum((tmp / n).stat().st_size for n in names)
    s = ConvertSummary("mm_to_hf", str(out_dir), f"MM {_layout_str(plan)} -> {fmt} HF", len(names), n_bytes,
                       time.perf_counter() - t0, meta.source_format)
    _log(f"copied {len(copied)} non-weight file(s) from {config_dir}")
    return s


def resplit(cfg: ResplitConfig) -> ConvertSummary:
    t0 = time.perf_counter()
    mm_dir = Path(cfg.mm_dir).absolute()
    workers = _workers(cfg.workers)
    check_output_dir(Path(cfg.save_mm_dir).absolute(), cfg.overwrite)
    meta, spec, plan_a = _meta_and_plan(mm_dir, None, None)
    plan_b = plan_from_parallel_config(spec, cfg.parallel_config)
    src = MMSource(mm_dir, meta, spec, plan_a)
    _log(f"{mm_dir}: MM {_layout_str(plan_a)} -> MM {_layout_str(plan_b)}")
    with atomic_output_dir(cfg.save_mm_dir, cfg.overwrite) as tmp:
        files, n_bytes = _write_mm(tmp, spec, plan_b, src.pieces, src.dtype, cfg.progress, "resplit",
                                   workers, cfg.direct_io,
                                   after_write=src.mapped.drop_pages)
        src.release()
        if src.unused:
            path, v, k = sorted(src.unused)[0]
            raise CheckpointFormatError(f"{path}: {len(src.unused)} tensor(s) were not used, e.g. chunk {v} {k!r}")
        new_meta = MMCheckpointMeta.from_plan(plan_b, spec, source_format=meta.source_format,
                                              source_hf_dir=meta.source_hf_dir, hf_config=meta.hf_config,
                                              dtypes=meta.dtypes)
        write_meta(tmp, new_meta)
    s = ConvertSummary("resplit", str(Path(cfg.save_mm_dir).absolute()),
                       f"MM {_layout_str(plan_a)} -> MM {_layout_str(plan_b)}", files, n_bytes,
                       time.perf_counter() - t0, meta.source_format)
    return s
