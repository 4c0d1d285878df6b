"""mm-convert's three commands: HF (either format) -> MM, MM -> HF, MM -> MM (resplit).

MM checkpoints are ours or MindSpeed-MM's (`tp_style`, `models.internvl.sharding`): hf_to_mm and resplit write
either (`target_format`); mm_to_hf and resplit read either, one without our metadata through `discover.py`.

Tensors are only sliced and concatenated, never cast, so every direction is bit-exact. Memory stays bounded
by a few chunks, not a file: each rank file is streamed (`streaming_save`) front to back in 8 MiB chunks,
written with O_DIRECT where the filesystem takes it, and several rank files are written at once (`workers`).
Sources (`sources.py`) are memory-mapped and read only as each output rank's pieces: row pieces and column
slices (`streaming_save.SideBySide`) are copied from the mapping straight into the chunk that holds them,
their source pages let go at once. resplit cuts each new shard straight from the old shards
(`models.internvl.sharding.slice_from_shards`), never building a full tensor. Output goes to a temporary
directory beside the target, renamed into place only when complete (`atomic.py`).

hf_to_mm and resplit never import torch: tensors are numpy views of the mapped files, rank files are read
with an allowlist unpickler (`torch_file.load`) and written by `streaming_save`. torch's import and teardown
(~1.7 s) would otherwise cost more than copying a 2B checkpoint. mm_to_hf writes safetensors through torch.

Adapter saves (a LoRA run's: adapters and trainable parameters only, the frozen base named in the metadata)
are the one place values are computed: mm_to_hf merges them (W + alpha/r B A in fp32, cast to W's dtype, a
weight at a time, the base read at its own layout and checked against the recorded fingerprint as it is read)
or writes them as a PEFT adapter; resplit keeps them an adapter save naming the same base.

The per-parameter mapping (`models.internvl.hf.mapping`) and the per-rank slicing (`models.internvl.sharding`)
are views of one registry (`models.internvl.params`), so a converted shard is by construction
``local_state_dict(hf_to_mm(source), spec, plan, tp_rank, stage)``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from mindspeed_mm.checkpoint.atomic import atomic_output_dir, check_output_dir
from mindspeed_mm.checkpoint.hf_files import SAFE_INDEX, write_sharded
from mindspeed_mm.checkpoint.opening import open_base
from mindspeed_mm.checkpoint.fingerprint import add_stats, check_fingerprint, tensor_stats
from mindspeed_mm.checkpoint.mm_format import (
    META_FILE,
    TRACKER_FILE,
    MMCheckpointMeta,
    checkpoint_meta,
    has_meta,
    rank_file,
    save_rank_file,
    write_meta,
    write_model_json,
)
from mindspeed_mm.checkpoint.discover import discover
from mindspeed_mm.checkpoint.sources import HFSource, MMSource, columns
from mindspeed_mm.checkpoint.streaming_save import NUMPY_DTYPES, LazyTensor, SideBySide, owned
from mindspeed_mm.config.model_spec import (
    PARAMS_DTYPE_NAMES, InternVLSpec, load_model_spec,
)
from mindspeed_mm.config.parallel import ParallelConfig
from mindspeed_mm.errors import CheckpointFormatError, UserError
from mindspeed_mm.models.internvl.hf.config import (
    NATIVE, ORIGINAL, detect_format, native_config_to_original, original_config_to_native, read_hf_config,
    spec_from_hf_dir,
)
from mindspeed_mm.models.internvl.hf.mapping import mapping_rules, pieces_from_parts
from mindspeed_mm.models.internvl.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, to_peft
from mindspeed_mm.models.internvl.params import EMBEDDING, VIT_EMBED, VIT_LAYER, is_adapter, lookup, param_shapes, params
from mindspeed_mm.models.internvl.sharding import TP_STYLES, ExpertShard, shard_slice, stage_name
from mindspeed_mm.parallel.layout import LayoutError, LayoutPlan, plan_from_parallel_config, rank_file_keys
from mindspeed_mm.parallel.sharding import Slice

Array = np.ndarray  # a tensor's elements as numpy sees them: bfloat16 as uint16 of the same bytes

__all__ = ["ConvertSummary", "DryRunReport", "RankTensor", "dry_run", "hf_to_mm", "mm_to_hf", "rank_contents", "resplit",
           "write_mm"]


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


def _progress(iterable, total: int, desc: str, enabled: bool, unit: str = "file"):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


def _placement(spec: InternVLSpec, plan: LayoutPlan, names: Optional[set] = None) -> list[list[str]]:
    """The parameters each stage holds; every parameter must land on exactly one stage, but for the tied
    embeddings' copy on the last stage (`sharding.stage_name`). `names`: only these (an adapter save's: LoRA
    matrices among them), else every weight of the model."""
    per_stage: list[list[str]] = [[] for _ in plan.stages]
    for p in params(spec, adapters=names is not None):
        if names is not None and p.name not in names:
            continue
        held = [s.stage for s in plan.stages if stage_name(p.name, s) is not None]
        copies = sum(plan.stages[s].has_tied_output for s in held) if p.name == EMBEDDING else 0
        if len(held) != 1 + copies:
            raise AssertionError(f"{p.name}: held by stages {held}, expected exactly {1 + copies}")
        for s in held:
            per_stage[s].append(p.name)
    return per_stage


@dataclass(frozen=True)
class RankTensor:
    """One tensor of a rank file: our global name, its key in the file's chunk, the slice of the full tensor."""
    name: str
    key: str
    slice: Slice
    shape: tuple[int, ...]


