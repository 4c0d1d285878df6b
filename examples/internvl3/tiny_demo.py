"""The tiny built-in default, on CPU with nothing downloaded: write a tiny random InternVL3 checkpoint,
check our model against transformers on it, then train it for a few steps on 2 ranks at TP2 + SP with
megatron's DDP and distributed Adam. Run through examples/internvl3/run_tiny.sh."""
import os
import sys
import time
from pathlib import Path

from mindspeed_mm.device import apply_device_adaptor


def main() -> None:
    apply_device_adaptor()
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mindspeed_mm.checkpoint.hf_formats import load_hf_checkpoint
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from mindspeed_mm.models.internvl.hf_mapping import hf_to_mm
    from mindspeed_mm.parallel.layout import plan_layout
    from mindspeed_mm.testing.batches import make_microbatches
    from mindspeed_mm.testing.layout_check import trainable_spec
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
    from mindspeed_mm.training.pipeline import build_model_chunks, load_full_weights, train_step, wrap_ddp

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/tiny")
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    hf_dir = out / "hf"
    if rank == 0:
        write_tiny_checkpoint(hf_dir, fmt="native", preset="vit6b", seed=0, overwrite=True)
        print(f"wrote a tiny InternVL3 checkpoint (InternViT-6B style, 5 heads) to {hf_dir}", flush=True)
    torch.distributed.barrier()

    tp = 2 if world % 2 == 0 else 1
    initialize_model_parallel(tp=tp)
    spec = trainable_spec(hf_dir)
    parallel = ParallelSizes.from_world_size(world, tp=tp, sp=tp > 1)
    plan = plan_layout(spec, parallel, world)
    _, fmt, state = load_hf_checkpoint(hf_dir)
    chunks = build_model_chunks(spec, plan)
    load_full_weights(chunks, hf_to_mm(state, spec, fmt))
    model = wrap_ddp(chunks, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=1.0, params_dtype=torch.float32,
                        use_distributed_optimizer=True), model)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = make_microbatches(spec, 2 * dp, seed=1)[dp_rank::dp]
    if rank == 0:
        print(f"training on {world} rank(s): tp={tp} sp={tp > 1} dp={dp}, {len(batches)} micro-batches per step",
              flush=True)
    losses = []
    for step in range(1, 11):
        t0 = time.perf_counter()
        step_losses, grad_norm = train_step(model, optimizer, batches)
        loss = sum(step_losses) / len(step_losses)
        losses.append(loss)
        if rank == 0:
            print(f"step {step:2d}  loss {loss:.4f}  grad norm {grad_norm:.3f}  {1e3 * (time.perf_counter() - t0):.0f} ms",
                  flush=True)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert losses[-1] < 0.8 * losses[0], "the loss did not fall"
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
