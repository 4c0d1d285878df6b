"""Per-rank GPU memory of a finetune layout, estimated from the model's parameter shapes: the numbers in the
headers of examples/internvl3*/finetune_*.sh and in docs/model_family.md. An estimate, not a measurement.

    python tools/memory_estimate.py examples/internvl3/model_8B.json --tp 1 --pp 4 --world 8 --grad-acc 64

Per rank, in bytes (GB below means 1e9 bytes):
* weights: 2 B per parameter the rank holds (bf16), frozen or not;
* gradients: 4 B per trainable parameter (megatron's DDP keeps fp32 main grads under --bf16);
* optimizer: 12 B per trainable parameter / DP (the distributed optimizer shards the fp32 master copy and
  Adam's two moments over data-parallel ranks);
* activations of the LLM, bf16, per token and layer: the tensors a layer keeps for its backward, counted from
  its shapes in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models") for flash attention (no s^2 term) and no dropout: attention keeps its norm input, the qkv input, q,
  k, v and the projection input (4h + 2*kv*d); the SwiGLU MLP its norm input, fc1 input, gate and up, the
  activated gate and the fc2 input (2h + 4f). Under TP the h-sized norm inputs/outputs are whole on every rank
  unless sequence parallelism splits them. With full recompute (text_decoder.recompute_granularity "full" in
  the model JSON) a layer keeps only its bf16 input (2h), plus one layer's full set while it is recomputed.
  A 1F1B stage p holds min(pp - p, microbatches) micro-batches;
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

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


@dataclass(frozen=True)
class RankMemory:
    tp_rank: int
    pp_rank: int
    frozen: int  # parameters held, by kind
    trainable: int
    weights: float  # GB
    grads: float
    optimizer: float
    activations: float
    logits: float
    allowance: float = ALLOWANCE_GB

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.allowance


def _layer_activation_bytes(spec: InternVLSpec, r: Recipe) -> tuple[float, float]:
    """(bytes one LLM layer keeps per micro-batch for its backward, bytes of its input alone) on one rank."""
    t = spec.text
    h, f, kvd, tokens = t.hidden_size, t.ffn_hidden_size, t.num_query_groups * t.kv_channels, r.seq * r.mbs
    whole = 4 * h  # the two norms' inputs and outputs: whole on every TP rank unless SP splits them
    split = 2 * h + 2 * kvd + 2 * h + 4 * f  # q, attention output, k, v; gate, up, activated gate, fc2 input
    if r.sequence_parallel:
        elements = (whole + split) / r.tp
    else:
        elements = whole + split / r.tp
    layer_input = h / (r.tp if r.sequence_parallel else 1)
    return 2 * tokens * elements, 2 * tokens * layer_input


def estimate(spec: InternVLSpec, plan: LayoutPlan, r: Recipe) -> list[RankMemory]:
    """The estimate for every rank of `plan` (one DP replica: DP ranks hold the same)."""
    full, layer_input = _layer_activation_bytes(spec, r)
    recompute = spec.text.recompute_granularity == "full"  # set per module in the model JSON, as the reference does
    out = []
    for (tp_rank, pp_rank), chunks in sorted(rank_contents(spec, plan).items()):
        frozen = trainable = 0
        for chunk in chunks:
            for tensor in chunk:
                n = math.prod(tensor.shape)
                if trains(spec, tensor.name):
                    trainable += n
                else:
                    frozen += n
        layers = sum(len(plan.stage(pp_rank, v).llm_layers) for v in range(plan.num_chunks))
        in_flight = min(r.pp - pp_rank, r.grad_acc)
        if recompute:
            act = in_flight * layers * layer_input + (full if layers else 0)
        else:
            act = in_flight * layers * full
        last = any(plan.stage(pp_rank, v).has_llm_head for v in range(plan.num_chunks))
        logits = 6 * r.seq * r.mbs * plan.padded_vocab_size / r.tp if last else 0.0
        out.append(RankMemory(tp_rank, pp_rank, frozen, trainable, 2 * (frozen + trainable) / GB,
                              4 * trainable / GB, 12 * trainable / r.dp / GB, act / GB, logits / GB))
    return out


def plan_for(spec: InternVLSpec, r: Recipe) -> LayoutPlan:
    """The layout plan of a recipe: the spec's pipeline_num_layers at TP `r.tp` (an even split when unset)."""
    v, t = spec.vision, spec.text
    vit = [list(v.pipeline_num_layers)] if v.pipeline_num_layers else None
    llm = [list(t.pipeline_num_layers)] if t.pipeline_num_layers else None
    if llm is None and r.pp > 1:
        raise ValueError("a pipelined recipe needs text_decoder.pipeline_num_layers in the model JSON")
    return plan_from_parallel_config(spec, ParallelConfig(tp_size=r.tp, llm_pp_layers=llm, vit_pp_layers=vit))


def fits(ranks: list[RankMemory], gpu_gb: float = 80.0) -> bool:
    return max(m.total for m in ranks) <= FIT_FRACTION * gpu_gb


def report(spec: InternVLSpec, r: Recipe, gpu_gb: float = 80.0) -> str:
    """The lines a finetune script's header carries: the worst rank of each pipeline stage."""
    plan = plan_for(spec, r)
    ranks = estimate(spec, plan, r)
    lines = [f"estimate (not a measurement), per GPU, {plan.describe()} DP{r.dp}, seq {r.seq}, micro-batch {r.mbs}, "
             f"{r.grad_acc} micro-batches/step" + (", SP" if r.sequence_parallel else "")
             + (", full recompute" if spec.text.recompute_granularity == "full" else "") + ":"]
    for pp in range(r.pp):
        m = max((x for x in ranks if x.pp_rank == pp), key=lambda x: x.total)
        lines.append(f"  stage {pp}: {(m.frozen + m.trainable) / 1e9:.2f}B params ({m.trainable / 1e9:.2f}B trainable):"
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
    p.add_argument("--gpu-gb", type=float, default=80.0)
    a = p.parse_args(argv)
    r = Recipe(a.tp, a.pp, a.world, a.grad_acc, a.seq, a.mbs, a.sp)
    print(report(load_for_estimate(a.model_json), r, a.gpu_gb))


if __name__ == "__main__":
    main()