def rank_contents(spec: InternVLSpec, plan: LayoutPlan, style: str = "mm", names: Optional[set] = None
                  ) -> dict[tuple[int, int, int], list[list[RankTensor]]]:
    """(tp_rank, pp_rank, ep_rank) -> one list per virtual chunk of the tensors that rank file holds: what
    `write_mm` writes and `dry_run` sizes, from the registry's shapes alone (ep_rank 0 without expert
    parallelism). `names`: only these parameters (an adapter save's)."""
    shapes = {p.name: p.shape for p in params(spec, adapters=names is not None)}
    per_stage = _placement(spec, plan, names)
    par = plan.parallel
    out = {}
    for pp_rank in range(par.pp):
        for tp_rank, ep_rank in rank_file_keys(par):
            experts = ExpertShard.of(spec.text.num_experts, par.ep, ep_rank)
            chunks = []
            for v in range(plan.num_chunks):
                stage = plan.stage(pp_rank, v)
                chunk = []
                for name in per_stage[stage.stage]:
                    local = stage_name(name, stage, experts)
                    if local is None:  # another EP rank's expert
                        continue
                    sl = shard_slice(name, shapes[name], spec, par.tp, tp_rank, plan.padded_vocab_size, style,
                                     par.expert_tp)
                    chunk.append(RankTensor(name, local, sl, sl.shape(shapes[name])))
                chunks.append(chunk)
            out[tp_rank, pp_rank, ep_rank] = chunks
    return out


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

