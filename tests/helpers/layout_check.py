"""Run a tiny InternVL3 at a parallel layout through the real training path and collect what a test
compares against the single-rank run: micro-batch losses, gradients or parameters after Adam steps,
each rank's slices merged back into full-model tensors by the inverse sharding functions.

The same function runs in-process at world size 1 (the reference) and under torchrun (the layout).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
from mindspeed_mm.parallel.layout import plan_layout
from mindspeed_mm.models.internvl.sharding import full_state_dict
from tests.helpers.batches import make_microbatches, make_packed_microbatches
from mindspeed_mm.runtime.chunks import build_model_chunks, load_converted_weights, load_full_weights
from mindspeed_mm.training.expert_load import step_figures
from mindspeed_mm.training.loss import REPORT_KEY, LossMode, local_share, sample_segments
from mindspeed_mm.training.pipeline import (forward_backward, forward_step, local_tensors, microbatch_losses,
                                            moe_reports, train_step, wrap_ddp)


@dataclass
class LayoutArgs:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sp: bool = False
    cp_algo: str = "megatron_cp_algo"
    vit_pp_layers: list | None = None
    llm_pp_layers: list | None = None
    microbatches: int = 2
    adam_steps: int = 0
    distributed_optimizer: bool = False
    seed: int = 0
    mm_dir: str | None = None  # load the weights from this mm-convert output instead of slicing the HF ones
    # LoRA as a user has it (`lora_spec_of`): "vit", "llm" or "both" adapted (dropout 0), the base ViT and LLM
    # frozen, the projector trainable; random adapters (B non-zero) loaded with the weights, the same everywhere
    lora: str | None = None
    unfreeze_last_layers: int = 0  # with lora: the ViT's last layers trainable
    recompute: bool = False  # full recompute of every layer of both modules (through the spec)
    # packed micro-batches (batches.make_packed_microbatches): "pack" runs `microbatches` packs per DP rank in
    # per-sample mode and reports every sample's loss; "alone" runs each of their samples as a micro-batch of its
    # own (default mode: the sample's loss); both give the gradient of the mean of the samples' losses
    packed: str | None = None
    ep: int = 1  # expert parallelism (a sparse LLM), inside DP as megatron has it
    etp: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LayoutArgs":
        return cls(**json.loads(text))


def trainable_spec(hf_dir) -> InternVLSpec:
    """The checkpoint's spec with every module trainable, so every gradient is compared."""
    spec = spec_from_hf_dir(hf_dir)
    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, freeze=False),
                               projector=dataclasses.replace(spec.projector, freeze=False),
                               text=dataclasses.replace(spec.text, freeze=False))


LORA_RANK, LORA_ALPHA = 4, 8.0


def lora_spec_of(spec: InternVLSpec, args: LayoutArgs) -> InternVLSpec:
    """`spec` with the LoRA, freezing and recompute `args` ask for."""
    if args.lora:
        assert args.lora in ("vit", "llm", "both"), args.lora
        lora = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0}
        vision = dataclasses.replace(spec.vision, freeze=True, unfreeze_last_layers=args.unfreeze_last_layers,
                                     lora=lora if args.lora in ("vit", "both") else None)
        text = dataclasses.replace(spec.text, freeze=True, lora=lora if args.lora in ("llm", "both") else None)
        spec = dataclasses.replace(spec, vision=vision, text=text,
                                   projector=dataclasses.replace(spec.projector, freeze=False))
    if args.recompute:
        full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, **full),
                                   text=dataclasses.replace(spec.text, **full))
    return spec


def random_adapters(spec: InternVLSpec, seed: int = 11) -> dict[str, torch.Tensor]:
    """Every LoRA matrix of `spec`, full-size, from a generator keyed by `seed` and its name: A and B alike
    non-zero, so that the first step's gradient reaches A (B = 0 would stop it)."""
    import zlib

    from mindspeed_mm.models.internvl.params import params

    out = {}
    for p in params(spec, adapters=True):
        if p.adapter:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(p.name.encode()))
            out[p.name] = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(0.2).float()
    return out


