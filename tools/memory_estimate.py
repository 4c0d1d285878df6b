"""Per-rank GPU memory of a finetune layout, estimated from the model's parameter shapes: the numbers in the
headers of examples/internvl3*/finetune_*.sh and in docs/model_family.md. An estimate, not a measurement.

    python tools/memory_estimate.py examples/internvl3/model_8B.json --tp 1 --pp 4 --world 8 --grad-acc 64
    python tools/memory_estimate.py examples/internvl3_5/model_30B_A3B.json --tp 1 --pp 2 --ep 8 --world 16

Per rank, in bytes (GB below means 1e9 bytes):
* weights: 2 B per parameter the rank holds (bf16), frozen or not;
* gradients: 4 B per trainable parameter (megatron's DDP keeps fp32 main grads under --bf16);
* optimizer: 12 B per trainable parameter / DP (the distributed optimizer shards the fp32 master copy and
  Adam's two moments over data-parallel ranks);
* mixture of experts (text_decoder.model_id "qwen3_moe"): the experts of a sparse layer (num_experts x SwiGLU of
  moe_ffn_hidden_size) are split over EP ranks (whole experts) and each expert's FFN over ETP ranks, within a
  PP stage; everything else (attention, norms, embeddings, the dense layers' MLPs) is cut by TP and PP as for a
  dense model, and the router (num_experts x hidden, fp32 in megatron's TopKRouter) is whole on every TP rank.
  EP lives inside data parallelism as in megatron: world = tp*pp*cp*dp and tp*cp*dp = etp*ep*edp, so expert
  optimizer states are sharded over the expert-DP ranks edp, dense ones over dp;
* activations of the LLM, bf16, per token and layer: the tensors a layer keeps for its backward, counted from
  its shapes in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models") for flash attention (no s^2 term) and no dropout: attention keeps its norm input, the qkv input, q,
  k, v and the projection input (4h + 2*kv*d); the SwiGLU MLP its norm input, fc1 input, gate and up, the
  activated gate and the fc2 input (2h + 4f). Under TP the h-sized norm inputs/outputs are whole on every rank
  unless sequence parallelism splits them. With full recompute (text_decoder.recompute_granularity "full" in
  the model JSON) a layer keeps only its bf16 input (2h), plus one layer's full set while it is recomputed.
  A 1F1B stage p holds min(pp - p, microbatches) micro-batches. A sparse layer keeps, instead of the dense MLP's
  4f, per token and routed copy (topk of them, balanced routing assumed, so an EP rank receives as many as it
  sends): the dispatched input and the expert output before the weighted combine (2h: the dispatch buffers) and
  the expert FFN's gate, up, activated gate and fc2 input (4 moe_f / ETP); plus the router's fp32 logits and
  probabilities (2 x num_experts x 4 B);
* logits on the last stage: 6 B per token per vocabulary entry / TP (bf16 logits + fp32 softmax kept for the
  cross-entropy backward);
* an allowance of 4 GB for what the shapes do not say: CUDA context, NCCL buffers, allocator fragmentation and
  the frozen ViT's transient forward activations (about 1 GB for 13 tiles through InternViT-6B).
The ViT is frozen by default (as in the reference), so it costs its weights only. A layout fits a GPU when the
total stays under 90% of its memory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one
from mindspeed_mm.checkpoint.convert import rank_contents  # noqa: E402
from mindspeed_mm.config.model_spec import InternVLSpec, load_model_spec  # noqa: E402
from mindspeed_mm.config.parallel import ParallelConfig  # noqa: E402
from mindspeed_mm.config.model_spec import TextDecoderSpec  # noqa: E402
from mindspeed_mm.models.internvl.params import lookup, param_shapes  # noqa: E402
from mindspeed_mm.models.internvl.params import trainable as trains  # noqa: E402
from mindspeed_mm.parallel.layout import LayoutPlan, plan_from_parallel_config  # noqa: E402

GB = 1e9
ALLOWANCE_GB = 4.0
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class Recipe:
    """A finetune layout as the scripts set it."""
    tp: int
    pp: int
    world: int  # GPUs in all
    grad_acc: int  # micro-batches per step (per DP rank)
    seq: int = 4096
    mbs: int = 1
    sequence_parallel: bool = False
    ep: int = 1  # --expert-model-parallel-size
    etp: int = 1  # --expert-tensor-parallel-size

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Expert data parallelism: the ranks sharing one expert slice (tp*dp = etp*ep*edp; no CP here)."""
        return self.tp * self.dp // (self.etp * self.ep)

    def check(self) -> None:
        if self.world % (self.tp * self.pp):
            raise ValueError(f"world {self.world} is not a multiple of tp*pp = {self.tp * self.pp}")
        if (self.tp * self.dp) % (self.etp * self.ep):
            raise ValueError(f"tp*dp = {self.tp * self.dp} is not a multiple of etp*ep = {self.etp * self.ep}: "
                             "expert parallelism lives inside data parallelism")


