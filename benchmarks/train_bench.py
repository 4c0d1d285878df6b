"""Single-rank training step: ours (megatron-core model, DDP, megatron Adam, the `train_step` the loop runs)
against transformers' eager `InternVLForConditionalGeneration` with torch AdamW, on the same weights and the
same batch, in one process. Also the data loader's samples/s on the tiny dataset.

    python benchmarks/train_bench.py [--preset small] [--steps 9] [--shapes 3x200,6x800] [--workers 2]

Both sides: fp32, gradient clipping 1.0, one micro-batch of 2 samples, the ViT trainable. Each shape
`TILESxTEXT` gives every sample TILES image tiles and TEXT text tokens (6x800 is about 1.2k tokens per sample,
nearer the reference's 2.6k average than 3x200). Step time is the median over `--steps` steps after 2 warm-up
steps, the two implementations interleaved; the ratio is ours / transformers (target <= 1.0).
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


def _median_step(fn, steps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_step(preset: str, steps: int, tiles: int, text: int) -> dict:
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

    hf = load_native_model(hf_dir).float().train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        loss = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

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

    # interleave the two so that drift in the machine's speed hits both alike
    ours, theirs = [], []
    for _ in range(3):
        ours.append(_median_step(our_step, max(1, steps // 3)))
        theirs.append(_median_step(hf_step, max(1, steps // 3)))
    destroy_distributed()
    ours_t, hf_t = statistics.median(ours), statistics.median(theirs)
    n_params = sum(p.numel() for p in hf.parameters())
    return {"preset": preset, "params": n_params, "seq_len": ids.shape[1], "tiles": 2 * tiles,
            "ours_s": ours_t, "transformers_s": hf_t, "ratio": ours_t / hf_t}


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
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--shapes", default="3x200,6x800")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        tiles, text = map(int, shape.split("x"))
        r = bench_step(args.preset, args.steps, tiles, text)
        print(f"train step, preset {r['preset']} ({r['params'] / 1e6:.1f}M params), 2 samples x {r['seq_len']} "
              f"tokens, {r['tiles']} tiles, fp32, 1 rank: ours {r['ours_s'] * 1e3:.0f} ms, transformers eager "
              f"{r['transformers_s'] * 1e3:.0f} ms, ratio {r['ratio']:.2f}x (target <= 1.0)", flush=True)
    for w in sorted({0, args.workers}):
        d = bench_loader(w)
        print(f"data loader, 448-px tiles, micro-batch 4, {d['workers']} workers: {d['samples_per_s']:.1f} samples/s "
              f"({d['tiles_per_s']:.1f} tiles/s)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from mindspeed_mm.device import apply_device_adaptor

    apply_device_adaptor()
    main()
