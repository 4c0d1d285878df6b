"""Preference losses (DPO and its variants; InternVL's MPO) as pure functions of sequence log-probabilities.

Inputs are per-pair tensors ``[P]``: the summed log-probability of each chosen and rejected answer under the
policy and under the frozen reference. Every loss type means what TRL's ``DPOTrainer`` means by it; where TRL's
releases disagree with each other, the choice follows InternVL's MPO trainer (built on TRL's older API), and
the difference is written at the function.

MPO (InternVL's ``--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2
--rpo_alpha 1``; TRL's ``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]``) is

    loss = mean over pairs of sum_i w_i * loss_i(pair)  +  rpo_alpha * NLL of the chosen answers

with the NLL a mean over all chosen answer tokens of the batch (InternVL's and TRL's token mean, not a mean of
per-answer means). `pair_losses` gives the per-pair terms, `combined_loss` the sum; the integration computes the
NLL from its per-token losses.

bco_pair subtracts a reward baseline ``delta`` from both rewards. TRL's older trainers and InternVL fold the
current batch's mean reward into the running mean before using it; here the caller passes ``bco_delta``, the
running mean of the *previous* steps (`RunningMean`), so a step's loss does not depend on how its batch is cut
into micro-batches and DP shares. Both baselines are the same cumulative mean of all rewards seen, shifted by one
step; on the first step they agree (policy == reference: every reward is 0). TRL 1.x dropped the baseline
(delta = 0 always).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mindspeed_mm.config.model_flags import ArgumentError

__all__ = ["LOSS_TYPES", "PreferenceConfig", "RunningMean", "combined_loss", "pair_losses", "pair_metrics",
           "rewards"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "bco_pair", "robust", "nca_pair", "sppo_hard", "apo_zero", "apo_down")
# TRL divides these by each answer's token count, so they need the lengths as well as the sums
LENGTH_NORMALISED = frozenset({"ipo"})
# TRL's name for the generation term; from_flags folds it into rpo_alpha so TRL's MPO spelling works as written
SFT = "sft"

FLAG_LOSS_TYPE = "--loss-type"
FLAG_LOSS_WEIGHT = "--loss-weight"
FLAG_BETA = "--beta"
FLAG_LABEL_SMOOTHING = "--label-smoothing"
FLAG_RPO_ALPHA = "--rpo-alpha"


def _check(loss_types, loss_weights, beta, label_smoothing, rpo_alpha, names: dict[str, str]) -> None:
    """Raises ArgumentError naming the field or flag (``names``: field -> the name to print)."""
    if not loss_types:
        raise ArgumentError(f"{names['loss_types']}: at least one loss type is required")
    for t in loss_types:
        if t not in LOSS_TYPES:
            raise ArgumentError(f"{names['loss_types']}: unknown loss type {t!r}; expected some of "
                                f"{', '.join(LOSS_TYPES)}")
    if len(set(loss_types)) != len(loss_types):
        raise ArgumentError(f"{names['loss_types']}: {','.join(loss_types)} names a loss type twice")
    if loss_weights is not None:
        if len(loss_weights) != len(loss_types):
            raise ArgumentError(f"{names['loss_weights']}: {len(loss_weights)} weights for {len(loss_types)} loss "
                                f"types ({','.join(loss_types)})")
        for w in loss_weights:
            if not math.isfinite(w) or w < 0:
                raise ArgumentError(f"{names['loss_weights']}: weight {w} must be finite and non-negative")
    if not (math.isfinite(beta) and beta > 0):
        raise ArgumentError(f"{names['beta']}: {beta} must be positive")
    # 0.5 makes the conservative loss indifferent to the label; robust divides by 1 - 2 * label_smoothing
    upper_open = "robust" in loss_types
    if not (0.0 <= label_smoothing < 0.5 or (label_smoothing == 0.5 and not upper_open)):
        raise ArgumentError(f"{names['label_smoothing']}: {label_smoothing} must lie in [0, 0.5"
                            f"{')' if upper_open else ']'}")
    if rpo_alpha is not None and not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ArgumentError(f"{names['rpo_alpha']}: {rpo_alpha} must be finite and non-negative")


_FIELDS = {k: k for k in ("loss_types", "loss_weights", "beta", "label_smoothing", "rpo_alpha")}
_FLAGS = {"loss_types": FLAG_LOSS_TYPE, "loss_weights": FLAG_LOSS_WEIGHT, "beta": FLAG_BETA,
          "label_smoothing": FLAG_LABEL_SMOOTHING, "rpo_alpha": FLAG_RPO_ALPHA}


@dataclass(frozen=True)
class PreferenceConfig:
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # None: 1.0 each
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid: conservative DPO; robust: the flip probability
    rpo_alpha: float | None = None  # weight of the NLL of the chosen answers; None: no generation term

    def __post_init__(self):
        object.__setattr__(self, "loss_types", tuple(self.loss_types))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        _check(self.loss_types, self.loss_weights, self.beta, self.label_smoothing, self.rpo_alpha, _FIELDS)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        """Whether `pair_losses` needs each answer's token count (ipo)."""
        return bool(LENGTH_NORMALISED.intersection(self.loss_types))

    @classmethod
    def from_flags(cls, loss_type: str, loss_weight: str | None, beta: float, label_smoothing: float,
                   rpo_alpha: float | None) -> PreferenceConfig:
        """``loss_type`` "sigmoid,bco_pair", ``loss_weight`` "0.8,0.2" (None: 1.0 each). TRL's spelling of MPO,
        "sigmoid,bco_pair,sft" with "0.8,0.2,1.0", is accepted too: the sft weight becomes rpo_alpha."""
        types = [t.strip() for t in (loss_type or "").split(",")]
        if any(not t for t in types):
            raise ArgumentError(f"{FLAG_LOSS_TYPE}: {loss_type!r} is not a comma-separated list of loss types")
        weights = None
        if loss_weight is not None:
            try:
                weights = [float(w) for w in loss_weight.split(",")]
            except ValueError:
                raise ArgumentError(f"{FLAG_LOSS_WEIGHT}: {loss_weight!r} is not a comma-separated list of "
                                    "numbers") from None
            if len(weights) != len(types):
                raise ArgumentError(f"{FLAG_LOSS_WEIGHT}: {len(weights)} weights for {len(types)} loss types "
                                    f"({FLAG_LOSS_TYPE} {loss_type})")
        if SFT in types:
            if rpo_alpha is not None:
                raise ArgumentError(f"{FLAG_LOSS_TYPE}: {SFT} and {FLAG_RPO_ALPHA} both set the generation term's "
                                    "weight; give one")
            if types.count(SFT) > 1:
                raise ArgumentError(f"{FLAG_LOSS_TYPE}: {loss_type} names {SFT} twice")
            i = types.index(SFT)
            rpo_alpha = weights[i] if weights is not None else 1.0
            if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
                raise ArgumentError(f"{FLAG_LOSS_WEIGHT}: weight {rpo_alpha} must be finite and non-negative")
            del types[i]
            if weights is not None:
                del weights[i]
            if not types:
                raise ArgumentError(f"{FLAG_LOSS_TYPE}: {SFT} alone is supervised fine-tuning, not preference "
                                    "optimization")
        _check(types, weights, beta, label_smoothing, rpo_alpha, _FLAGS)
        return cls(tuple(types), None if weights is None else tuple(weights), float(beta), float(label_smoothing),
                   None if rpo_alpha is None else float(rpo_alpha))