@dataclass(frozen=True)
class RankMemory:
    tp_rank: int
    pp_rank: int
    frozen: int  # parameters held, by kind
    trainable: int  # experts included
    experts: int  # of `trainable`: expert parameters, whose optimizer states shard over expert-DP
    weights: float  # GB
    grads: float
    optimizer: float
    activations: float
    logits: float
    allowance: float = ALLOWANCE_GB

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.allowance


def _activation_bytes(spec: InternVLSpec, r: Recipe, sparse: bool) -> tuple[float, float]:
    """(bytes one LLM layer keeps per micro-batch for its backward, bytes of its input alone) on one rank; `sparse`:
    a layer with experts instead of the dense MLP."""
    t = spec.text
    h, f, kvd, tokens = t.hidden_size, t.ffn_hidden_size, t.num_query_groups * t.kv_channels, r.seq * r.mbs
    whole = 4 * h  # the two norms' inputs and outputs: whole on every TP rank unless SP splits them
    split = 2 * h + 2 * kvd + 2 * h  # q, attention output, k, v; the MLP's h-sized tensors
    extra = 0.0  # bytes per token outside the bf16 element count
    if not sparse:
        split += 4 * f  # gate, up, activated gate, fc2 input
    if r.sequence_parallel:
        elements = (whole + split) / r.tp
    else:
        elements = whole + split / r.tp
    if sparse:
        # each TP rank routes its own tokens: its SP shard, or all of them without SP
        local = 1 / r.tp if r.sequence_parallel else 1
        elements += local * t.moe_router_topk * (2 * h + 4 * t.moe_ffn_hidden_size / r.etp)
        extra = local * 2 * t.num_experts * 4
    layer_input = h / (r.tp if r.sequence_parallel else 1)
    return tokens * (2 * elements + extra), 2 * tokens * layer_input


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model JSON, from its fields (no registry): the MoE split the estimate shards by."""
    vit: int  # the ViT and the projector
    llm_dense: int  # embeddings, attention, norms, dense MLPs, routers
    llm_experts: int  # every expert of every sparse layer
    llm_active: int  # the LLM's parameters one token goes through (top-k experts of each sparse layer)

    @property
    def llm(self) -> int:
        return self.llm_dense + self.llm_experts

    @property
    def total(self) -> int:
        return self.vit + self.llm


def expert_params(t: TextDecoderSpec) -> int:
    """One expert: SwiGLU gate, up and down of moe_ffn_hidden_size."""
    return 3 * t.hidden_size * t.moe_ffn_hidden_size


def param_counts(spec: InternVLSpec) -> ParamCounts:
    """From the parameter registry: the ViT and projector, the LLM's dense parameters (routers included), its
    experts, and what one token uses (the dense ones and top-k experts per sparse layer)."""
    t = spec.text
    shapes = param_shapes(spec)
    vit = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("text_decoder."))
    experts = sum(math.prod(s) for n, s in shapes.items() if _expert_row(n))
    dense = sum(math.prod(s) for n, s in shapes.items() if n.startswith("text_decoder.")) - experts
    active = dense + (len(t.moe_layers) * t.moe_router_topk * expert_params(t) if t.moe else 0)
    return ParamCounts(vit, dense, experts, active)


def _expert_row(name: str) -> bool:
    return lookup(name)[0].per_expert


def _counted_apart(name: str) -> bool:
    """A sparse layer's router or expert: counted per rank from the EP/ETP split, not from the rank's rows."""
    return _expert_row(name) or name.endswith(".mlp.router.weight")


def estimate(spec: InternVLSpec, plan: LayoutPlan, r: Recipe) -> list[RankMemory]:
    """The estimate for every rank of `plan` (one DP replica: DP ranks hold the same)."""
    r.check()
    t = spec.text
    if not t.moe and (r.ep, r.etp) != (1, 1):
        raise ValueError(f"expert parallelism (ep {r.ep}, etp {r.etp}) for a dense LLM ({t.model_id})")
    if t.moe and (t.num_experts % r.ep or t.moe_ffn_hidden_size % r.etp):
        raise ValueError(f"ep {r.ep} must divide num_experts {t.num_experts} and etp {r.etp} "
                         f"moe_ffn_hidden_size {t.moe_ffn_hidden_size}")
    dense_act = _activation_bytes(spec, r, sparse=False)
    sparse_act = _activation_bytes(spec, r, sparse=True) if t.moe else dense_act
    recompute = t.recompute_granularity == "full"  # set per module in the model JSON, as the reference does
    llm_trains = trains(spec, "text_decoder.decoder.layers.0.mlp.linear_fc1.weight")
    router = t.num_experts * t.hidden_size if t.moe else 0
    local_experts = (t.num_experts // r.ep) * expert_params(t) // r.etp if t.moe else 0
    out = []
    for (tp_rank, pp_rank, _), chunks in sorted(rank_contents(spec, plan).items()):
        frozen = trainable = 0
        for chunk in chunks:
            for tensor in chunk:
                if _counted_apart(tensor.name):
                    continue
                n = math.prod(tensor.shape)
                if trains(spec, tensor.name):
                    trainable += n
                else:
                    frozen += n
        llm_layers = [i for v in range(plan.num_chunks) for i in plan.stage(pp_rank, v).llm_layers]
        sparse = sum(t.is_moe_layer(i) for i in llm_layers)
        experts = sparse * local_experts
        if llm_trains:
            trainable += sparse * router + experts
        else:
            frozen += sparse * router + experts
            experts = 0
        in_flight = min(r.pp - pp_rank, r.grad_acc)
        per_layer = [sparse_act if t.is_moe_layer(i) else dense_act for i in llm_layers]
        if recompute:
            act = in_flight * sum(x[1] for x in per_layer) + max((x[0] for x in per_layer), default=0)
        else:
            act = in_flight * sum(x[0] for x in per_layer)
        last = any(plan.stage(pp_rank, v).has_llm_head for v in range(plan.num_chunks))
        logits = 6 * r.seq * r.mbs * plan.padded_vocab_size / r.tp if last else 0.0
        optimizer = 12 * (trainable - experts) / r.dp + 12 * experts / r.edp
        out.append(RankMemory(tp_rank, pp_rank, frozen, trainable, experts, 2 * (frozen + trainable) / GB,
                              4 * trainable / GB, optimizer / GB, act / GB, logits / GB))
    return out


def plan_for(spec: InternVLSpec, r: Recipe) -> LayoutPlan:
    """The layout plan of a recipe: the spec's pipeline_num_layers at TP `r.tp` (an even split when unset)."""
    v, t = spec.vision, spec.text
    vit = [list(v.pipeline_num_layers)] if v.pipeline_num_layers else None
    llm = [list(t.pipeline_num_layers)] if t.pipeline_num_layers else None
    if llm is None and r.pp > 1:
        raise ValueError("a pipelined recipe needs text_decoder.pipeline_num_layers in the model JSON")
    if llm is not None and len(llm[0]) != r.pp:
        # the report walks r.pp stages: a JSON of another depth would be summed over the wrong ranks
        raise ValueError(f"pp {r.pp} but text_decoder.pipeline_num_layers has {len(llm[0])} stages")
    return plan_from_parallel_config(spec, ParallelConfig(tp_size=r.tp, llm_pp_layers=llm, vit_pp_layers=vit))


