"""Preference optimization in the finetune loop: DPO and InternVL3's MPO (`--training-mode dpo|mpo`).

A micro-batch holds P pairs as 2P rows, the chosen answers first (`data.preference`). The last stage turns the
model's masked per-token loss into each row's sequence log-probability (the sum over its answer tokens: a CP
rank holds part of every row, so the parts are summed over CP, each rank keeping the gradient of its own
tokens), and the loss function combines the policy's with the reference's (`preference_loss`).

Every step first runs the reference over the step's micro-batches, forward only, through the same schedule
and layout (`Reference`), and hands its log-probabilities to the training pass:

- ``copy``: a frozen copy of the starting weights at the run's layout (its own chunks, never in the optimizer;
  its fingerprint is checked again at the end of the run);
- ``adapters_off``: with LoRA, the policy itself with every adapter switched off (no copy at all);
- ``precomputed``: the log-probabilities of every pair, computed by the starting weights in a first pass over
  the dataset before step 1 and stored in a JSON file (no copy, no per-step pass).

The step's loss is normalised by the global batch: the preference terms by its pairs, the generation term by
its chosen-answer tokens (counted before the step over every micro-batch and DP rank), so it does not depend
on how the batch is cut into micro-batches, DP ranks or CP shares. bco_pair's reward baseline is the running
mean over the previous steps' rewards (`RunningMean`), updated after each step from every DP rank's sums and
saved in checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.internvl.model import shift_labels
from mindspeed_mm.training.loss import REPORT_KEY, LossMode, cp_sum
from mindspeed_mm.training.preference_loss import (
    PreferenceConfig,
    RunningMean,
    combined_loss,
    pair_losses,
    rewards,
)

__all__ = ["MODE_DEFAULTS", "PreferenceState", "Reference", "preference_config", "preference_step"]

logger = logging.getLogger(__name__)
PREF_KEY = "preference"
# InternVL's DPO and InternVL3's MPO recipe (loss types, their weights, the generation term's weight)
MODE_DEFAULTS = {"dpo": ("sigmoid", None, None), "mpo": ("sigmoid,bco_pair", "0.8,0.2", 1.0)}
# The per-micro-batch sums every step reports (last stage), in this order.
SUMS = ("pairs", "rewards_chosen", "rewards_rejected", "accuracies", "margins", "logps_chosen", "logps_rejected",
        "reward_sum", "reward_sq_sum", "nll", "chosen_tokens")


class PreferenceError(UserError):
    """A preference-training setting that cannot run (named flag or file)."""


def preference_config(args) -> PreferenceConfig:
    loss_type, loss_weight, rpo = MODE_DEFAULTS[args.training_mode]
    try:
        return PreferenceConfig.from_flags(args.loss_type or loss_type,
                                           args.loss_weight if args.loss_type else (args.loss_weight or loss_weight),
                                           args.beta, args.label_smoothing,
                                           args.rpo_alpha if args.rpo_alpha is not None else rpo)
    except ValueError as e:  # a UserError (the flags' own error) passes as it is
        if isinstance(e, UserError):
            raise
        raise PreferenceError(str(e)) from None


# ------------------------------------------------------------------------------------------------ per row

def _cp_total(local: Tensor) -> Tensor:
    """The sum over CP ranks, with the gradient of this rank's own part only."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return local
    total = local.detach().clone()
    torch.distributed.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return local + (total - local.detach())


def sequence_logps(per_token_loss: Tensor) -> Tensor:
    """[rows]: each row's sum of target-token log-probabilities (the loss is -log p, 0 off target)."""
    return _cp_total(-per_token_loss.float().sum(1))


def _reference_forward_step(mode: LossMode, data_iterator, model, all_gather: bool = False):
    from mindspeed_mm.training.pipeline import next_batch, run_chunk

    batch = next_batch(data_iterator, model)

    def report(per_token_loss: Tensor):
        return per_token_loss.sum() * 0.0, {"ref_logps": sequence_logps(per_token_loss).detach()}

    return run_chunk(model, batch), report