def write_mm(tmp: Path, spec: InternVLSpec, plan: LayoutPlan,
              get_slice: Callable[[str, Slice], list[Array]],
              dtype_of: Callable[[str], str], progress: bool, desc: str, workers: int, direct_io: bool,
              after_write: Optional[Callable[[Array], None]] = None, style: str = "mm",
              names: Optional[set] = None) -> tuple[int, int]:
    """Write every rank file of `plan` into `tmp/release` in TP style `style`, `workers` files at a time;
    returns (files, bytes).
    `get_slice(name, sl)` reads just a rank's part of a full tensor (or its row pieces), so no full tensor
    need be in memory; it runs in the writer threads when they first fill a chunk holding that part
    (`save_streaming`), so it must be thread-safe. Files are written concurrently, and each by several threads,
    so that copying into one chunk overlaps the disk's writing of another. `names`: only these parameters (an
    adapter save's), else every weight of the model."""
    contents = rank_contents(spec, plan, style, names)
    pp, ep = plan.parallel.pp, plan.parallel.ep
    iter_dir = tmp / "release"
    jobs = sorted(contents, key=lambda k: (k[1], k[2], k[0]))
    # `workers` files at once, each stored by enough threads to use every worker, plus one: files differ in
    # size (a resplit to TP1 PP2 writes 2.24 and 1.65 GiB at 2B), and the largest file's tail would otherwise
    # run on one core.
    writers = workers // min(workers, len(jobs)) + (workers > 1)
    workers = max(1, min(workers, len(jobs)))

    def write(tp_rank: int, pp_rank: int, ep_rank: int) -> int:
        chunks = [{t.key: LazyTensor(t.shape, dtype_of(t.name), partial(get_slice, t.name, t.slice),
                                     f"{t.name} (tp_rank {tp_rank})", after_write) for t in chunk}
                  for chunk in contents[tp_rank, pp_rank, ep_rank]]
        return save_rank_file(rank_file(iter_dir, tp_rank, pp_rank, pp, ep_rank, ep), chunks, writers, direct_io)

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
    # Tying is said explicitly where each format's loader reads it: the native TOP level (transformers'
    # InternVLConfig ties by it alone, and by default), the original llm_config; the other flag of each format,
    # which no loader reads, is made to agree (added to an original config only when it has one). lm_head is
    # written only when untied (the registry has no output layer otherwise).
    tied = spec.text.tied
    out["text_config" if fmt == NATIVE else "llm_config"]["tie_word_embeddings"] = tied
    if fmt == NATIVE or "tie_word_embeddings" in out:
        out["tie_word_embeddings"] = tied
    return out


# ------------------------------------------------------------------------------------------------------------
# The three commands
# ------------------------------------------------------------------------------------------------------------

def _target_style(target_format: str) -> str:
    if target_format not in TP_STYLES:
        raise UserError(f"target_format: expected one of {list(TP_STYLES)}, got {target_format!r}")
    return target_format


def hf_to_mm(hf_dir: str, mm_dir: str, parallel: Optional[ParallelConfig] = None, *, overwrite: bool = False,
             progress: bool = True, workers: int = 0, direct_io: bool = True,
             target_format: str = "mm") -> ConvertSummary:
    """An HF checkpoint (either format) as MM shards of the layout `parallel` (default: one rank), in
    `target_format`'s TP convention ("mm", or "mindspeed": exactly MindSpeed-MM's rank files)."""
    t0 = time.perf_counter()
    style = _target_style(target_format)
    workers = _workers(workers)
    check_output_dir(Path(mm_dir).absolute(), overwrite)
    src = HFSource(hf_dir)
    _log(f"{src.dir}: detected HF format '{src.format}', {src.layout}, {len(src.files)} tensors "
         f"({dict(src.dtypes)})")
    spec = spec_from_hf_dir(src.dir, src.config)
    rules = mapping_rules(spec, src.format)
    src.check_rules(rules)
    plan = plan_from_parallel_config(spec, parallel or ParallelConfig())
    by_mm = {r.mm: r for r in rules}
    used: Counter = Counter()
    used_lock = threading.Lock()

    shapes = param_shapes(spec)
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

    with atomic_output_dir(mm_dir, overwrite) as tmp:
        files, n_bytes = write_mm(tmp, spec, plan, get_slice, dtypes.__getitem__, progress, "hf_to_mm",
                                  workers, direct_io, after_write=src.mapped.drop_pages, style=style)
        src.release()
        holders = Counter(t.name for chunks in rank_contents(spec, plan, style).values() for c in chunks for t in c)
        want = {k: holders[r.mm] for r in rules for k in r.hf}
        wrong = {k: n for k, n in used.items() if n != want[k]}
        if set(used) != set(src.files) or wrong:
            raise AssertionError(f"source tensors not used exactly once per rank file holding them: unused "
                                 f"{sorted(set(src.files) - set(used))[:3]}, miscounted {list(wrong.items())[:3]}")
        write_meta(tmp, MMCheckpointMeta.from_plan(plan, spec, source_format=src.format, source_hf_dir=str(src.dir),
                                                   hf_config=src.config, dtypes=dict(src.dtypes), tp_style=style))
        write_model_json(tmp, spec, plan)
    return ConvertSummary("hf_to_mm", str(Path(mm_dir).absolute()),
                          f"{src.format} HF -> MM {plan.describe()}{_style_note(style)}",
                          files, n_bytes, time.perf_counter() - t0, src.format)




