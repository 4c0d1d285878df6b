"""2 ranks: the tiny GPT at TP2 gives the TP1 loss and grads (TP1 built on the same ranks after).

Usage: torchrun --nproc_per_node 2 tp_parity.py OUT.json
"""
import json
import sys

import torch

from mindspeed_mm.device import apply_device_adaptor
from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
from tiny_gpt import SEQ, build_gpt, full_state, load_full_state, make_batches, max_rel_diff, tiny_config


def loss_and_grads(tp: int, weights=None):
    initialize_model_parallel(tp=tp)
    model = build_gpt(tiny_config(tp=tp))
    init_weights = full_state([model])
    if weights is not None:
        load_full_state([model], weights)
    batch = make_batches(1)[0]
    position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(batch["tokens"])
    loss = model(batch["tokens"], position_ids, None, labels=batch["labels"]).mean()
    loss.backward()
    return loss.item(), full_state([model]), full_state([model], "grad"), init_weights


def main(out_path: str) -> None:
    apply_device_adaptor(force=True)  # this tests the CPU/gloo path, also on a CUDA host
    init_distributed(backend="gloo")
    loss2, weights2, grads2, _ = loss_and_grads(tp=2)
    loss1, weights1, grads1, init1 = loss_and_grads(tp=1, weights=weights2)
    if torch.distributed.get_rank() == 0:
        result = {
            "loss_tp2": loss2, "loss_tp1": loss1, "loss_diff": abs(loss2 - loss1),
            "grad_rel_diff": max_rel_diff(grads2, grads1),
            "weights_roundtrip_diff": max_rel_diff(weights1, weights2),
            # Same seed, CPU init: TP2 splits the same master weights TP1 draws.
            "init_rel_diff": max_rel_diff(init1, weights2),
        }
        print(json.dumps(result))
        with open(out_path, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