def preference_loss(cfg: PreferenceConfig, norm: dict, ref_logps: Tensor, labels: Tensor, per_token_loss: Tensor,
                    bco_delta: float = 0.0):
    """The micro-batch's share of the step's loss (megatron averages it over micro-batches and DP, and scales
    it by CP: see training/loss.py) and its sums for logging. `norm`: the step's pairs and chosen-answer
    tokens over every micro-batch and DP rank, and `scale` = micro-batches x DP."""
    pairs = labels.shape[0] // 2
    logps = sequence_logps(per_token_loss)
    pc, pr = logps[:pairs], logps[pairs:]
    rc, rr = ref_logps[:pairs].to(logps), ref_logps[pairs:].to(logps)
    lengths = shift_labels(labels).loss_mask.sum(1)
    terms = pair_losses(cfg, pc, pr, rc, rr, bco_delta=bco_delta, chosen_lengths=lengths[:pairs],
                        rejected_lengths=lengths[pairs:])
    weighted = terms["weighted"].sum() / norm["pairs"]
    nll_sum = per_token_loss[:pairs].float().sum()  # this CP rank's share
    nll_local = nll_sum / max(norm["chosen_tokens"], 1)
    loss = combined_loss(weighted, nll_local if cfg.rpo_alpha is not None else None, cfg)
    r = rewards(cfg, pc.detach(), pr.detach(), rc, rr)
    both = torch.cat([r["chosen"], r["rejected"]])
    nll_total = cp_sum(nll_sum.detach().clone())
    tokens = lengths[:pairs].sum().float()
    step_loss = weighted.detach() + (cfg.rpo_alpha or 0.0) * nll_total / max(norm["chosen_tokens"], 1)
    sums = torch.stack([
        torch.tensor(float(pairs), device=logps.device), r["chosen"].sum(), r["rejected"].sum(),
        (r["chosen"] > r["rejected"]).float().sum(), (r["chosen"] - r["rejected"]).sum(), pc.detach().sum(),
        pr.detach().sum(), both.sum(), (both * both).sum(), nll_total, tokens]).double()
    per_type = torch.stack([terms[t].detach().sum() for t in cfg.loss_types]).double()
    reported = {REPORT_KEY: torch.stack([step_loss, torch.ones_like(step_loss) / norm["scale"]]),
                PREF_KEY: torch.cat([sums, per_type])}
    return loss * norm["scale"], reported


def _policy_forward_step(cfg: PreferenceConfig, norm: dict, bco_delta: float, mode: LossMode, data_iterator, model,
                         all_gather: bool = False):
    from mindspeed_mm.training.pipeline import next_batch, run_chunk, with_moe_report

    batch = next_batch(data_iterator, model)
    out = run_chunk(model, batch)
    return out, with_moe_report(model, partial(preference_loss, cfg, norm, batch.get("ref_logps"), batch["labels"],
                                               bco_delta=bco_delta))


# ------------------------------------------------------------------------------------------------ reference

@contextlib.contextmanager
def _adapters_off(chunks):
    from mindspeed_mm.models.lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    mods = [m for c in chunks for m in c.modules() if isinstance(m, (LoRAColumnParallelLinear, LoRARowParallelLinear))]
    for m in mods:
        m.lora_disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.lora_disabled = False


def _forward_only(model: list, microbatches: list[dict]) -> list[Tensor]:
    """The reference log-probabilities [2P] of each micro-batch on the last stage ([] elsewhere), forward only
    in eval mode (validation's pass)."""
    from mindspeed_mm.training.pipeline import evaluate

    return [r["ref_logps"] for r in evaluate(model, [microbatches], step=_reference_forward_step,
                                             full_reports=True)]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(chunks) -> list[int]:
    """Per tensor, the sums of its elements' bit patterns and of their squares (int64, wrapping): any flipped
    bit changes the first, so equal fingerprints mean bit-identical weights in practice."""
    out = []
    for chunk in chunks:
        for _, p in sorted(chunk.state_dict().items()):
            if torch.is_tensor(p) and p.is_floating_point():
                bits = p.detach().contiguous().view(_BITS[p.element_size()]).long()
                out += [int(bits.sum()), int((bits * bits).sum())]
    return out