@dataclass
class DryRunReport:
    """What hf_to_mm would write, from shapes alone: per rank file, its tensors' numel and payload bytes."""
    source: str
    layout: str
    dtype: str
    ranks: dict[tuple[int, ...], tuple[int, int]]  # (tp_rank, pp_rank[, ep_rank under EP]) -> (numel, bytes)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.ranks.values())

    def line(self) -> str:
        rows = [f"hf_to_mm dry run: {self.source} -> MM {self.layout}, {self.dtype}: {len(self.ranks)} rank files, "
                f"{self.bytes / 2**30:.2f} GiB of tensors (the torch file container adds a few KiB per file)"]
        rows += [f"  tp_rank {k[0]} pp_rank {k[1]}{f' ep_rank {k[2]}' if len(k) > 2 else ''}: {n / 1e9:.3f} B "
                 f"params, {b / 2**30:.3f} GiB"
                 for k, (n, b) in sorted(self.ranks.items(), key=lambda kv: (kv[0][1], *kv[0][2:], kv[0][0]))]
        return "\n".join(rows)


def dry_run(spec: InternVLSpec, parallel: Optional[ParallelConfig] = None, *, dtype: Optional[str] = None,
            target_format: str = "mm", source: str = "<spec>") -> DryRunReport:
    """The rank files hf_to_mm would write for `spec` at layout `parallel`, sized from the registry's shapes
    and `dtype` (a file dtype name; default: the spec's params_dtype): no weights are read or written."""
    style = _target_style(target_format)
    plan = plan_from_parallel_config(spec, parallel or ParallelConfig())
    dtype = dtype or PARAMS_DTYPE_NAMES[spec.text.params_dtype]
    itemsize = NUMPY_DTYPES[dtype].itemsize
    ranks = {}
    for key, chunks in rank_contents(spec, plan, style).items():
        numel = sum(int(np.prod(t.shape)) for chunk in chunks for t in chunk)
        ranks[key if plan.parallel.ep > 1 else key[:2]] = (numel, numel * itemsize)
    return DryRunReport(source, plan.describe() + _style_note(style), dtype, ranks)


def dry_run_from_files(hf_dir: Optional[str] = None, model_json: Optional[str] = None,
                       parallel: Optional[ParallelConfig] = None, *, target_format: str = "mm") -> DryRunReport:
    """`dry_run` with the model read from our model JSON, or else from an HF directory's config.json (its
    weights need not be there)."""
    if model_json:
        return dry_run(load_model_spec(model_json), parallel, target_format=target_format, source=model_json)
    if not hf_dir:
        raise UserError("dry_run needs the model: --cfg.model_json FILE or --cfg.hf_config.hf_dir DIR (config.json)")
    spec = spec_from_hf_dir(hf_dir, read_hf_config(hf_dir))
    return dry_run(spec, parallel, target_format=target_format, source=str(Path(hf_dir) / "config.json"))


def _style_note(style: str) -> str:
    return "" if style == "mm" else f" ({style} convention)"


