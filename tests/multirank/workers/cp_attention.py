"""CP ranks (cp = world size): ring and Ulysses ContextParallelAttention against single-process causal
attention, on a sequence that needs padding; then a tiny GPT at CP = world vs CP = 1 per algorithm.

Usage: torchrun --nproc_per_node N cp_attention.py OUT.json [--gpt]
"""
import functools
import json
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from mindspeed_mm.device import apply_device_adaptor
from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel
from mindspeed_mm.parallel.context_parallel import (
    RING_ALGO, ULYSSES_ALGO, ContextParallelAttention, pad_to_multiple, zigzag_positions, zigzag_split)
from tests.helpers.attention import reference_causal_attention
from tiny_gpt import VOCAB, full_state, load_full_state, max_rel_diff, tiny_config  # beside this script

LENGTH, BATCH, HEADS, GROUPS, HEAD_DIM = 13, 2, 4, 2, 8


def gather_zigzag(local: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Undo the zigzag split along dim 0: every rank's part, placed at its global positions."""
    group = parallel_state.get_context_parallel_group()
    cp = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = local.new_empty((seq_len,) + tuple(local.shape[1:]))
    for r, part in enumerate(parts):
        full[zigzag_positions(seq_len, cp, r)] = part
    return full


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def attention_case(cp: int, algo: str) -> dict:
    seq = pad_to_multiple(LENGTH, 2 * cp)
    g = torch.Generator().manual_seed(1)
    # Pad positions get random values too: they must not leak into real tokens.
    q = torch.randn(seq, BATCH, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(seq, BATCH, GROUPS, HEAD_DIM, generator=g)
    v = torch.randn(seq, BATCH, GROUPS, HEAD_DIM, generator=g)
    weight = torch.randn(seq, BATCH, HEADS * HEAD_DIM, generator=g)
    weight[LENGTH:] = 0  # the loss ignores pad positions

    ref_in = [t[:LENGTH].clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_causal_attention(*ref_in)
    (ref_out * weight[:LENGTH]).sum().backward()

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               hidden_dropout=0.0, context_parallel_size=cp, use_cpu_initialization=True)
    attn = ContextParallelAttention(config, 1, AttnMaskType.causal, "self", cp_algo=algo)
    assert attn.cp_algo == algo
    rank = parallel_state.get_context_parallel_rank()
    local = [zigzag_split(t, cp, rank, 0).clone().requires_grad_() for t in (q, k, v)]
    start = time.perf_counter()
    out = attn(*local, None)
    (out * zigzag_split(weight, cp, rank, 0)).sum().backward()
    elapsed = time.perf_counter() - start
    full_out = gather_zigzag(out.detach(), seq)[:LENGTH]
    grads = [gather_zigzag(t.grad, seq)[:LENGTH] for t in local]
    return {"out_abs_diff": (full_out - ref_out.detach()).abs().max().item(),
            "grad_rel_diff": max(rel(a, b.grad) for a, b in zip(grads, ref_in)),
            "fwd_bwd_s": elapsed}


# --- tiny GPT: CP = world vs CP = 1 ------------------------------------------------------------

def gpt_case(cp: int, algo: str) -> dict:
    seq = pad_to_multiple(LENGTH, 2 * cp)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, seq), generator=g)
    labels = torch.randint(0, VOCAB, (2, seq), generator=g)
    loss_mask = torch.zeros(2, seq)
    loss_mask[:, :LENGTH] = 1

    def spec():
        s = get_gpt_layer_local_spec(normalization="RMSNorm")
        s.submodules.self_attention.submodules.core_attention = functools.partial(
            ContextParallelAttention, cp_algo=algo)
        return s

    def run(cp_size, weights=None):
        initialize_model_parallel(cp=cp_size)
        model = GPTModel(config=tiny_config(num_layers=2, context_parallel_size=cp_size),
                         transformer_layer_spec=spec(), vocab_size=VOCAB, max_sequence_length=seq,
                         share_embeddings_and_output_weights=False, position_embedding_type="rope")
        if weights is not None:
            load_full_state([model], weights)
        r = parallel_state.get_context_parallel_rank()
        tok, lab, mask = (zigzag_split(t, cp_size, r, 1) for t in (tokens, labels, loss_mask))
        pos = torch.arange(tok.size(1)).unsqueeze(0).expand_as(tok)
        per_token = model(tok, pos, None, labels=lab)
        loss = (per_token * mask).sum() / loss_mask.sum()
        loss.backward()
        grads = full_state([model], "grad")
        loss = loss.detach().clone()
        if cp_size > 1:  # what DDP's dp_cp reduction does: sum the partial losses and grads over CP
            group = parallel_state.get_context_parallel_group()
            dist.all_reduce(loss, group=group)
            for t in grads.values():
                dist.all_reduce(t, group=group)
        return loss.item(), full_state([model]), grads

    loss_cp, weights, grads_cp = run(cp)
    loss_1, _, grads_1 = run(1, weights)
    return {"loss_cp": loss_cp, "loss_cp1": loss_1, "loss_diff": abs(loss_cp - loss_1), "grad_rel_diff": max_rel_diff(grads_cp, grads_1)}


def main(out_path: str, gpt: bool) -> None:
    apply_device_adaptor(force=True)  # tests the CPU/gloo path, also on a CUDA host
    init_distributed(backend="gloo")
    cp = dist.get_world_size()
    initialize_model_parallel(cp=cp)
    result = {"cp": cp}
    for name, algo in (("ring", RING_ALGO), ("ulysses", ULYSSES_ALGO)):
        result[name] = attention_case(cp, algo)
    if gpt:
        for name, algo in (("ring", RING_ALGO), ("ulysses", ULYSSES_ALGO)):
            result[f"gpt_{name}"] = gpt_case(cp, algo)
    if dist.get_rank() == 0:
        print(json.dumps(result))
        with open(out_path, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], "--gpt" in sys.argv[2:])