class Reference:
    """Where each step's reference log-probabilities come from (see the module doc)."""

    def __init__(self, kind: str, policy: list, ref_chunks: Optional[list] = None,
                 table: Optional[dict[int, tuple[float, float]]] = None):
        self.kind, self.policy, self.ref_chunks, self.table = kind, policy, ref_chunks, table
        self._fingerprint = _fingerprint(ref_chunks) if ref_chunks else None

    def attach(self, microbatches: list[dict]) -> None:
        """Put `ref_logps` [2P] into each micro-batch (on the last stage, where the loss is computed)."""
        if self.kind == "precomputed":
            for mb in microbatches:
                rec = [int(r) for r in mb["records"]]
                try:
                    pairs = [self.table[r] for r in rec]
                except KeyError as e:
                    raise PreferenceError(f"--reference-logps has no log-probabilities for record {e.args[0]}: "
                                          "it was computed for another dataset; delete it to recompute") from None
                mb["ref_logps"] = torch.tensor([c for c, _ in pairs] + [r for _, r in pairs], dtype=torch.float64)
            return
        if self.kind == "copy":
            logps = _forward_only(self.ref_chunks, microbatches)
        else:
            with _adapters_off(self.policy):
                logps = _forward_only(self.policy, microbatches)
        for mb, lp in zip(microbatches, logps):
            mb["ref_logps"] = lp

    def check_unchanged(self) -> None:
        if self.ref_chunks and _fingerprint(self.ref_chunks) != self._fingerprint:
            raise AssertionError("the reference model's weights changed during training")


def build_reference(kind: str, model: list, chunks: list, spec, plan, args, loaded_state: Optional[dict],
                    build_chunks: Callable[[], list], precompute: Callable[[], dict]) -> tuple[Reference, dict]:
    """The run's reference and what checkpoints record of it."""
    info: dict[str, Any] = {"kind": kind}
    if kind == "adapters_off":
        if not (spec.vision.lora or spec.text.lora):
            raise PreferenceError("--reference-model adapters_off needs LoRA (--use-llm-lora or the model JSON's "
                                  "lora): without adapters the policy is its own reference")
        return Reference(kind, model), info
    if kind == "copy":
        from mindspeed_mm.runtime.chunks import load_converted_weights

        ref = build_chunks()
        if loaded_state and loaded_state.get("reference", {}).get("dir"):
            ref_dir = loaded_state["reference"]["dir"]
            load_converted_weights(ref, ref_dir)  # a resumed run: the weights it started from
        else:
            for r, c in zip(ref, chunks):
                r.load_state_dict(c.state_dict())
            ref_dir = str(Path(args.load).absolute())
        for r in ref:
            r.requires_grad_(False)
            r.eval()
        info["dir"] = ref_dir
        return Reference(kind, model, ref_chunks=ref), info
    path = Path(args.reference_logps or Path(args.save or args.load) / "reference_logps.json")
    info["file"] = str(path.absolute())
    if not path.is_file():
        if loaded_state is not None:
            raise PreferenceError(f"--reference-logps {path}: not found, and the run resumes from a save whose "
                                  "weights are no longer the reference's")
        table = precompute()
        if torch.distributed.get_rank() == 0:
            from mindspeed_mm.checkpoint.atomic import replace_file

            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, json.dumps({"logps": {str(k): list(v) for k, v in sorted(table.items())}}))
        torch.distributed.barrier()
    raw = json.loads(path.read_text())
    try:
        table = {int(k): (float(v[0]), float(v[1])) for k, v in raw["logps"].items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise PreferenceError(f"--reference-logps {path}: not a reference log-probability file") from None
    return Reference(kind, model, table=table), info


def precompute_reference(model: list, loader, num_micro: int, micro_batch_size: int) -> dict[int, tuple[float, float]]:
    """Every pair's reference log-probabilities with the current (starting) weights, on every rank: the
    loader's micro-batches (this DP rank's share of the dataset, in order), num_micro at a time."""
    import itertools

    table: dict[int, tuple[float, float]] = {}
    # the sampler runs on past the epoch: take this rank's share of one pass (wrapping rows are harmless)
    dp = parallel_state.get_data_parallel_world_size()
    count = -(-len(loader.dataset) // (micro_batch_size * dp))
    batches = list(itertools.islice(iter(loader), count))
    for start in range(0, len(batches), num_micro):
        group = batches[start:start + num_micro]
        while len(group) < num_micro:  # the schedule runs the same number of micro-batches on every DP rank
            group.append(group[-1])
        for mb, lp in zip(group, _forward_only(model, group)):
            p = int(mb["num_pairs"])
            for k, rec in enumerate(mb["records"].tolist()):
                table[int(rec)] = (float(lp[k]), float(lp[p + k]))
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, table)  # the last stages hold them; the rest add nothing
    out: dict[int, tuple[float, float]] = {}
    for t in gathered:
        out.update(t or {})
    return out


# ------------------------------------------------------------------------------------------------ a step

@dataclasses.dataclass
class PreferenceState:
    cfg: PreferenceConfig
    reference: Reference
    running: RunningMean = dataclasses.field(default_factory=RunningMean)
    info: dict = dataclasses.field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict(), "reference": self.info}

    def load_state_dict(self, d: Optional[dict]) -> None:
        if d and d.get("running"):
            self.running.load_state_dict(d["running"])


