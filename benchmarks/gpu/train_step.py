"""One training step in bf16 on one device: ours (megatron-core model, DDP, megatron's mixed-precision Adam,
the `train_step` pretrain_vlm.py runs) against transformers' InternVLForConditionalGeneration with SDPA
attention, fp32 weights under bf16 autocast and fused AdamW (the same mixed precision), on the same weights
and batch: one sample of `--tokens` tokens of which `--tiles` image tiles.

    python benchmarks/gpu/train_step.py --hf-dir CKPT --tiles 12 --tokens 4096 --device cuda --out train.json

Both sides: every module trainable, gradient clipping 1.0, median step time of `--steps` after `--warmup`,
each side alone on the device (together they would not fit at the 2B shape). FLOPs from
mindspeed_mm/training/flops.py (ViT and projector included); MFU against `--peak-tflops` or the device's known
dense bf16 peak.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import common


def timed(fn, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = common.setup(args.device)

    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from transformers import InternVLForConditionalGeneration

    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from mindspeed_mm.parallel.layout import plan_layout
    from mindspeed_mm.runtime.chunks import build_model_chunks, load_full_weights
    from mindspeed_mm.testing.tiny_checkpoint import refresh_rope_buffers
    from mindspeed_mm.training.flops import PEAK_TFLOPS, step_flops
    from mindspeed_mm.training.pipeline import train_step, wrap_ddp
    from tests.helpers.batches import sample_ids
    from tests.helpers.layout_check import trainable_spec

    spec = common.bf16_spec(trainable_spec(args.hf_dir))
    image_tokens = args.tiles * spec.tokens_per_tile
    text = args.tokens - image_tokens - 3  # sample_ids puts 3 text tokens after the image
    if text < 1:
        raise SystemExit(f"{args.tiles} tiles take {image_tokens} tokens, more than --tokens {args.tokens}")
    ids = sample_ids(spec, [args.tiles], text_len=text, seed=0)[None]
    labels = ids.clone()
    labels[ids == spec.img_context_token_id] = -100
    pixels = torch.randn(args.tiles, 3, spec.vision.image_size, spec.vision.image_size,
                         generator=torch.Generator().manual_seed(0))
    seq = ids.shape[1]
    flops = step_flops(spec, args.tiles, [seq])

    # ours, as train_bench.py builds it, in bf16
    init_distributed()
    initialize_model_parallel()
    chunks = build_model_chunks(spec, plan_layout(spec, ParallelSizes(), 1))
    _, fmt, state = load_hf_checkpoint(args.hf_dir)
    load_full_weights(chunks, hf_to_mm(state, spec, fmt))
    del state
    chunks = [c.to(device) for c in chunks]
    model = wrap_ddp(chunks)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, clip_grad=1.0,
                                                 bf16=True, params_dtype=torch.bfloat16), model)
    batch = {"input_ids": ids, "labels": labels, "pixel_values": pixels.bfloat16()}
    losses = []

    def our_step():
        reports, _ = train_step(model, opt, [batch])
        losses.append(reports)

    ours_s = timed(our_step, args.warmup, args.steps, device)
    ours_mem = peak_memory_gib(device)
    model = opt = chunks = None  # freed before transformers' model takes the GPU
    destroy_distributed()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    hf = InternVLForConditionalGeneration.from_pretrained(args.hf_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").to(device).train()
    refresh_rope_buffers(hf)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    d_ids, d_labels, d_pixels = ids.to(device), labels.to(device), pixels.to(device)

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = hf(input_ids=d_ids, pixel_values=d_pixels, labels=d_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    hf_s = timed(hf_step, args.warmup, args.steps, device)
    hf_mem = peak_memory_gib(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    def side(seconds, mem):
        tflops = flops.total / seconds / 1e12
        return {"step_s": seconds, "tokens_per_s": seq / seconds, "tflops": tflops,
                "mfu": tflops / peak if peak else None, "peak_memory_gib": mem}

    common.write_result(args.out, "train", {
        "device": name, "params": sum(p.numel() for p in hf.parameters()), "tokens": seq, "tiles": args.tiles,
        "step_tflop": flops.total / 1e12, "vit_tflop": flops.vit / 1e12, "peak_tflops": peak,
        "ours": side(ours_s, ours_mem), "transformers_sdpa": side(hf_s, hf_mem), "ratio_ours_over_hf": ours_s / hf_s})


if __name__ == "__main__":
    main()
