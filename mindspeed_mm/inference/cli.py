"""`inference_vlm.py`: generate for the requests of an inference JSON.

    torchrun --nproc_per_node <tp*pp of the checkpoint> inference_vlm.py --mm-model inference_8B.json

Every rank reads the same JSON and inputs and runs its share of the model; rank 0 prints each response and
writes `output_path` (JSONL: id, prompt, response, token ids, finish reason, timings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

from mindspeed_mm.errors import run_main

__all__ = ["main", "run"]

logger = logging.getLogger("mindspeed_mm.inference")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference_vlm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="the inference JSON")
    p.add_argument("--mm-model", dest="mm_model", help="the inference JSON (the reference launcher's flag)")
    p.add_argument("--output-path", help="overrides output_path")
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--print-nproc", action="store_true",
                   help="print the number of processes the checkpoint's layout needs (TP x PP) and exit")
    args = p.parse_args(argv)
    if (args.config is None) == (args.mm_model is None):
        p.error("give the inference JSON once: as the positional argument or as --mm-model")
    args.config = args.config or args.mm_model
    return args


def _device(name: str) -> str:
    import torch

    from mindspeed_mm.inference.config import InferenceConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceConfigError("device", "'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return name


def run(cfg, info=None) -> list[dict]:
    """Generate for `cfg` (an InferenceConfig) on this process's share of the model; all ranks return the
    results. Expects the default process group (init_distributed) of the checkpoint's size. `info`: the
    checkpoint's `inspect_checkpoint`, if already read."""
    import torch

    from mindspeed_mm.data.tokenizer import load_tokenizer
    from mindspeed_mm.inference.loading import (
        build_runner,
        check_world,
        inspect_checkpoint,
    )
    from mindspeed_mm.inference.pipeline import InternVLPipeline

    info = info or inspect_checkpoint(cfg.from_pretrained, cfg.model)
    check_world(info, torch.distributed.get_world_size())
    tokenizer = load_tokenizer(cfg.tokenizer, info.spec.img_context_token_id)
    runner = build_runner(info, cfg.dtype)
    max_length = cfg.seq_length or info.spec.text.max_position_embeddings
    return InternVLPipeline(runner, tokenizer, cfg, max_length).run(cfg.requests)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("inference_vlm.py", _main, argv)


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    # The config and the checkpoint's metadata are read before torch is imported or any group starts: a bad
    # key, a missing file or a wrong checkpoint fails in a second, on every rank alike.
    from mindspeed_mm.inference.config import load_inference_config
    from mindspeed_mm.inference.loading import check_world, inspect_checkpoint

    cfg = load_inference_config(args.config)
    overrides = {k: v for k, v in (("output_path", args.output_path), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    info = inspect_checkpoint(cfg.from_pretrained, cfg.model)
    if args.print_nproc:
        print(info.world_size)
        return 0
    from mindspeed_mm.device import apply_device_adaptor
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, parse_launch_env

    check_world(info, parse_launch_env(os.environ).world_size)  # before megatron and any process group
    device = _device(cfg.device)
    apply_device_adaptor(force=device == "cpu")  # megatron assumes CUDA; on CPU it runs through the adaptor
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    launch = init_distributed(backend="nccl" if device == "cuda" else "gloo")
    try:
        results = run(cfg, info)
        if launch.rank == 0:
            for r in results:
                print(json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r["response"],
                                  "finish_reason": r["finish_reason"], **r["timings"]}, ensure_ascii=False))
            if cfg.output_path:
                from mindspeed_mm.inference.pipeline import write_results

                write_results(results, cfg.output_path)
                logger.info("wrote %d result(s) to %s", len(results), cfg.output_path)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