def _dp_sum(t: Tensor) -> Tensor:
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t


def preference_step(model: list, optimizer, microbatches: list[dict], state: PreferenceState,
                    gbs_pairs: int) -> tuple[list[Tensor], Optional[float], dict[str, float]]:
    """One optimizer step of preference training: (loss reports, grad norm, metrics on every rank)."""
    from mindspeed_mm.training.pipeline import train_step

    state.reference.attach(microbatches)
    chosen = torch.tensor([float(shift_labels(mb["labels"][: int(mb["num_pairs"])]).loss_mask.sum())
                           for mb in microbatches], dtype=torch.float64).sum().reshape(1)
    chosen = _dp_sum(chosen.to(next(model[0].parameters()).device))
    dp = parallel_state.get_data_parallel_world_size()
    norm = {"pairs": float(gbs_pairs), "chosen_tokens": float(chosen.item()), "scale": float(len(microbatches) * dp)}
    delta = state.running.mean if "bco_pair" in state.cfg.loss_types else 0.0
    out, grad_norm = train_step(model, optimizer, microbatches, loss_mode=LossMode.DEFAULT, full_reports=True,
                                step=partial(_policy_forward_step, state.cfg, norm, delta))
    reports = [r[REPORT_KEY] for r in out]
    width = len(SUMS) + len(state.cfg.loss_types)
    device = next(model[0].parameters()).device
    sums = torch.stack([r[PREF_KEY] for r in out]).sum(0) if out else torch.zeros(width, dtype=torch.float64)
    sums = _dp_sum(sums.to(device))
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:  # every stage gets the last stage's sums: the running mean is part of every rank's checkpoint
        torch.distributed.broadcast(sums, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    values = dict(zip(SUMS + tuple(state.cfg.loss_types), sums.tolist()))
    n = max(values["pairs"], 1.0)
    state.running.update_from_moments(values["reward_sum"], values["reward_sq_sum"], int(2 * values["pairs"]))
    metrics = {f"loss/{t}": values[t] / n for t in state.cfg.loss_types}
    if state.cfg.rpo_alpha is not None:
        metrics["loss/sft"] = values["nll"] / max(values["chosen_tokens"], 1.0)
    metrics.update({"rewards/chosen": values["rewards_chosen"] / n, "rewards/rejected": values["rewards_rejected"] / n,
                    "rewards/accuracies": values["accuracies"] / n, "rewards/margins": values["margins"] / n,
                    "logps/chosen": values["logps_chosen"] / n, "logps/rejected": values["logps_rejected"] / n,
                    "bco_reward_mean": state.running.mean})
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"preference metrics are not finite: {metrics}")
    return reports, grad_norm, metrics


def check_pairs(microbatches: Sequence[dict]) -> None:
    for mb in microbatches:
        if "num_pairs" not in mb:
            raise PreferenceError("--training-mode dpo/mpo needs preference pairs: records with 'chosen' and "
                                  "'rejected' (docs/training.md#preference-data)")
