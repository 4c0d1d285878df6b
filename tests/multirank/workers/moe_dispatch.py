"""megatron-core's MoELayer (alltoall dispatcher, SequentialMLP experts) on gloo ranks against the same layer at
EP1 on one rank with the same full weights: outputs, input gradients and every weight's gradient.

Usage: torchrun --nproc_per_node N moe_dispatch.py OUT.json LAYOUT...  (LAYOUT: tp,ep,etp, e.g. 2,2,1; tp > 1 runs
with sequence parallelism, which megatron requires of MoE under TP)
"""
import json
import sys

from mindspeed_mm.device import apply_device_adaptor

apply_device_adaptor(force=True)  # this tests the CPU/gloo path, also on a CUDA host

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel  # noqa: E402

HIDDEN, FFN, EXPERTS, TOPK = 16, 8, 4, 2
SEQ, BATCH = 8, 2  # per data-parallel rank


def moe_layer(tp: int, ep: int, etp: int) -> MoELayer:
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none", moe_grouped_gemm=False,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, memory_efficient_layer_norm=False, cross_entropy_loss_fusion=False,
        transformer_impl="local", cuda_graph_scope=[])
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return MoELayer(config, MoESubmodules(experts=experts))


def full_weights() -> dict:
    g = torch.Generator().manual_seed(7)
    w = {"router.weight": torch.randn(EXPERTS, HIDDEN, generator=g)}
    for e in range(EXPERTS):
        w[f"fc1.{e}"] = torch.randn(2 * FFN, HIDDEN, generator=g) * 0.3  # [gate; up]
        w[f"fc2.{e}"] = torch.randn(HIDDEN, FFN, generator=g) * 0.3
    return w


def local_expert_weights(full: dict, e: int, etp: int, etp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert e's fc1 and fc2 as this expert-TP rank holds them: fc1 [gate_r; up_r], fc2 its columns."""
    gate, up = full[f"fc1.{e}"].chunk(2)
    fc1 = torch.cat([gate.chunk(etp)[etp_rank], up.chunk(etp)[etp_rank]])
    return fc1, full[f"fc2.{e}"].chunk(etp, dim=1)[etp_rank]


def run(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def reference(full: dict, x: torch.Tensor, grad_out: torch.Tensor):
    """The layer at TP1 EP1 on one rank (every rank computes it alike) over all ranks' tokens."""
    initialize_model_parallel()
    layer = moe_layer(1, 1, 1)
    with torch.no_grad():
        layer.router.weight.copy_(full["router.weight"])
        for e, expert in enumerate(layer.experts.local_experts):
            fc1, fc2 = local_expert_weights(full, e, 1, 0)
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)
    out, dx = run(layer, x, grad_out)
    grads = {"router.weight": layer.router.weight.grad}
    for e, expert in enumerate(layer.experts.local_experts):
        grads[f"fc1.{e}"], grads[f"fc2.{e}"] = expert.linear_fc1.weight.grad, expert.linear_fc2.weight.grad
    return out, dx, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check(tp: int, ep: int, etp: int, full: dict, x: torch.Tensor, grad_out: torch.Tensor, ref) -> dict:
    world = torch.distributed.get_world_size()
    dp = world // tp
    initialize_model_parallel(tp=tp, ep=ep, etp=etp)
    layer = moe_layer(tp, ep, etp)
    num_local = EXPERTS // ep
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    names = [n for n, _ in layer.named_parameters()]
    with torch.no_grad():
        layer.router.weight.copy_(full["router.weight"])
        for i, expert in enumerate(layer.experts.local_experts):
            fc1, fc2 = local_expert_weights(full, ep_rank * num_local + i, etp, etp_rank)
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)

    # this rank's tokens: its data-parallel share of the sequence, and under SP its TP slice of that
    dp_rank, tp_rank = ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rows = torch.arange(x.shape[0]).chunk(dp)[dp_rank].chunk(tp)[tp_rank]
    out, dx = run(layer, x[rows], grad_out[rows])
    ref_out, ref_dx, ref_grads = ref
    diffs = {"out": rel(out, ref_out[rows]), "input_grad": rel(dx, ref_dx[rows])}

    # What megatron's DDP and finalize_model_grads sum: a parameter marked `allreduce=False` (an expert's, at
    # EP > 1) over the expert-data-parallel group, any other over DP; the router's (replicated, its tokens split
    # by SP too) also over TP, for its `sequence_parallel` mark.
    def reduced(param):
        grad = param.grad.clone()
        expert = not getattr(param, "allreduce", True)
        torch.distributed.all_reduce(grad, group=ps.get_expert_data_parallel_group() if expert
                                     else ps.get_data_parallel_group())
        if getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad

    assert getattr(layer.router.weight, "sequence_parallel", False) == (tp > 1)
    diffs["router_grad"] = rel(reduced(layer.router.weight), ref_grads["router.weight"])
    expert_diff = 0.0
    for i, expert in enumerate(layer.experts.local_experts):
        e = ep_rank * num_local + i
        want = local_expert_weights({f"fc1.{e}": ref_grads[f"fc1.{e}"], f"fc2.{e}": ref_grads[f"fc2.{e}"]},
                                    e, etp, etp_rank)
        for have, ref_g in zip((expert.linear_fc1.weight, expert.linear_fc2.weight), want):
            assert getattr(have, "allreduce") is (ep == 1)
            expert_diff = max(expert_diff, rel(reduced(have), ref_g))
    diffs["expert_grad"] = expert_diff
    worst = torch.tensor(list(diffs.values()), dtype=torch.float64)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return {"diffs": dict(zip(diffs, worst.tolist())), "param_names": names,
            "expert_groups": {"ep": ps.get_expert_model_parallel_world_size(),
                              "etp": ps.get_expert_tensor_parallel_world_size(),
                              "edp": ps.get_expert_data_parallel_world_size()}}


def main(out_path: str, layouts: list[str]) -> None:
    init_distributed(backend="gloo")
    world = torch.distributed.get_world_size()
    full = full_weights()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SEQ * world, BATCH, HIDDEN, generator=g)
    grad_out = torch.randn(SEQ * world, BATCH, HIDDEN, generator=g)
    ref = reference(full, x, grad_out)
    result = {}
    for layout in layouts:
        tp, ep, etp = map(int, layout.split(","))
        result[layout] = check(tp, ep, etp, full, x, grad_out, ref)
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result))
        with open(out_path, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