def run_layout(hf_dir, args: LayoutArgs) -> dict:
    """Needs megatron's groups initialised at (tp, pp, cp, vpp). Returns this rank's share."""
    spec, plan = layout_plan(hf_dir, args, torch.distributed.get_world_size())
    chunks = build_model_chunks(spec, plan, args.cp_algo)
    if args.mm_dir:
        load_converted_weights(chunks, args.mm_dir)
    else:
        _, fmt, state = load_hf_checkpoint(hf_dir)
        full = hf_to_mm(state, spec, fmt)
        if args.lora:
            full.update(random_adapters(spec))
        load_full_weights(chunks, full)
    loaded = local_tensors(chunks, "param") if args.lora else None
    model = wrap_ddp(chunks, args.distributed_optimizer)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    microbatches = make_microbatches(spec, args.microbatches * dp, seed=args.seed)[dp_rank::dp]
    if args.packed == "pack":
        microbatches = make_packed_microbatches(spec, args.microbatches * dp, seed=args.seed)[0][dp_rank::dp]
    elif args.packed == "alone":
        assert dp == 1, "the samples alone are the one-rank reference"
        microbatches = make_packed_microbatches(spec, args.microbatches, seed=args.seed)[1]

    losses, moe = [], []
    if args.packed == "pack":
        assert args.adam_steps == 0
        reports = forward_backward(model, microbatches, loss_mode=LossMode.PER_SAMPLE, step=per_sample_step,
                                   full_reports=True)
        losses.append([float(x) for r in reports for x in r["per_sample"]])
        what = "grad"
    elif args.adam_steps == 0:
        losses.append(microbatch_losses(forward_backward(model, microbatches)))
        what = "grad"
    else:
        optimizer = get_megatron_optimizer(
            # eps 1e-6: some gradients are zero up to rounding (the ViT's key bias cannot change a softmax),
            # and with eps 1e-8 Adam would turn that rounding noise into updates of up to lr in size.
            OptimizerConfig(optimizer="adam", lr=1e-4, adam_eps=1e-6, weight_decay=0.01, clip_grad=1.0, bf16=False, fp16=False,
                            params_dtype=torch.float32, use_distributed_optimizer=args.distributed_optimizer),
            model)
        for _ in range(args.adam_steps):
            reports = train_step(model, optimizer, microbatches, full_reports=True)[0]
            losses.append(microbatch_losses([r[REPORT_KEY] for r in reports]))
            if spec.text.moe:  # the step's load-balancing loss and expert load, as the training log has them
                moe.append(step_figures(moe_reports(reports), spec, parallel_state.is_pipeline_last_stage(
                    ignore_virtual=True), torch.device("cpu")))
        what = "param"
    out = {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": dp_rank,
        "cp_rank": parallel_state.get_context_parallel_rank(),
        "ep_rank": parallel_state.get_expert_model_parallel_rank() if args.ep > 1 else 0,
        "losses": losses,
        "moe": moe,
        "tensors": local_tensors(model, what),
    }
    if args.lora:
        out.update(_lora_facts(model, spec, loaded, out["tensors"], optimizer if args.adam_steps else None))
    return out


def per_sample_step(mode, data_iterator, model, all_gather: bool = False):
    """`pipeline.forward_step`, its loss function reporting as well each sample's loss (`per_sample`: its mean
    over its target tokens, the CP ranks' shares summed)."""
    output, loss_fn = forward_step(mode, data_iterator, model, all_gather)
    labels, sample_ids = loss_fn.args[1], loss_fn.keywords["sample_ids"]

    def loss(per_token_loss):
        *out, report = loss_fn(per_token_loss)
        mask, seg, n = sample_segments(labels, sample_ids)
        sums = torch.zeros(n, dtype=per_token_loss.dtype, device=per_token_loss.device).index_add(
            0, local_share(seg, per_token_loss, sample_ids).reshape(-1), per_token_loss.detach().reshape(-1))
        if parallel_state.get_context_parallel_world_size() > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_context_parallel_group())
        counts = torch.zeros(n, device=mask.device).index_add_(0, seg.reshape(-1), mask.reshape(-1))
        return (*out, dict(report, per_sample=(sums / counts.clamp(min=1))[counts > 0]))

    return output, loss


