"""A benchmark run over model instances: VLMEvalKit's way (`torchrun` starts the instances, each answers its
share, a barrier, rank 0 gathers and scores), with each instance a TP x PP Megatron model.

The instances are megatron's data-parallel groups: with W processes and a TP x PP model there are W / (TP x PP)
of them, and an item's answer comes from one instance only. Within an instance every rank prepares the same
batch and takes part in its generation; the instance's first rank (TP and PP rank 0) appends each batch's
answers to `<work dir>/<benchmark>/parts/instance-<k>.jsonl` as soon as they exist (flushed and synced), so a
run killed half-way loses at most the batches in flight. A rerun reads every part file there (whatever the
instance count of the run that wrote it), skips the items answered, shares the rest out again, and writes
`predictions.jsonl` (file order) and `score.json` only once every item has an answer.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mindspeed_mm.checkpoint.atomic import replace_file
from mindspeed_mm.data.template import DEFAULT_SYSTEM_MESSAGE, build_prompt as build_prompt_ids
from mindspeed_mm.evaluation import prompts, scoring
from mindspeed_mm.evaluation.benchmark import Benchmark, BenchmarkError, Item, load_benchmark, read_columns
from mindspeed_mm.inference.config import InferenceConfig, RequestSpec
from mindspeed_mm.inference.pipeline import InternVLPipeline, PreparedRequest, frame_tiles, image_tiles

__all__ = ["EvalOptions", "Evaluator", "prepare", "prepare_item", "summary_table"]

logger = logging.getLogger("mindspeed_mm.evaluation")
PREDICTIONS, SCORE, PARTS = "predictions.jsonl", "score.json", "parts"
# Fault injection for the resume test: every instance's writer kills its process, as `kill -9` would, right
# after writing this many batches.
_KILL_AFTER = int(os.environ.get("MM_EVAL_KILL_AFTER_BATCHES", "0") or 0)


@dataclass(frozen=True)
class EvalOptions:
    work_dir: Path
    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the inference JSON's generation_config
    max_tiles: int | None = None  # None: VLMEvalKit's per-dataset choice for InternVL (prompts.max_tiles)
    num_segments: int | None = None  # video frames; None: the inference JSON's num_segments
    circular: bool | None = None  # MMBench's circular evaluation; None: VLMEvalKit's choice for the dataset name
    progress: bool = True


@dataclass
class BenchmarkResult:
    name: str
    kind: str
    metric: str
    score: dict
    answered_now: int = 0  # items this run answered (the rest came from part files)
    seconds: float = 0.0
    per_instance: list[dict] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.answered_now / self.seconds if self.seconds > 0 else float("nan")


def prepare(text: str, name: str, kind: str, spec, tokenizer, *, images: Sequence[str] = (),
            frames: Sequence[str] = (), video: str | None = None, max_tiles: int | None = None,
            num_segments: int = 8, use_thumbnail: bool = True, system_message: str | None = None,
            max_new_tokens: int | None = None, index: str | None = None) -> PreparedRequest:
    """Prompt ids and tiles for a user text whose `<image>` placeholders stand for `images` (or a video's
    frames), tiled as VLMEvalKit's InternVL wrapper tiles them and tokenised by our template. `max_tiles`:
    tiles per image, None for the wrapper's choice for the dataset (several images share a cap)."""
    tiles = []
    if images:
        n = len(images)
        per_image = (prompts.max_tiles(name, n, kind) if max_tiles is None
                     else max(1, min(max_tiles, prompts.TOTAL_MAX_TILES // n)))
        tiles = [image_tiles(p, spec, per_image, use_thumbnail) for p in images]
    elif frames:
        tiles = [image_tiles(p, spec, 1, use_thumbnail) for p in frames]
    elif video:
        tiles = frame_tiles(video, spec, num_segments)
    counts = [t.shape[0] for t in tiles]
    ids = build_prompt_ids([{"from": "human", "value": text}], counts, spec.tokens_per_tile, tokenizer,
                           system_message if system_message is not None else DEFAULT_SYSTEM_MESSAGE)
    files = tuple(images or frames or ((video,) if video else ()))
    data_type = "video" if frames or video else "image" if images else "text"
    request = RequestSpec(text, data_type, files, id=index, max_new_tokens=max_new_tokens)
    return PreparedRequest(request, ids, torch.cat(tiles) if tiles else None, counts)


def prepare_item(item: Item, name: str, kind: str, spec, tokenizer, *, num_segments: int, **kw) -> PreparedRequest:
    """A benchmark item's prompt as VLMEvalKit builds it for InternVL (`prompts.build_prompt`), prepared."""
    n_frames = 0
    if item.frames:
        n_frames = len(item.frames)
    elif item.video:
        n_frames = num_segments
    text = prompts.build_prompt(name, kind, item.question, item.options, item.hint, n_images=len(item.images),
                                n_frames=n_frames)
    return prepare(text, name, kind, spec, tokenizer, images=item.images, frames=item.frames, video=item.video,
                   num_segments=num_segments, index=item.index, **kw)


def _read_records(path: Path) -> list[dict]:
    """A part file's records; a last line cut short by a kill is dropped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _repair(path: Path) -> None:
    """Cut a part file back to its last whole line, so appending after a kill starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _answered(bench_dir: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    parts = bench_dir / PARTS
    if parts.is_dir():
        for path in sorted(parts.glob("*.jsonl")):
            _repair(path)
            for rec in _read_records(path):
                out.setdefault(str(rec.get("index")), rec)
    return out


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Evaluator:
    """Benchmarks answered by this rank's instance with `pipeline`; scores on global rank 0."""

    def __init__(self, pipeline: InternVLPipeline, config: InferenceConfig, options: EvalOptions):
        from megatron.core import parallel_state as ps

        self.pipeline, self.config, self.options = pipeline, config, options
        self.spec, self.tokenizer = pipeline.spec, pipeline.tokenizer
        self.instance = ps.get_data_parallel_rank()
        self.instances = ps.get_data_parallel_world_size()
        self.writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        self.rank = dist.get_rank()

    # ------------------------------------------------------------------------------------------- one file
    def evaluate(self, name: str, path: Path) -> BenchmarkResult:
        bench_dir = self.options.work_dir / name
        loaded = None
        if self.rank == 0:
            try:
                kind = prompts.benchmark_kind(name, read_columns(path))
                bench = load_benchmark(path, name, image_dir=bench_dir / "images", kind=kind)
                if not bench.items:
                    raise BenchmarkError(f"{path}: no row can be answered (skipped: {dict(bench.skipped)})")
                loaded = (kind, bench, set(_answered(bench_dir)))
            except BenchmarkError as e:
                loaded = e
        loaded = _broadcast(loaded)
        if isinstance(loaded, BenchmarkError):
            raise loaded
        kind, bench, done = loaded
        for index, reason in bench.skipped_rows if self.rank == 0 else ():
            logger.warning("%s: skipped index %s: %s", name, index, reason)
        todo = [it for it in bench.items if it.index not in done]
        mine = todo[self.instance::self.instances]
        if self.rank == 0:
            logger.info("%s: %d items (%s skipped), %d answered before, %d to answer on %d instance(s)", name,
                        len(bench.items), sum(bench.skipped.values()), len(bench.items) - len(todo), len(todo),
                        self.instances)
        start = time.perf_counter()
        answered = self._answer(name, kind, mine, bench_dir)
        seconds = time.perf_counter() - start
        per_instance = [None] * dist.get_world_size()
        dist.all_gather_object(per_instance, {"instance": self.instance, "items": answered, "seconds": seconds,
                                              "writer": self.writer})
        per_instance = [p for p in per_instance if p["writer"]]
        result = BenchmarkResult(name, kind, self._metric(name, kind), {}, answered_now=sum(
            p["items"] for p in per_instance), seconds=max(p["seconds"] for p in per_instance),
            per_instance=per_instance)
        if self.rank == 0:
            result.score = self._finish(bench, kind, result.metric, bench_dir)
        result.score = _broadcast(result.score)
        result.metric = result.score.get("metric", result.metric)
        return result

    def _metric(self, name: str, kind: str) -> str:
        return prompts.vqa_metric(name) if kind in (prompts.VQA, prompts.VIDEO_VQA) else "accuracy"

    def _answer(self, name: str, kind: str, items: Sequence[Item], bench_dir: Path) -> int:
        """This instance's items, a batch at a time; returns how many it answered."""
        opts, spec = self.options, self.spec
        max_tiles = opts.max_tiles
        num_segments = opts.num_segments or self.config.num_segments
        out = None
        if self.writer and items:
            (bench_dir / PARTS).mkdir(parents=True, exist_ok=True)
            out = open(bench_dir / PARTS / f"instance-{self.instance}-of-{self.instances}.jsonl", "a",
                       encoding="utf-8")
        bar = None
        if self.writer and opts.progress and items:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=f"{name} [instance {self.instance}/{self.instances}]",
                       position=self.instance, unit="item", dynamic_ncols=True)
        limit = self.pipeline.max_length
        try:
            for start in range(0, len(items), opts.batch_size):
                batch = items[start:start + opts.batch_size]
                records, prepared = [], []
                for item in batch:
                    try:
                        p = prepare_item(item, name, kind, spec, self.tokenizer, max_tiles=max_tiles,
                                         num_segments=num_segments, use_thumbnail=self.config.use_thumbnail,
                                         system_message=self.config.system_message,
                                         max_new_tokens=opts.max_new_tokens)
                    except Exception as e:  # an unreadable picture or video: counted, not fatal
                        from mindspeed_mm.errors import UserError

                        if not isinstance(e, (UserError, OSError)):
                            raise
                        records.append({"index": item.index, "skipped": "bad_input", "why": str(e)[:300]})
                        continue
                    if len(p.input_ids) >= limit:
                        records.append({"index": item.index, "skipped": "prompt_too_long",
                                        "why": f"{len(p.input_ids)} prompt tokens, sequence length {limit}"})
                        continue
                    prepared.append(p)
                if prepared:
                    for r in self.pipeline.run_batch(prepared):
                        records.append({"index": r["id"], "prediction": r["response"],
                                        "finish_reason": r["finish_reason"],
                                        "num_prompt_tokens": r["num_prompt_tokens"],
                                        "num_new_tokens": len(r["token_ids"])})
                order = {it.index: k for k, it in enumerate(batch)}
                records.sort(key=lambda r: order[r["index"]])
                if out is not None:
                    out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                    out.flush()
                    os.fsync(out.fileno())
                    if _KILL_AFTER and (start // opts.batch_size + 1) >= _KILL_AFTER:
                        os.kill(os.getpid(), signal.SIGKILL)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if out is not None:
                out.close()
            if bar is not None:
                bar.close()
        dist.barrier()
        return len(items)

    # ------------------------------------------------------------------------------------------- rank 0
    def _finish(self, bench: Benchmark, kind: str, metric: str, bench_dir: Path) -> dict:
        answered = _answered(bench_dir)
        missing = [it.index for it in bench.items if it.index not in answered]
        if missing:  # cannot happen unless a part file was edited between the barrier and here
            raise BenchmarkError(f"{bench_dir / PARTS}: no answer for {len(missing)} item(s), e.g. {missing[0]}")
        skipped = Counter(bench.skipped)
        rows = []
        for it in bench.items:
            rec = answered[it.index]
            if "skipped" in rec:
                skipped[rec["skipped"]] += 1
                continue
            row = {"index": it.index, "question": it.question, "answer": it.answer, "category": it.category}
            if it.l2_category is not None:
                row["l2-category"] = it.l2_category
            if it.image_path is not None:
                row["image_path"] = it.image_path
            row["prediction"] = rec["prediction"]
            if it.options:
                row["options"] = it.options
            if bench.has_answers and it.answer is not None:
                row["extracted"], row["correct"] = scoring.judge(kind, metric, row)
            row["finish_reason"] = rec.get("finish_reason")
            rows.append(row)
        score = {"benchmark": bench.name, "file": str(bench.path), "kind": kind, "metric": metric,
                 "items": len(rows), "skipped": dict(sorted(skipped.items()))}
        scored = [r for r in rows if "correct" in r]
        if scored:
            score.update(scoring.score(kind, metric, scored, dataset_name=bench.name, circular=self.options.circular))
        else:
            score["overall"] = None
            score["note"] = "no answers in the file: predictions only"
        bench_dir.mkdir(parents=True, exist_ok=True)
        replace_file(bench_dir / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        replace_file(bench_dir / SCORE, json.dumps(score, indent=2, ensure_ascii=False) + "\n")
        return score


def summary_table(results: Sequence[BenchmarkResult]) -> str:
    """One table: a row per benchmark."""
    head = ("benchmark", "kind", "metric", "items", "skipped", "overall", "items/s")
    rows = [head]
    for r in results:
        overall = r.score.get("overall")
        rows.append((r.name, r.kind, r.metric, str(r.score.get("items", 0)),
                     str(sum(r.score.get("skipped", {}).values())),
                     "-" if overall is None else f"{overall:.2f}",
                     "-" if not r.answered_now else f"{r.items_per_s:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