def _meta_and_plan(mm_dir: Path, pc: Optional[ParallelConfig], hf_dir: Optional[str]
                   ) -> tuple[MMCheckpointMeta, InternVLSpec, LayoutPlan]:
    """The checkpoint's metadata (read, or for one without: the model from `hf_dir`, the layout and TP style
    from its files), spec and layout; `pc`, when given, must be that layout."""
    if not mm_dir.is_dir():
        raise FileNotFoundError(f"mm_dir: no such directory: {mm_dir}")
    if has_meta(mm_dir):
        meta = checkpoint_meta(mm_dir)
        spec = meta.spec()
        plan = meta.plan(spec)
        if pc is not None:
            told = plan_from_parallel_config(spec, pc)
            if not told.same_split(plan):
                raise LayoutError(f"parallel_config says {told.describe()} but {mm_dir / META_FILE} records "
                                  f"{plan.describe()}")
        return meta, spec, plan
    if not hf_dir:
        raise UserError(f"hf_config.hf_dir is required: {mm_dir} has no {META_FILE} (a MindSpeed-MM checkpoint?), "
                        "so the model config must come from its HF checkpoint (--cfg.hf_config.hf_dir DIR)")
    config = read_hf_config(hf_dir)
    spec = spec_from_hf_dir(hf_dir, config)
    found = discover(mm_dir, spec, plan_from_parallel_config(spec, pc) if pc is not None else None)
    _log(f"{mm_dir}: no {META_FILE}; read {found.plan.describe()}{_style_note(found.tp_style)} off its files")
    meta = MMCheckpointMeta.from_plan(found.plan, spec, source_format=detect_format(config),
                                      source_hf_dir=str(Path(hf_dir).absolute()), hf_config=config,
                                      tp_style=found.tp_style)
    return meta, spec, found.plan


LORA_FORMATS = ("merged", "peft")


def mm_to_hf(mm_dir: str, save_hf_dir: str, hf_format: Optional[str] = None, hf_dir: Optional[str] = None,
             parallel: Optional[ParallelConfig] = None, *, max_shard_size: Union[int, str] = "5GB",
             overwrite: bool = False, progress: bool = True, lora_format: str = "merged") -> ConvertSummary:
    """MM shards back to an HF checkpoint of `hf_format` (default: the one converted from); config and tokenizer
    files come from `hf_dir` (default: the source recorded in the metadata; required for a checkpoint without
    metadata, whose layout and TP style are read off its files). `parallel`, when given, must match the
    recorded or discovered layout.

    An adapter save (LoRA: its rank files hold the adapters and trainable parameters, its metadata names the
    frozen base) is written merged (`lora_format` "merged": every adapted weight W + alpha/r B A, in fp32 and
    cast to W's dtype; the trainable parameters from the save, the rest from the base at whatever layout it has,
    whose fingerprint is checked tensor by tensor), or as a PEFT adapter directory for transformers' native
    InternVL ("peft": `_export_peft`)."""
    t0 = time.perf_counter()
    mm_dir, out_dir = Path(mm_dir).absolute(), Path(save_hf_dir).absolute()
    if hf_format not in (None, NATIVE, ORIGINAL):
        raise UserError(f"hf_format: expected 'native' or 'original', got {hf_format!r}")
    if lora_format not in LORA_FORMATS:
        raise UserError(f"lora_format: expected one of {list(LORA_FORMATS)}, got {lora_format!r}")
    max_bytes = _parse_size(max_shard_size)
    check_output_dir(out_dir, overwrite)
    meta, spec, plan = _meta_and_plan(mm_dir, parallel, hf_dir)
    if lora_format == "peft":
        if meta.base is None:
            raise UserError(f"lora_format peft: {mm_dir} is not a LoRA adapter save (it holds every weight and "
                            f"names no base); export it as a full HF checkpoint (lora_format merged, the default)")
        return _export_peft(mm_dir, out_dir, meta, spec, plan, hf_dir, overwrite, t0)
    fmt = hf_format or meta.source_format
    src = MMSource(mm_dir, meta, spec, plan, partial=meta.base is not None)
    merge = _LoraMerge(mm_dir, meta, spec, src) if meta.base is not None else None
    _log(f"{mm_dir}: MM {plan.describe()} from {meta.source_format} HF -> {fmt} HF"
         + (f" (adapters merged into the base {merge.where})" if merge else ""))
    shapes = param_shapes(spec)
    rules = mapping_rules(spec, fmt)
    config_dir = Path(hf_dir).absolute() if hf_dir else (Path(meta.source_hf_dir) if meta.source_hf_dir else None)

    def release() -> None:
        src.release()
        if merge is not None:
            merge.base.release()

    def tensors():
        for r in _progress(rules, len(rules), f"mm_to_hf ({fmt})", progress, unit="tensor"):
            full = src.tensor(r.mm) if merge is None else merge.tensor(r.mm)
            if tuple(full.shape) != shapes[r.mm]:
                raise CheckpointFormatError(f"{src.iter_dir}: {r.mm} has shape {tuple(full.shape)}, the model "
                                            f"config needs {shapes[r.mm]}")
            yield from zip(r.hf, map(owned, r.op.split(full)))

    with atomic_output_dir(out_dir, overwrite) as tmp:
        names, _ = write_sharded(tensors(), tmp, max_bytes, on_flush=release)
        for used in (src, *((merge.base,) if merge else ())):
            if used.unused:
                path, v, k = sorted(used.unused)[0]
                raise CheckpointFormatError(f"{path}: {len(used.unused)} tensor(s) were not used, e.g. chunk {v} "
                                            f"{k!r}")
        if merge is not None:
            merge.check_complete()
        config = read_hf_config(hf_dir) if hf_dir else meta.hf_config
        (tmp / "config.json").write_text(json.dumps(_target_config(config, detect_format(config), fmt, spec),
                                                    indent=2, sort_keys=True) + "\n")
        copied = _copy_non_weight_files(config_dir, tmp)
        if config_dir is None or not config_dir.is_dir():
            _log(f"warning: no source HF directory ({config_dir}); tokenizer files were not copied")
        n_bytes = sum((tmp / n).stat().st_size for n in names)
    _log(f"copied {len(copied)} non-weight file(s) from {config_dir}")
    return ConvertSummary("mm_to_hf", str(out_dir), f"MM {plan.describe()} -> {fmt} HF", len(names), n_bytes,
                          time.perf_counter() - t0, meta.source_format)