def _lora_facts(model, spec, loaded, after, optimizer) -> dict:
    """What this rank's frozen and trainable parameters did (global names), the start-up report's figures
    (collectives) and this rank's trainable elements and tensors."""
    from mindspeed_mm.models.internvl.sharding import global_name
    from mindspeed_mm.training.trainable_report import count_parameters, optimizer_state_bytes

    facts = {"frozen_changed": [], "changed": [], "trainable": [], "local_trainable": [0, 0]}
    for chunk in model:
        module = chunk.module
        for local, p in module.named_parameters():
            name = global_name(local, module.stage)
            same = torch.equal(loaded[module.stage.stage][local], after[module.stage.stage][local])
            if p.requires_grad:
                facts["trainable"].append(name)
                facts["local_trainable"][0] += p.numel()
                facts["local_trainable"][1] += 1
                if not same:
                    facts["changed"].append(name)
            elif not same:
                facts["frozen_changed"].append(name)
    facts["counts"] = count_parameters(model, spec)
    facts["optimizer_state_bytes"] = optimizer_state_bytes(optimizer) if optimizer is not None else None
    return facts


def layout_plan(hf_dir, args: LayoutArgs, world: int):
    spec = lora_spec_of(trainable_spec(hf_dir), args)
    parallel = ParallelSizes.from_world_size(world, tp=args.tp, pp=args.pp, cp=args.cp, vpp=args.vpp, sp=args.sp,
                                             ep=args.ep, etp=args.etp)
    return spec, plan_layout(spec, parallel, world, args.vit_pp_layers, args.llm_pp_layers)


def merge_rank_results(results: list[dict], spec: InternVLSpec, plan) -> dict:
    """Full-model tensors from every rank's slices; losses per DP rank (last stage only has them). Under expert
    parallelism an expert's tensors come from the ranks of its EP rank (renumbered to the global expert index,
    which is what `full_state_dict` reads), cut by the expert TP size."""
    from mindspeed_mm.models.internvl.params import expert_index, lookup, with_expert, with_layer
    from mindspeed_mm.models.internvl.sharding import ExpertShard, merge_tensor, shard_tensor

    shards, experts = {}, {}
    ep, etp = plan.parallel.ep, plan.parallel.expert_tp
    for r in results:  # experts are regrouped over the stage's tp*cp*dp ranks: an EP rank may be any CP rank
        held = ExpertShard.of(spec.text.num_experts, ep, r.get("ep_rank", 0))
        for stage, tensors in r["tensors"].items():
            dense = {k: v for k, v in tensors.items() if not lookup(k)[0].per_expert}
            if r["dp_rank"] == 0 and r["cp_rank"] == 0:
                shards[(r["tp_rank"], stage)] = dense
            for k, v in tensors.items():
                if lookup(k)[0].per_expert:
                    d, layer = lookup(k)
                    name = with_layer(with_expert(d.name, held.to_global(expert_index(k))), layer)
                    experts.setdefault((stage, name), {})[r["tp_rank"] % etp] = v
    for (stage, name), by_rank in experts.items():
        full = by_rank[0] if etp == 1 else merge_tensor(name, [by_rank[i] for i in range(etp)], spec)
        for tp_rank in range(plan.parallel.tp):  # each TP rank's cut, which full_state_dict merges back
            shards[(tp_rank, stage)][name] = shard_tensor(name, full, spec, plan.parallel.tp, tp_rank,
                                                          plan.padded_vocab_size)
    losses = {r["dp_rank"]: r["losses"] for r in results if r["losses"] and r["losses"][0]}
    out = {"tensors": full_state_dict(shards, spec, plan), "losses": losses, "moe": results[0].get("moe")}
    if "counts" in results[0]:
        out["ranks"] = results  # the LoRA facts of every rank, as they are
    return out


def save_rank_result(out_dir, result: dict) -> None:
    rank = torch.distributed.get_rank()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def load_rank_results(out_dir) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(Path(out_dir).glob("rank*.pt"))]
