"""2 ranks: pipeline schedules on the tiny GPT give the single-stage loss and grads.

Runs, with the same weights and 4 microbatches: PP2 1F1B; PP2xVPP2 interleaved with
batch_p2p_comm=True (the mcore default, silently wrong on gloo without the adaptor's p2p_order
patch); the same interleaved run with megatron's original _batched_p2p_ops, to show the test can see
the bug; and the reference, PP1 (no pipelining) on each rank.

Usage: torchrun --nproc_per_node 2 pp_parity.py OUT.json
"""
import json
import sys

import torch
from megatron.core.pipeline_parallel import p2p_communication, schedules

from mindspeed_mm.device import apply_device_adaptor
from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
from tiny_gpt import (MBS, SEQ, all_pipeline_states, build_gpt, forward_step, full_state,
                      load_full_state, make_batches, max_rel_diff, tiny_config)

NUM_MICROBATCHES = 4


def run_layout(pp: int, vpp, weights=None):
    """Loss and full grads of one training step (no optimizer) under the given layout."""
    initialize_model_parallel(pp=pp, vpp=vpp)
    config = tiny_config(pp=pp, vpp=vpp, batch_p2p_comm=True)
    models = [build_gpt(config, vp_stage=i if vpp else None) for i in range(vpp or 1)]
    if weights is None:
        weights = all_pipeline_states(full_state(models))
    load_full_state(models, weights)
    batches = make_batches(NUM_MICROBATCHES)
    losses = schedules.get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in models] if vpp else iter(batches),
        model=models if vpp else models[0], num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ, micro_batch_size=MBS)
    local_loss = sum(d["loss"] for d in losses).item() / NUM_MICROBATCHES if losses else None
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local_loss)
    loss = next(v for v in gathered if v is not None)
    grads = all_pipeline_states(full_state(models, "grad"))
    return loss, grads, weights


def main(out_path: str) -> None:
    apply_device_adaptor(force=True)  # this tests the CPU/gloo path, also on a CUDA host
    init_distributed(backend="gloo")
    loss_1f1b, grads_1f1b, weights = run_layout(pp=2, vpp=None)
    loss_vpp, grads_vpp, _ = run_layout(pp=2, vpp=2, weights=weights)
    patched = p2p_communication._batched_p2p_ops
    p2p_communication._batched_p2p_ops = patched.__mm_original__
    try:
        loss_bug, grads_bug, _ = run_layout(pp=2, vpp=2, weights=weights)
    finally:
        p2p_communication._batched_p2p_ops = patched
    loss_ref, grads_ref, _ = run_layout(pp=1, vpp=None, weights=weights)
    if torch.distributed.get_rank() == 0:
        result = {
            "loss_ref": loss_ref,
            "1f1b": {"loss_diff": abs(loss_1f1b - loss_ref),
                     "grad_rel_diff": max_rel_diff(grads_1f1b, grads_ref)},
            "interleaved": {"loss_diff": abs(loss_vpp - loss_ref),
                            "grad_rel_diff": max_rel_diff(grads_vpp, grads_ref)},
            "interleaved_unpatched_p2p": {"loss_diff": abs(loss_bug - loss_ref),
                                          "grad_rel_diff": max_rel_diff(grads_bug, grads_ref)},
        }
        print(json.dumps(result))
        with open(out_path, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