def resplit(mm_dir: str, save_mm_dir: str, parallel: Optional[ParallelConfig] = None, *, overwrite: bool = False,
            progress: bool = True, workers: int = 0, direct_io: bool = True, target_format: str = "mm",
            hf_dir: Optional[str] = None) -> ConvertSummary:
    """An MM checkpoint in another layout and/or TP convention (`target_format`), cut straight from its
    shards (never through HF). `hf_dir`: the model config, for a checkpoint without metadata."""
    t0 = time.perf_counter()
    style = _target_style(target_format)
    mm_dir = Path(mm_dir).absolute()
    workers = _workers(workers)
    check_output_dir(Path(save_mm_dir).absolute(), overwrite)
    meta, spec, plan_a = _meta_and_plan(mm_dir, None, hf_dir)
    plan_b = plan_from_parallel_config(spec, parallel or ParallelConfig())
    # an adapter save stays one: its adapters and trainable parameters at the new layout, the same base named
    src = MMSource(mm_dir, meta, spec, plan_a, partial=meta.base is not None)
    layout = (f"MM {plan_a.describe()}{_style_note(meta.tp_style)} -> MM {plan_b.describe()}"
              f"{_style_note(style)}" + (" (an adapter save: its base is not copied)" if meta.base else ""))
    _log(f"{mm_dir}: {layout}")
    with atomic_output_dir(save_mm_dir, overwrite) as tmp:
        files, n_bytes = write_mm(tmp, spec, plan_b, src.pieces, src.dtype, progress, "resplit",
                                  workers, direct_io, after_write=src.mapped.drop_pages, style=style,
                                  names=set(src.names) if meta.base is not None else None)
        src.release()
        if src.unused:
            path, v, k = sorted(src.unused)[0]
            raise CheckpointFormatError(f"{path}: {len(src.unused)} tensor(s) were not used, e.g. chunk {v} {k!r}")
        write_meta(tmp, MMCheckpointMeta.from_plan(plan_b, spec, source_format=meta.source_format,
                                                   source_hf_dir=meta.source_hf_dir, hf_config=meta.hf_config,
                                                   dtypes=meta.dtypes or dict(src.dtypes), tp_style=style,
                                                   base=meta.base))
        write_model_json(tmp, spec, plan_b)
    return ConvertSummary("resplit", str(Path(save_mm_dir).absolute()), layout, files, n_bytes,
                          time.perf_counter() - t0, meta.source_format)


