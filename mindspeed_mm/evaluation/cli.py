"""`evaluate_vlm.py`: benchmark files answered by copies of a TP x PP model and scored as VLMEvalKit scores them.

    torchrun --nproc_per_node <instances * TP * PP> evaluate_vlm.py --mm-model inference.json \\
        --benchmark MMBench_DEV_EN.tsv --benchmark MME.tsv --work-dir eval_out

The model, tokenizer and generation settings come from the inference JSON (its prompts, if any, are not
used). Each benchmark's items are shared out over the instances, answered in batches, and gathered on rank 0,
which writes `<work dir>/<benchmark>/predictions.jsonl` and `score.json` and prints one summary table.
Rerunning the same command answers only the items that have no answer yet.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mindspeed_mm.errors import UserError, run_main

__all__ = ["main"]

logger = logging.getLogger("mindspeed_mm.evaluation")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate_vlm.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--mm-model", required=True, help="the inference JSON: checkpoint, tokenizer, generation_config")
    p.add_argument("--benchmark", action="append", required=True, metavar="[NAME=]TSV",
                   help="a VLMEvalKit TSV; NAME (default: the file's stem) picks VLMEvalKit's prompt and metric "
                        "for that dataset (repeat for several)")
    p.add_argument("--work-dir", required=True, help="predictions, scores and part files go here")
    p.add_argument("--batch-size", type=int, help="items per generation batch (default: the JSON's batch_size)")
    p.add_argument("--max-new-tokens", type=int, help="overrides generation_config.max_new_tokens")
    p.add_argument("--max-tiles", type=int,
                   help="tiles per image (default: the number VLMEvalKit's InternVL wrapper uses for the dataset)")
    p.add_argument("--num-segments", type=int, help="video frames (default: the JSON's num_segments)")
    p.add_argument("--circular", action=argparse.BooleanOptionalAction, default=None,
                   help="multiple choice: a question counts only if all its circular copies are right (default: "
                        "VLMEvalKit's choice, on for MMBench and CCBench)")
    p.add_argument("--tensor-model-parallel-size", type=int, dest="tp",
                   help="TP of each instance (default: the checkpoint's; another is resharded at load)")
    p.add_argument("--pipeline-model-parallel-size", type=int, dest="pp",
                   help="PP of each instance (default: the checkpoint's; another is resharded at load)")
    p.add_argument("--metrics-file", help="append one JSON record per benchmark (default: <work dir>/metrics.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_tiles", "num_segments", "tp", "pp"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("evaluate_vlm.py", _main, argv)


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Everything a user can get wrong is checked before torch starts a process group.
    from mindspeed_mm.evaluation.benchmark import parse_benchmark_arg, read_columns
    from mindspeed_mm.inference.config import load_inference_config
    from mindspeed_mm.inference.loading import LayoutMismatch, inspect_checkpoint, plan_for

    cfg = load_inference_config(args.mm_model, need_requests=False)
    benchmarks = [parse_benchmark_arg(b) for b in args.benchmark]
    names = [n for n, _ in benchmarks]
    if len(set(names)) != len(names):
        raise UserError(f"--benchmark: two files share a name ({', '.join(names)}); give NAME=TSV to tell them apart")
    for _, path in benchmarks:
        read_columns(path)  # a missing file fails here, on every rank alike
    info = inspect_checkpoint(cfg.from_pretrained, cfg.model, cfg.source)
    plan = plan_for(info, args.tp, args.pp)
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, parse_launch_env

    size = plan.parallel.tp * plan.parallel.pp
    world = parse_launch_env(os.environ).world_size
    if world % size:
        raise LayoutMismatch(f"each instance is TP{plan.parallel.tp} x PP{plan.parallel.pp} ({size} processes), but "
                             f"this run has {world}: launch `torchrun --nproc_per_node <instances x {size}> ...`")
    from mindspeed_mm.device import apply_device_adaptor
    from mindspeed_mm.inference.cli import resolve_device

    device, note = resolve_device(cfg.device)
    if note:
        logger.info("%s", note)
    apply_device_adaptor(force=device == "cpu")
    launch = init_distributed(backend="nccl" if device == "cuda" else "gloo")
    try:
        results = _evaluate(args, cfg, info, plan, benchmarks)
        if launch.rank == 0:
            from mindspeed_mm.evaluation.runner import summary_table

            print(summary_table(results), flush=True)
    finally:
        destroy_distributed()
    return 0


def _evaluate(args, cfg, info, plan, benchmarks):
    import dataclasses

    import torch

    from mindspeed_mm.data.tokenizer import load_tokenizer
    from mindspeed_mm.evaluation.runner import EvalOptions, Evaluator
    from mindspeed_mm.inference.loading import build_runner
    from mindspeed_mm.inference.pipeline import InternVLPipeline

    batch_size = args.batch_size or cfg.batch_size
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    tokenizer = load_tokenizer(cfg.tokenizer, info.spec.img_context_token_id)
    runner = build_runner(info, cfg.dtype, plan)
    pipeline = InternVLPipeline(runner, tokenizer, cfg, cfg.seq_length or info.spec.text.max_position_embeddings)
    work_dir = Path(args.work_dir)
    options = EvalOptions(work_dir, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                          max_tiles=args.max_tiles, num_segments=args.num_segments, circular=args.circular,
                          progress=not args.no_progress)
    evaluator = Evaluator(pipeline, cfg, options)
    metrics = Path(args.metrics_file) if args.metrics_file else work_dir / "metrics.jsonl"
    results = []
    for name, path in benchmarks:
        r = evaluator.evaluate(name, path)
        results.append(r)
        if torch.distributed.get_rank() == 0:
            for p in r.per_instance:
                rate = p["items"] / p["seconds"] if p["seconds"] > 0 else float("nan")
                logger.info("%s: instance %d answered %d item(s) in %.2f s (%.3f items/s)", name, p["instance"],
                            p["items"], p["seconds"], rate)
            record = {"time": time.time(), "benchmark": name, "kind": r.kind, "metric": r.metric,
                      "overall": r.score.get("overall"), "items": r.score.get("items"),
                      "skipped": r.score.get("skipped"), "answered_now": r.answered_now,
                      "seconds": round(r.seconds, 4), "items_per_s": round(r.items_per_s, 4) if r.answered_now
                      else None, "instances": evaluator.instances, "tp": plan.parallel.tp, "pp": plan.parallel.pp,
                      "batch_size": batch_size}
            metrics.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
