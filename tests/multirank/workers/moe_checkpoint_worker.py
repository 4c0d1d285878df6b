"""torchrun worker for tests/multirank/test_moe_checkpoints.py. argv: HF_DIR OUT_DIR STEP_JSON; STEP_JSON a list
of steps run one after the other in one launch:

- {"load": MM_DIR, "tp", "ep", "etp", "sp"}: this rank's chunks at that layout, loaded with
  `load_converted_weights`, must equal the HF state sliced for this rank (`local_state_dict` at its EP rank), tensor
  for tensor; asserted here.
- {"train": SAVE_DIR, "tp", "ep", "etp", "sp", "steps", "save_after", "load": DIR or null}: megatron DDP and the
  distributed optimizer, `steps` Adam steps (after `load_checkpoint` of DIR with its optimizer state when given), a
  training save after `save_after` of them; this rank's parameters by full-model name after the save and at the end
  go to OUT_DIR/{tag}_rank{r}.pt."""
import json
import sys
from pathlib import Path

from mindspeed_mm.device import apply_device_adaptor


def main() -> None:
    apply_device_adaptor(force=True)
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.checkpoint.mm_format import MMCheckpointMeta
    from mindspeed_mm.config.parallel import ParallelSizes
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from mindspeed_mm.models.internvl.sharding import local_state_dict
    from mindspeed_mm.parallel.layout import plan_layout
    from mindspeed_mm.runtime.chunks import build_model_chunks, load_converted_weights, load_full_weights
    from mindspeed_mm.training.checkpointing import load_checkpoint, save_checkpoint
    from mindspeed_mm.training.pipeline import train_step, wrap_ddp
    from tests.helpers.batches import make_microbatches
    from tests.helpers.layout_check import trainable_spec

    hf_dir, out_dir, steps = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    init_distributed(backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    spec = trainable_spec(hf_dir)
    _, fmt, state = load_hf_checkpoint(hf_dir)
    full = hf_to_mm(state, spec, fmt)
    groups = None
    for step in steps:
        par = ParallelSizes.from_world_size(world, tp=step["tp"], ep=step["ep"], etp=step.get("etp"),
                                            sp=step.get("sp", False))
        plan = plan_layout(spec, par, world)
        if (par.tp, par.ep, par.etp) != groups:
            initialize_model_parallel(tp=par.tp, ep=par.ep, etp=par.etp)
            groups = (par.tp, par.ep, par.etp)
        chunks = build_model_chunks(spec, plan)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if "load" in step and "train" not in step:
            load_converted_weights(chunks, step["load"])
            for chunk in chunks:
                want = local_state_dict(full, spec, plan, tp_rank, chunk.stage, ep_rank=chunk.experts.rank)
                got = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
                assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:4]
                for k in want:
                    assert torch.equal(got[k], want[k]), f"rank {rank} {plan.describe()}: {k}"
            print(f"rank {rank}: {step['load']} at {plan.describe()}: {len(want)} tensors equal", flush=True)
            continue
        load_full_weights(chunks, full)
        model = wrap_ddp(chunks, use_distributed_optimizer=True)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=1e-6, weight_decay=0.01, clip_grad=1.0, bf16=False,
                            fp16=False, params_dtype=torch.float32, use_distributed_optimizer=True), model)
        meta = MMCheckpointMeta.from_plan(plan, spec, source_format=fmt, source_hf_dir=str(hf_dir), hf_config={})
        first = 0
        if step.get("load"):
            loaded = load_checkpoint(step["load"], model, plan, optimizer, load_rng=False)
            assert loaded.optimizer_loaded
            first = loaded.iteration
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        batches = make_microbatches(spec, 2 * dp * step["steps"], seed=5)

        def params(tag):
            own = {}
            for chunk in chunks:
                for name, p in chunk.global_names():
                    own[name] = p.detach().clone()
            torch.save({"tp_rank": tp_rank, "ep_rank": chunks[0].experts.rank, "dp_rank": dp_rank,
                        "params": own}, out_dir / f"{tag}_rank{rank}.pt")

        for i in range(first, step["steps"]):
            micro = batches[2 * dp * i:2 * dp * (i + 1)][dp_rank::dp]
            train_step(model, optimizer, micro)
            if i + 1 == step.get("save_after"):
                save_checkpoint(step["train"], i + 1, model, plan, meta, optimizer, log=lambda m: None)
                params(f"{step['tag']}_saved")
        params(f"{step['tag']}_end")
    destroy_distributed()


if __name__ == "__main__":
    main()