# ------------------------------------------------------------------------------------------------------------
# Adapter saves (LoRA): merged onto their base, or as a PEFT adapter
# ------------------------------------------------------------------------------------------------------------

def _stats(spec: InternVLSpec, name: str, t) -> list[float]:
    """`fingerprint.tensor_stats` of a full tensor as the model held it: in its module's params_dtype."""
    import torch

    module = spec.vision if lookup(name)[0].owner in (VIT_EMBED, VIT_LAYER) else spec.text
    dtype = getattr(torch, PARAMS_DTYPE_NAMES[module.params_dtype])
    return tensor_stats(t if t.dtype == dtype else t.to(dtype))


class _LoraMerge:
    """An adapter save on top of its base, a full tensor of ours at a time: a trainable parameter from the save,
    any other from the base (resharded from its own layout by `MMSource`, its fingerprint checked as it is
    read), and an adapted weight merged with its adapters (`merged`)."""

    def __init__(self, mm_dir: Path, meta: MMCheckpointMeta, spec: InternVLSpec, save: MMSource):
        base = open_base(mm_dir, meta, spec)
        it_dir, base_meta, base_plan = base.it_dir, base.meta, base.plan
        self.base = MMSource(it_dir.parent, base_meta, spec, base_plan, iteration=it_dir.name)
        self.mm_dir, self.spec, self.save, self.held = mm_dir, spec, save, set(save.names)
        self.where = str(it_dir)
        self.fingerprint: dict[str, list[float]] = meta.base["fingerprint"]
        self.checked: set[str] = set()
        # our weight -> (its native rule's op, per native part: its adapters (A, B) or None, alpha / rank)
        pairs = {p.native[0].replace(".lora_A.weight", ".weight"): (p.name, p.name.replace(".lora_a", ".lora_b"))
                 for p in params(spec, adapters=True) if p.adapter and ".lora_A." in p.native[0]}
        self.adapted = {}
        for r in mapping_rules(spec, NATIVE):
            if any(k in pairs for k in r.hf):
                module = spec.vision if lookup(r.mm)[0].owner in (VIT_EMBED, VIT_LAYER) else spec.text
                self.adapted[r.mm] = (r.op, [pairs.get(k) for k in r.hf], module.lora.scaling)

    def tensor(self, name: str):
        if name in self.held:
            t = self.save.tensor(name)
            self.base.skip(name)
        else:
            t = self.base.tensor(name)
            if name in self.fingerprint:
                check_fingerprint({name: self.fingerprint[name]}, {name: _stats(self.spec, name, t)}, self.where,
                                  str(self.mm_dir))
                self.checked.add(name)
        return self.merged(name, t) if name in self.adapted else t

    def merged(self, name: str, w):
        """W + alpha/r B A, each part's adapters in fp32 and the parts merged as the native HF linears are into
        our fused weight, cast to W's dtype."""
        import torch

        op, parts, scaling = self.adapted[name]
        pieces = []
        for pair, shape in zip(parts, op.part_shapes(tuple(w.shape))):
            if pair is None:
                pieces.append(torch.zeros(shape, dtype=torch.float32))
            else:
                a, b = (self.save.tensor(n).float() for n in pair)
                pieces.append(scaling * (b @ a))
        return (w.float() + op.merge(pieces)).to(w.dtype)

    def check_complete(self) -> None:
        missing = sorted(set(self.fingerprint) - self.checked)
        if missing:
            raise CheckpointFormatError(f"{self.mm_dir}: the base {self.where} was not read for {len(missing)} "
                                        f"fingerprinted parameter(s), e.g. {missing[0]} (the save holds them?)")