def fits(ranks: list[RankMemory], gpu_gb: float = 80.0) -> bool:
    return max(m.total for m in ranks) <= FIT_FRACTION * gpu_gb


def report(spec: InternVLSpec, r: Recipe, gpu_gb: float = 80.0) -> str:
    """The lines a finetune script's header carries: the worst rank of each pipeline stage."""
    plan = plan_for(spec, r)
    ranks = estimate(spec, plan, r)
    moe = f" EP{r.ep} ETP{r.etp} EDP{r.edp}" if spec.text.moe else ""
    lines = [f"estimate (not a measurement), per GPU, {plan.describe()} DP{r.dp}{moe}, seq {r.seq}, "
             f"micro-batch {r.mbs}, "
             f"{r.grad_acc} micro-batches/step" + (", SP" if r.sequence_parallel else "")
             + (", full recompute" if spec.text.recompute_granularity == "full" else "") + ":"]
    for pp in range(r.pp):
        m = max((x for x in ranks if x.pp_rank == pp), key=lambda x: x.total)
        experts = f", {m.experts / 1e9:.2f}B of them experts" if m.experts else ""
        lines.append(f"  stage {pp}: {(m.frozen + m.trainable) / 1e9:.2f}B params ({m.trainable / 1e9:.2f}B trainable"
                     f"{experts}):"
                     f" weights {m.weights:.1f} + grads {m.grads:.1f} + optimizer {m.optimizer:.1f} + activations "
                     f"{m.activations:.1f} + logits {m.logits:.1f} + allowance {m.allowance:.0f} = {m.total:.1f} GB")
    worst = max(m.total for m in ranks)
    lines.append(f"  peak {worst:.1f} GB of {gpu_gb:.0f} GB: {'fits' if fits(ranks, gpu_gb) else 'does NOT fit'} "
                 f"(limit {FIT_FRACTION:.0%})")
    return "\n".join(lines)


