#!/usr/bin/env python
"""Write a tiny random InternVL3 checkpoint (either HF format) plus its tiny tokenizer, offline.

Example:
    python tools/convert/make_tiny_checkpoint.py --out /tmp/tiny-orig --format original --preset vit6b
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from mindspeed_mm.testing.tiny_checkpoint import TINY_PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, see --overwrite)")
    p.add_argument("--format", choices=["native", "original"], default="native",
                   help="native: transformers InternVLForConditionalGeneration; original: OpenGVLab InternVLChatModel")
    p.add_argument("--preset", choices=sorted(TINY_PRESETS), default="vit300m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--max-shard-bytes", type=int, default=None,
                   help="split the weights into safetensors shards of at most this many bytes (+ index)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

    out = write_tiny_checkpoint(
        args.out,
        fmt=args.format,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.format} tiny InternVL3 checkpoint ({args.preset}, seed {args.seed}, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