@dataclass
class RunningMean:
    """bco_pair's reward baseline: the running mean (and variance, count) of every value fed so far, as TRL's
    ``RunningMoments`` keeps it, merged from a batch's sums so DP ranks can all-reduce (sum, sum of squares,
    count) first and all hold the same state.

    TRL and InternVL feed one value per micro-batch (its mean reward over chosen and rejected answers); feeding
    every reward instead, ``(sum r, sum r^2, 2P)``, gives the same mean when micro-batches hold equal numbers of
    pairs, and the same mean for any cut of a step into micro-batches. Only the mean enters the loss.
    """
    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24  # TRL's: the first merge then takes the batch's moments as they are

    def update_from_moments(self, total: float, total_sq: float, n: int) -> None:
        if n <= 0:
            return
        total, total_sq, n = float(total), float(total_sq), float(n)
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean * batch_mean, 0.0)  # population variance, as TRL's
        shift = batch_mean - self.mean
        merged = self.count + n
        m2 = self.var * self.count + batch_var * n + shift * shift * self.count * n / merged
        self.mean += shift * n / merged
        self.var = m2 / merged
        self.count = merged

    def update(self, values: Tensor) -> None:
        """One rank's values, no reduction."""
        v = values.detach().double()
        self.update_from_moments(float(v.sum()), float((v * v).sum()), v.numel())

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), float(d["count"])


