"""Single-rank training step: ours (megatron-core model, DDP, megatron Adam, the `train_step` the loop runs)
against transformers' `InternVLForConditionalGeneration` with torch AdamW, once with SDPA attention (transformers'
default, the headline baseline) and once with eager attention, on the same weights and the same batch, in one
process. Also the data loader's samples/s on the tiny dataset.

    python benchmarks/train_bench.py [--preset small] [--steps 10] [--rounds 5] [--shapes 3x200,6x800] [--workers 2]

All sides: fp32, gradient clipping 1.0, one micro-batch of 2 samples, the ViT trainable. Each shape
`TILESxTEXT` gives every sample TILES image tiles and TEXT text tokens (6x800 is about 1.2k tokens per sample,
nearer the reference's 2.6k average than 3x200). After 2 untimed steps per side (the second measures the step's
peak memory), `--rounds` rounds each time ours, transformers SDPA and transformers eager for `--steps / --rounds`
steps, the order rotating per round. Per round, ratio = ours' median / the baseline's median; printed are the
min / median / max of those per-round ratios (target <= 1.0 against SDPA).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.helpers


def _timed(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _step_peak_bytes(fn, device) -> int:
    """Peak memory one call of ``fn`` adds on top of what was resident when it started (weights, gradients
    and optimizer state of every model in the process are in that baseline, so the sides compare by what
    their step itself allocates). CUDA: the allocator's own peak. CPU: the kernel's high-water mark of the
    RSS, reset just before the call; glibc is first asked to hand freed heap back, or memory cached from an
    earlier step would hide this step's growth."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


SIDES = ("ours", "sdpa", "eager")


