"""Decode tokens/s: ours (KV cache) against transformers' `generate` with SDPA, greedy, batch 1, on the
checkpoint the other steps use; benchmarks/generate_bench.py's measurement, on a device and in a dtype.

    python benchmarks/gpu/decode.py --hf-dir CKPT --new-tokens 128 --device cuda --dtype bf16 --out decode.json
"""
from __future__ import annotations

import argparse

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = common.setup(args.device)
    import torch

    from generate_bench import decode_bench

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # bf16 kernels round differently on each side, so greedy texts may part after a while: reported, not failed
    r = decode_bench(args.hf_dir, args.new_tokens, args.repeats, attns=("sdpa",), device=str(device),
                     dtype=dtype, check_tokens=dtype == torch.float32)
    tps = r["decode_tokens_per_s"]
    r["ratio_ours_over_hf"] = tps["ours, KV cache"] / tps["transformers generate (sdpa)"]
    common.write_result(args.out, "decode", {"device": str(device), "dtype": args.dtype, **r})


if __name__ == "__main__":
    main()