def load_for_estimate(path: str) -> InternVLSpec:
    """The model JSON's spec. Until the qwen3/internlm3 LLM kinds parse, their shapes are read as the Qwen2
    kind's (kv_channels kept; their q/k norms, 2*head_dim weights a layer, are left out of the count)."""
    try:
        return load_model_spec(path)
    except Exception:
        raw = json.load(open(path, encoding="utf-8"))
        text = raw["text_decoder"]
        if text.get("model_id") not in ("qwen3", "internlm3"):
            raise
        text = {k: v for k, v in text.items() if k != "qk_layernorm"}
        text["model_id"] = "internllm"
        return load_model_spec({**raw, "text_decoder": text}, source=path)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_json")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--grad-acc", type=int, default=64)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=1)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    a = p.parse_args(argv)
    r = Recipe(a.tp, a.pp, a.world, a.grad_acc, a.seq, a.mbs, a.sp, a.ep, a.etp)
    spec = load_for_estimate(a.model_json)
    print(report(spec, r, a.gpu_gb))
    if spec.text.moe:
        c = param_counts(spec)
        print(f"  parameters: {c.total / 1e9:.2f}B (ViT and projector {c.vit / 1e9:.2f}B, LLM {c.llm / 1e9:.2f}B: "
              f"dense {c.llm_dense / 1e9:.2f}B + experts {c.llm_experts / 1e9:.2f}B; {c.llm_active / 1e9:.2f}B "
              "active per token)")


if __name__ == "__main__":
    main()