def _per_token(logratio: Tensor, lengths: Tensor | None) -> Tensor:
    return logratio / lengths.to(logratio.dtype).clamp(min=1.0)


def pair_losses(cfg: PreferenceConfig, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                ref_rejected: Tensor, bco_delta: float | Tensor = 0.0, chosen_lengths: Tensor | None = None,
                rejected_lengths: Tensor | None = None) -> dict[str, Tensor]:
    """Per-pair ``[P]`` losses keyed by type, and ``"weighted"``: sum_i w_i * loss_i (no generation term).

    ``bco_delta``: bco_pair's baseline, the running mean reward of the previous steps (see the module's
    docstring). ``chosen_lengths`` / ``rejected_lengths`` ``[P]``: each answer's token count, needed by ipo only.
    """
    if cfg.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss types {sorted(LENGTH_NORMALISED.intersection(cfg.loss_types))} need "
                         "chosen_lengths and rejected_lengths")
    beta, ls = cfg.beta, cfg.label_smoothing
    chosen_lr = policy_chosen - ref_chosen
    rejected_lr = policy_rejected - ref_rejected
    z = beta * (chosen_lr - rejected_lr)
    out: dict[str, Tensor] = {}
    for t in cfg.loss_types:
        if t == "sigmoid":
            # TRL 1.x ignores label_smoothing here; InternVL (TRL <= 0.2x) smooths: conservative DPO
            loss = -F.logsigmoid(z) if ls == 0 else -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        elif t == "hinge":
            loss = torch.relu(1 - z)
        elif t == "ipo":
            # TRL 1.x normalises the log-ratios; older TRL and InternVL the log-probabilities (their rewards too):
            # the same loss
            gap = _per_token(chosen_lr, chosen_lengths) - _per_token(rejected_lr, rejected_lengths)
            loss = (gap - 1 / (2 * beta)) ** 2
        elif t == "bco_pair":
            loss = -F.logsigmoid(beta * chosen_lr - bco_delta) - F.logsigmoid(-(beta * rejected_lr - bco_delta))
        elif t == "robust":
            loss = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
        elif t == "nca_pair":
            rc, rr = beta * chosen_lr, beta * rejected_lr
            loss = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
        elif t == "sppo_hard":
            loss = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
        elif t == "apo_zero":
            loss = (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
        elif t == "apo_down":
            loss = torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(z))
        else:  # PreferenceConfig admits only LOSS_TYPES
            raise AssertionError(t)
        out[t] = loss
    weighted = None
    for t, w in zip(cfg.loss_types, cfg.weights):
        weighted = out[t] * w if weighted is None else weighted + out[t] * w
    out["weighted"] = weighted
    return out


def rewards(cfg: PreferenceConfig, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
            ref_rejected: Tensor) -> dict[str, Tensor]:
    """Per-pair implicit rewards beta * (policy - reference), detached, as TRL 1.x logs them (InternVL and TRL
    0.2x log the loss-weighted sum over types instead: the same when the weights sum to 1)."""
    return {"chosen": (cfg.beta * (policy_chosen - ref_chosen)).detach(),
            "rejected": (cfg.beta * (policy_rejected - ref_rejected)).detach()}


def pair_metrics(cfg: PreferenceConfig, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                 ref_rejected: Tensor) -> dict[str, float]:
    """TRL's logged names, means over the pairs given."""
    r = rewards(cfg, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return {
        "rewards/chosen": float(r["chosen"].mean()),
        "rewards/rejected": float(r["rejected"].mean()),
        "rewards/accuracies": float((r["chosen"] > r["rejected"]).float().mean()),
        "rewards/margins": float((r["chosen"] - r["rejected"]).mean()),
        "logps/chosen": float(policy_chosen.detach().mean()),
        "logps/rejected": float(policy_rejected.detach().mean()),
    }


def combined_loss(weighted_mean: Tensor, nll_mean: Tensor | None, cfg: PreferenceConfig) -> Tensor:
    """The batch's loss: ``weighted_mean`` (mean over pairs of `pair_losses`' "weighted") plus rpo_alpha times
    ``nll_mean``, the chosen answers' NLL averaged over all their tokens (ignored when rpo_alpha is None)."""
    if cfg.rpo_alpha is None:
        return weighted_mean
    if nll_mean is None:
        raise ValueError("rpo_alpha is set: the chosen answers' NLL is required")
    return weighted_mean + cfg.rpo_alpha * nll_mean
