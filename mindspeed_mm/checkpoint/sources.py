"""The converter's sources: an HF or an MM checkpoint read lazily, tensor ranges on demand.

Sources are memory-mapped and read only as each output rank's pieces: names, shapes and dtypes come from the
headers (HF) or the pickles (MM), and each piece is a numpy view of the mapping (bfloat16 as uint16 of the
same bytes, the dtype carried by name). A writer copies a piece into its output and then lets its mapped
pages go (`MappedFiles.drop_pages`), so memory stays bounded by a few chunks. Nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from mindspeed_mm.checkpoint.hf_files import (
    ST_DTYPES, read_safetensors_header, safetensors_array, safetensors_dtype_name, weight_files,
)
from mindspeed_mm.checkpoint.mm_format import (
    MMCheckpointMeta, RankFile, drop_resident_pages, iteration_dir, rank_file, read_rank_file,
)
from mindspeed_mm.checkpoint.streaming_save import SideBySide
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.config import NATIVE
from mindspeed_mm.models.internvl.hf.keys import normalize_native_key
from mindspeed_mm.models.internvl.hf.mapping import Rule, uncovered
from mindspeed_mm.models.internvl.params import expert_index, lookup, params
from mindspeed_mm.models.internvl.sharding import ExpertShard, slice_from_shards, stage_name
from mindspeed_mm.parallel.layout import LayoutPlan, dense_file_key, expert_file_key, rank_file_keys
from mindspeed_mm.parallel.sharding import Slice, cat

Array = np.ndarray  # a tensor's elements as numpy sees them: bfloat16 as uint16 of the same bytes


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
        self.config, self.format, by_file, self.layout = weight_files(self.dir)
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
        unknown, missing = uncovered(self.files, wanted)
        if unknown:
            raise CheckpointFormatError(
                f"{self.files[unknown[0]]}: {len(unknown)} tensor(s) the InternVL3 mapping does not know, e.g. "
                f"{[self.stored[k] for k in unknown[:3]]}")
        if missing:
            raise CheckpointFormatError(f"{self.dir}: {len(missing)} tensor(s) the model needs are missing, e.g. "
                                        f"{missing[:3]}")


class MMSource:
    """An MM checkpoint read lazily: `get(global_name)` merges the tensor from its TP shards, which follow
    `meta.tp_style` (of a tensor whole on every rank, MindSpeed-MM's projector, rank 0's copy is read and the
    others' shapes checked; all count as used). Under expert parallelism a dense tensor's TP shards are read from
    the lowest EP rank's files (the others hold copies, checked by name only) and an expert's from its EP rank's
    files, one per expert-TP rank (`parallel.layout.dense_file_key` / `expert_file_key`). `iteration`: the
    iteration directory to read (default: the tracker's). `partial`: an adapter save, whose rank files hold only
    the LoRA matrices and the trainable parameters: the parameters it holds (`names`) are those its first TP
    rank's files have, every LoRA matrix of the spec among them, and the other TP ranks must hold the same."""

    def __init__(self, mm_dir: Path, meta: MMCheckpointMeta, spec: InternVLSpec, plan: LayoutPlan,
                 iteration: Optional[str] = None, partial: bool = False):
        self.iter_dir = Path(mm_dir) / iteration if iteration else iteration_dir(mm_dir)
        self.spec, self.plan, self.meta, self.style = spec, plan, meta, meta.tp_style
        par = plan.parallel
        self.tp, self.pp, self.vpp, self.ep = par.tp, par.pp, plan.num_chunks, par.ep
        self.keys = rank_file_keys(par)  # (tp_rank, ep_rank) of the files of each pipeline rank
        self._open: dict[tuple[int, int, int], RankFile] = {}
        self._lock = threading.Lock()
        self.mapped = MappedFiles()
        self._check_files()
        ps = params(spec, adapters=partial)
        if partial:
            ps = self._held(ps)
        self.names = [p.name for p in ps]
        self.shapes = {p.name: p.shape for p in ps}
        # global name -> (stage index, local name, the files' (tp_rank, ep_rank) its shards are read from)
        self.where: dict[str, tuple[int, str, list[tuple[int, int]]]] = {}
        self.unused: set[tuple[Path, int, str]] = set()
        self.dtypes: Counter = Counter()
        expected: dict[tuple[int, int, int], set[str]] = {}  # (pp_rank, chunk, ep_rank) -> local names
        read: set[tuple[int, int, int, str]] = set()  # (tp_rank, ep_rank, stage, local) of the shards read
        for p in ps:
            shard = lookup(p.name)[0].per_expert and self.ep > 1
            e_rank = expert_index(p.name) // (spec.text.num_experts // self.ep) if shard else 0
            experts = ExpertShard.of(spec.text.num_experts, self.ep, e_rank)
            if shard:
                sources = [expert_file_key(par, e_rank, i) for i in range(par.expert_tp)]
            else:
                sources = [dense_file_key(par, t) for t in range(self.tp)]
            for s in plan.stages:
                local = stage_name(p.name, s, experts)
                if local is None:
                    continue
                if p.name not in self.where:  # else the tied embeddings' copy (the last stage's output layer)
                    self.where[p.name] = (s.stage, local, sources)
                    read.update((t, e, s.stage, local) for t, e in sources)
                for t, e in self.keys:
                    if not shard or e == e_rank:
                        expected.setdefault((s.stage % self.pp, s.stage // self.pp, e), set()).add(local)
        for pp_rank in range(self.pp):  # inventory (pickles only): every file, chunk and key as the layout says
            for tp_rank, ep_rank in self.keys:
                rf = self._file(tp_rank, pp_rank, ep_rank)
                path = rf.path
                for v, sd in enumerate(rf.chunks):
                    want = expected.get((pp_rank, v, ep_rank), set())
                    extra, missing = sorted(set(sd) - want), sorted(want - set(sd))
                    if extra:
                        raise CheckpointFormatError(f"{path}: chunk {v} has tensor(s) this layout does not place "
                                                    f"there: {extra[:3]}")
                    if missing:
                        raise CheckpointFormatError(f"{path}: chunk {v} lacks {missing[:3]}")
                    stage = pp_rank + v * self.pp
                    # what is never read: the tied embeddings' copy, the other EP ranks' copies of dense tensors
                    self.unused.update((path, v, k) for k in sd if (tp_rank, ep_rank, stage, k) in read)
                    self.dtypes.update(t.dtype for t in sd.values())

    def _check_files(self) -> None:
        """Every rank file the layout has is there, before any is read: one line naming the first missing."""
        for pp_rank in range(self.pp):
            for tp_rank, ep_rank in self.keys:
                path = rank_file(self.iter_dir, tp_rank, pp_rank, self.pp, ep_rank, self.ep)
                if not path.is_file():
                    raise CheckpointFormatError(
                        f"{path}: missing (the checkpoint records {self.plan.describe()}, "
                        f"{len(self.keys) * self.pp} rank files)")

    def _held(self, ps: list) -> list:
        """The parameters of `ps` an adapter save holds: those with their stage-local name in the first TP rank's
        chunk of a stage that places them (the others are checked by the inventory)."""
        present = {(s.stage, k) for s in self.plan.stages
                   for k in self._file(0, s.stage % self.pp, 0).chunks[s.stage // self.pp]}
        held = [p for p in ps if any((s.stage, stage_name(p.name, s, ExpertShard.of(
            self.spec.text.num_experts, self.ep, 0))) in present for s in self.plan.stages)]
        names = {p.name for p in held}
        missing = [p.name for p in ps if p.adapter and p.name not in names]
        if missing:
            raise CheckpointFormatError(f"{self.iter_dir}: an adapter save without {len(missing)} LoRA matrices "
                                        f"its model has, e.g. {missing[0]}")
        return held

    def _file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> RankFile:
        with self._lock:  # writer threads read at once
            rf = self._open.get((tp_rank, pp_rank, ep_rank))
            if rf is None:
                path = rank_file(self.iter_dir, tp_rank, pp_rank, self.pp, ep_rank, self.ep)
                rf = self._open[(tp_rank, pp_rank, ep_rank)] = read_rank_file(path, self.vpp)
                if rf.base is not None:
                    self.mapped.add(path, rf.base, path.stat().st_size)
            return rf

    def _chunk(self, tp_rank: int, stage: int, ep_rank: int = 0) -> tuple[Path, int, dict]:
        rf = self._file(tp_rank, stage % self.pp, ep_rank)
        return rf.path, stage // self.pp, rf.chunks[stage // self.pp]

    def _cut(self, name: str, sl: Slice) -> tuple[int, list[Array]]:
        stage, local, sources = self.where[name]
        shards = []
        for tp_rank, ep_rank in sources:
            path, v, sd = self._chunk(tp_rank, stage, ep_rank)
            shards.append(sd[local].array)
            with self._lock:  # writer threads read at once
                self.unused.discard((path, v, local))
        try:
            return slice_from_shards(name, self.shapes[name], self.spec, shards, self.plan.padded_vocab_size, sl,
                                     self.style)
        except ValueError as e:
            raise CheckpointFormatError(f"{self.iter_dir}: {e}") from None

    def skip(self, name: str) -> None:
        """Count tensor `name` as used without reading it (a base's tensor an adapter save replaces)."""
        stage, local, sources = self.where[name]
        for tp_rank, ep_rank in sources:
            path, v, _ = self._chunk(tp_rank, stage, ep_rank)
            with self._lock:
                self.unused.discard((path, v, local))

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
        stage, local, sources = self.where[name]
        return self._chunk(sources[0][0], stage, sources[0][1])[2][local].dtype

    def release(self) -> None:
        with self._lock:
            self._open.clear()
        self.mapped.close()