def _hf_fingerprint(hf_dir: Path, spec: InternVLSpec, names: set) -> dict[str, list[float]]:
    """The fingerprint of an HF checkpoint's tensors as our parameters `names`, a tensor at a time."""
    import torch

    src = HFSource(hf_dir)
    out: dict[str, list[float]] = {}
    for r in mapping_rules(spec, src.format):
        if r.mm in names:
            dtype = getattr(torch, src.dtype(r))
            parts = [torch.from_numpy(np.array(src.read(k))).view(dtype) for k in r.hf]
            add_stats(out, r.mm, _stats(spec, r.mm, r.op.merge(parts)))
    src.release()
    return out


def _peft_base(mm_dir: Path, meta: MMCheckpointMeta, spec: InternVLSpec, hf_dir: Optional[str]) -> str:
    """`base_model_name_or_path` of the PEFT adapter: `hf_dir` when given, else the base's source HF directory
    (from its metadata), else the base's own directory. A local HF directory is checked against the base's
    fingerprint: a PEFT adapter is only right on the weights it was trained on."""
    base_dir = Path(meta.base["dir"])
    if hf_dir:
        name = str(Path(hf_dir).absolute())
    elif base_dir.is_dir():
        base = open_base(mm_dir, meta, spec)
        base_meta = base.meta
        name = base_meta.source_hf_dir or str(base_dir)
    else:  # the base is gone: the HF directory it was converted from, as the save recorded it
        _log(f"warning: the base {base_dir} is gone; naming the HF directory the save records")
        name = meta.source_hf_dir or str(base_dir)
    hf = Path(name)
    if not (hf / "config.json").is_file():
        _log(f"warning: base_model_name_or_path {name} is not an HF checkpoint directory (an MM one): convert the "
             f"base with mm_to_hf and load the adapter on that")
        return name
    fingerprint = meta.base["fingerprint"]
    actual = _hf_fingerprint(hf, spec, set(fingerprint))
    try:
        check_fingerprint(fingerprint, actual, str(hf), str(mm_dir))
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{e} (lora_format peft: the HF base the adapter would name differs from the "
                                    f"base it was trained on, {base_dir}: give the base's own HF conversion with "
                                    f"--cfg.hf_config.hf_dir, or export merged)") from None
    return name


def _export_peft(mm_dir: Path, out_dir: Path, meta: MMCheckpointMeta, spec: InternVLSpec, plan: LayoutPlan,
                 hf_dir: Optional[str], overwrite: bool, t0: float) -> ConvertSummary:
    """An adapter save as a PEFT LoRA adapter directory for transformers' native InternVL
    (`adapter_config.json` + `adapter_model.safetensors`). A save that also trains non-adapter parameters (the
    projector, unfrozen layers) is refused: PEFT's adapter would lose them; the merged export keeps them."""
    from safetensors.torch import save_file

    src = MMSource(mm_dir, meta, spec, plan, partial=True)
    others = [n for n in src.names if not is_adapter(n)]
    if others:
        raise UserError(f"lora_format peft: {mm_dir} also trains {len(others)} parameter(s) that are not LoRA "
                        f"adapters ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which a PEFT "
                        f"adapter does not hold; export the merged checkpoint instead (lora_format merged)")
    base_name = _peft_base(mm_dir, meta, spec, hf_dir)
    _log(f"{mm_dir}: {len(src.names)} LoRA matrices -> PEFT adapter for {base_name}")
    adapters = {n: src.tensor(n).contiguous() for n in src.names}
    src.release()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(to_peft(adapters, spec), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(spec, base_name), indent=2, sort_keys=True)
                                          + "\n")
        n_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
    return ConvertSummary("mm_to_hf", str(out_dir), f"MM {plan.describe()} adapters -> PEFT LoRA adapter", 2, n_bytes,
                          time.perf_counter() - t0, meta.source_format)
