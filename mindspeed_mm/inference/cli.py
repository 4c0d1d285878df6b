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

__all__ = ["main", "reconcile_flags", "resolve_device", "run"]

logger = logging.getLogger("mindspeed_mm.inference")


# The reference launcher's (inference_internvl.sh) Megatron flags. Layout flags must match the checkpoint, model
# flags the JSON (config.model_flags, shared with pretrain_vlm.py); these are training's, accepted and noted once.
_TRAINING_ONLY = {"micro_batch_size": int, "global_batch_size": int, "use_distributed_optimizer": bool,
                  "log_interval": int, "save_interval": int, "eval_interval": int, "eval_iters": int,
                  "use_flash_attn": bool, "no_masked_softmax_fusion": bool, "distributed_backend": str,
                  "tokenizer_type": str}
_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
           "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from mindspeed_mm.config.model_flags import REPEATED_FLAGS, flag_name

    p = argparse.ArgumentParser(prog="inference_vlm.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("config", nargs="?", help="the inference JSON")
    p.add_argument("--mm-model", dest="mm_model", help="the inference JSON (the reference launcher's flag)")
    p.add_argument("--output-path", help="overrides output_path")
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--print-nproc", action="store_true",
                   help="print the number of processes the checkpoint's layout needs (TP x PP) and exit")
    meg = p.add_argument_group("Megatron flags of the reference launcher")
    for name in _LAYOUT:
        meg.add_argument(flag_name(name), dest=name, type=int, help="must match the checkpoint's layout")
    for name, kind in REPEATED_FLAGS.items():
        meg.add_argument(flag_name(name), dest=name, type=kind, help=f"must equal text_decoder.{name}")
    meg.add_argument("--swiglu", action="store_true", help="the LLM must be gated SiLU")
    meg.add_argument("--seq-length", dest="seq_length", type=int,
                     help="prompt + new tokens limit; must equal the JSON's seq_length if it has one")
    meg.add_argument("--bf16", action="store_true", help="the JSON's dtype must be bf16")
    meg.add_argument("--fp16", action="store_true", help="the JSON's dtype must be fp16")
    for name, kind in _TRAINING_ONLY.items():
        if kind is bool:
            meg.add_argument(flag_name(name), dest=name, action="store_true", help="accepted: training only")
        else:
            meg.add_argument(flag_name(name), dest=name, type=kind, help="accepted: training only")
    args = p.parse_args(argv)
    if (args.config is None) == (args.mm_model is None):
        p.error("give the inference JSON once: as the positional argument or as --mm-model")
    args.config = args.config or args.mm_model
    return args


def reconcile_flags(args: argparse.Namespace, cfg, info):
    """The Megatron flags against the JSON and the checkpoint: a contradiction is an error naming both.
    Returns (cfg with --seq-length applied, the training-only flags given, to note once)."""
    from mindspeed_mm.config.model_flags import REPEATED_FLAGS, ArgumentError, check_model_flags, flag_name

    have = {"tensor_model_parallel_size": info.tp, "pipeline_model_parallel_size": info.pp,
            "virtual_pipeline_model_parallel_size": info.plan.vpp or 1, "context_parallel_size": 1,
            "expert_model_parallel_size": 1, "expert_tensor_parallel_size": info.tp}  # an EP save is resharded
    for name in _LAYOUT:
        flag = getattr(args, name)
        if flag is not None and flag != have[name]:
            why = {"context_parallel_size": "inference runs without context parallelism",
                   "expert_model_parallel_size": "inference holds every expert on each rank (no expert parallelism)",
                   "expert_tensor_parallel_size": "inference splits the experts as the LLM's other MLPs, over TP",
                   }.get(name, f"the checkpoint {info.path} is split {info.describe()}; reshard it with `mm-convert "
                               f"InternVLConverter resplit` to run another layout")
            raise ArgumentError(f"{flag_name(name)} {flag} contradicts the run's {have[name]}: {why}")
    check_model_flags(info.spec, cfg.source, {name: getattr(args, name) for name in REPEATED_FLAGS}, args.swiglu)
    for flag in ("bf16", "fp16"):
        if getattr(args, flag) and cfg.dtype != flag:
            raise ArgumentError(f"--{flag} contradicts dtype {cfg.dtype!r} of {cfg.source}")
    if args.seq_length is not None:
        if cfg.seq_length is not None and cfg.seq_length != args.seq_length:
            raise ArgumentError(f"--seq-length {args.seq_length} contradicts seq_length {cfg.seq_length} of "
                                f"{cfg.source}")
        limit = info.spec.text.max_position_embeddings
        if args.seq_length > limit:
            raise ArgumentError(f"--seq-length {args.seq_length} exceeds text_decoder.max_position_embeddings "
                                f"{limit} of {cfg.source}")
        cfg = dataclasses.replace(cfg, seq_length=args.seq_length)
    noted = [flag_name(n) for n in _TRAINING_ONLY if getattr(args, n) not in (None, False)]
    return cfg, noted


def resolve_device(name: str) -> tuple[str, str | None]:
    """The device to run on for the JSON's `device`, and a note when it is not the one asked for: the
    accelerator that is there runs (the reference's files say "npu")."""
    import torch

    cuda = torch.cuda.is_available()
    got = "cuda" if cuda and name in ("auto", "cuda", "npu") else "cpu"
    if name in ("auto", got):
        return got, None
    return got, f"device {name!r} asked for; running on {got}" + ("" if cuda else " (torch sees no CUDA device)")


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

    info = info or inspect_checkpoint(cfg.from_pretrained, cfg.model, cfg.source)
    check_world(info, torch.distributed.get_world_size())
    tokenizer = load_tokenizer(cfg.tokenizer, info.spec.img_context_token_id)
    runner = build_runner(info, cfg.dtype)
    max_length = cfg.seq_length or info.spec.text.max_position_embeddings
    return InternVLPipeline(runner, tokenizer, cfg, max_length).run(cfg.requests)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("inference_vlm.py", _main, argv)


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The config and the checkpoint's metadata are read before torch is imported or any group starts: a bad
    # key, a missing file or a wrong checkpoint fails in a second, on every rank alike.
    from mindspeed_mm.inference.config import load_inference_config
    from mindspeed_mm.inference.loading import check_world, inspect_checkpoint

    cfg = load_inference_config(args.config)
    overrides = {k: v for k, v in (("output_path", args.output_path), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    info = inspect_checkpoint(cfg.from_pretrained, cfg.model, cfg.source)
    cfg, noted = reconcile_flags(args, cfg, info)
    if args.print_nproc:
        print(info.world_size)
        return 0
    if noted:
        logger.info("accepted with no effect at inference (training flags): %s", " ".join(noted))
    from mindspeed_mm.device import apply_device_adaptor
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, parse_launch_env

    check_world(info, parse_launch_env(os.environ).world_size)  # before megatron and any process group
    device, note = resolve_device(cfg.device)
    if note:
        logger.info("%s", note)
    apply_device_adaptor(force=device == "cpu")  # megatron assumes CUDA; on CPU it runs through the adaptor
    launch = init_distributed(backend="nccl" if device == "cuda" else "gloo")
    try:
        results = run(cfg, info)
        if launch.rank == 0:
            for r in results:
                print(json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r["response"],
                                  "finish_reason": r["finish_reason"], "token_ids": r["token_ids"], **r["timings"]},
                                 ensure_ascii=False))
            if cfg.output_path:
                from mindspeed_mm.inference.pipeline import write_results

                write_results(results, cfg.output_path)
                logger.info("wrote %d result(s) to %s", len(results), cfg.output_path)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