def bench_step(preset: str, steps: int, tiles: int, text: int, rounds: int = 5) -> dict:
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from mindspeed_mm.parallel.layout import plan_layout
    from tests.helpers.batches import sample_ids
    from tests.helpers.layout_check import trainable_spec
    from tests.helpers.oracle import load_native_model
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
    from mindspeed_mm.runtime.chunks import build_model_chunks, load_full_weights
    from mindspeed_mm.training.pipeline import train_step, wrap_ddp

    tmp = Path(tempfile.mkdtemp(prefix="train_bench-"))
    hf_dir = write_tiny_checkpoint(tmp / "hf", fmt="native", preset=preset, seed=0)
    spec = trainable_spec(hf_dir)
    ids = torch.stack([sample_ids(spec, [tiles], text_len=text, seed=s) for s in range(2)])
    labels = ids.clone()
    labels[ids == spec.img_context_token_id] = -100
    pixels = torch.randn(2 * tiles, 3, spec.vision.image_size, spec.vision.image_size,
                         generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": labels, "pixel_values": pixels}

    def hf_side(attn: str):
        hf = load_native_model(hf_dir).float().train()
        if attn != "eager":
            hf.set_attn_implementation(attn)
        impls = {c._attn_implementation for c in (hf.config, hf.config.vision_config, hf.config.text_config)}
        if impls != {attn}:
            raise RuntimeError(f"transformers model asked for {attn} attention runs {impls}")
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()

        return hf, step

    hf_eager, eager_step = hf_side("eager")
    hf_sdpa, sdpa_step = hf_side("sdpa")
    # a faster baseline that computes something else would make the headline meaningless
    with torch.no_grad():
        l_eager = hf_eager(input_ids=ids, pixel_values=pixels, labels=labels).loss
        l_sdpa = hf_sdpa(input_ids=ids, pixel_values=pixels, labels=labels).loss
    torch.testing.assert_close(l_sdpa, l_eager, rtol=1e-4, atol=1e-5)

    init_distributed()
    initialize_model_parallel()
    plan = plan_layout(spec, ParallelSizes(), 1)
    chunks = build_model_chunks(spec, plan)
    _, fmt, state = load_hf_checkpoint(hf_dir)
    load_full_weights(chunks, hf_to_mm(state, spec, fmt))
    model = wrap_ddp(chunks)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, clip_grad=1.0,
                                                 params_dtype=torch.float32), model)

    def our_step():
        train_step(model, opt, [batch])

    fns = {"ours": our_step, "sdpa": sdpa_step, "eager": eager_step}
    device = next(hf_eager.parameters()).device
    # the first step allocates gradients and optimizer state; the second, untimed anyway, gives the peak
    peak = {}
    for name, fn in fns.items():
        fn()
        peak[name] = _step_peak_bytes(fn, device)
    # interleaved rounds, the order rotating, so that drift in the machine's speed and any advantage of
    # running first or after a given side hit every side alike
    per_step = max(1, steps // rounds)
    times = {name: [] for name in SIDES}
    for r in range(rounds):
        for name in SIDES[r % 3:] + SIDES[:r % 3]:
            times[name].append(_timed(fns[name], per_step))
    destroy_distributed()

    def spread(xs):
        return min(xs), statistics.median(xs), max(xs)

    n_params = sum(p.numel() for p in hf_eager.parameters())
    return {"preset": preset, "params": n_params, "seq_len": ids.shape[1], "tiles": 2 * tiles,
            "rounds": rounds, "steps_per_round": per_step, "device": str(device),
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "peak_bytes": peak,
            "vs_sdpa": spread([o / b for o, b in zip(times["ours"], times["sdpa"])]),
            "vs_eager": spread([o / b for o, b in zip(times["ours"], times["eager"])])}


def bench_loader(workers: int, seconds: float = 10.0) -> dict:
    """The data pipeline at the real tile size (448 px, up to 12 tiles + thumbnail, 256 tokens per tile) on the
    tiny dataset written at that size (images up to 1344 px, several images per sample, videos, text)."""
    from mindspeed_mm.data.data_spec import load_data_spec
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.sampler import build_dataloader
    from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer
    from mindspeed_mm.testing.tiny_dataset import write_tiny_dataset
    from mindspeed_mm.testing.tiny_run import write_data_json

    tmp = Path(tempfile.mkdtemp(prefix="loader_bench-"))
    tokenizer = build_tiny_tokenizer(tmp / "tok")
    jsonl = write_tiny_dataset(tmp / "data", image_size=448)
    spec_path = write_data_json(tmp / "data.json", jsonl, tmp / "tok", image_size=448, max_dynamic_patch=12)
    dataset = InternVLChatDataset(load_data_spec(spec_path), tokenizer, seq_length=8192)
    it = iter(build_dataloader(dataset, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0, consumed_samples=0,
                               num_workers=workers, pad_id=0))
    next(it)  # worker start-up
    n, tiles, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["input_ids"].shape[0]
        tiles += 0 if b["pixel_values"] is None else b["pixel_values"].shape[0]
    dt = time.perf_counter() - t0
    return {"workers": workers, "samples_per_s": n / dt, "tiles_per_s": tiles / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shapes", default="3x200,6x800")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loader-seconds", type=float, default=10.0)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        tiles, text = map(int, shape.split("x"))
        r = bench_step(args.preset, args.steps, tiles, text, rounds=args.rounds)
        rows.append(r)
        m, mib = r["median_s"], {k: v / 2**20 for k, v in r["peak_bytes"].items()}
        print(f"train step, preset {r['preset']} ({r['params'] / 1e6:.1f}M params), 2 samples x {r['seq_len']} "
              f"tokens, {r['tiles']} tiles, fp32, 1 rank, {r['device']}, {r['rounds']} rounds x "
              f"{r['steps_per_round']} steps: ours {m['ours'] * 1e3:.0f} ms, transformers sdpa "
              f"{m['sdpa'] * 1e3:.0f} ms, eager {m['eager'] * 1e3:.0f} ms; step peak ours {mib['ours']:.0f} MiB, "
              f"sdpa {mib['sdpa']:.0f} MiB, eager {mib['eager']:.0f} MiB", flush=True)
    print("\ntokens/sample | ours/sdpa min med max (target <= 1.0) | ours/eager min med max | "
          "step peak MiB ours / sdpa / eager")
    for r in rows:
        s_, e_, mib = r["vs_sdpa"], r["vs_eager"], {k: v / 2**20 for k, v in r["peak_bytes"].items()}
        print(f"{r['seq_len']:>13} | {s_[0]:.2f} {s_[1]:.2f} {s_[2]:.2f}x{'':>23} | {e_[0]:.2f} {e_[1]:.2f} "
              f"{e_[2]:.2f}x{'':>7} | {mib['ours']:.0f} / {mib['sdpa']:.0f} / {mib['eager']:.0f}", flush=True)
    print()
    for w in sorted({0, args.workers}):
        d = bench_loader(w, args.loader_seconds)
        print(f"data loader, 448-px tiles, micro-batch 4, {d['workers']} workers: {d['samples_per_s']:.1f} samples/s "
              f"({d['tiles_per_s']:.1f} tiles/s)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from mindspeed_mm.device import apply_device_adaptor

    apply_device_adaptor()
    main()
