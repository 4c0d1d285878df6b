"""The preference losses against TRL's DPOTrainer (its own loss code, called on a stand-in model) and against
InternVL's MPO trainer (its formula written out below from internvl_chat/internvl/train/trainer_dpo.py)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mindspeed_mm.errors import UserError
from mindspeed_mm.training.preference_loss import (
    LOSS_TYPES,
    PreferenceConfig,
    RunningMean,
    combined_loss,
    pair_losses,
    pair_metrics,
    rewards,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
DTYPES = [torch.float32, torch.float64]


def _batch(p: int, dtype, seed: int = 0, max_len: int = 12):
    """A preference batch as TRL lays it out ([chosen; rejected] rows, a prompt token first), the policy's
    per-token log-probabilities (0 off the completion, as TRL's model returns them) and the reference's sums."""
    g = torch.Generator().manual_seed(seed)
    s = max_len + 1
    lengths = torch.randint(1, max_len + 1, (2 * p,), generator=g)
    completion = (torch.arange(s).unsqueeze(0) >= 1) & (torch.arange(s).unsqueeze(0) <= lengths.unsqueeze(1))
    completion = completion.long()
    per_token = -3 * torch.rand(2 * p, s - 1, generator=g, dtype=torch.float64).to(dtype) * completion[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * p, generator=g, dtype=torch.float64).to(dtype) * 4
    return SimpleNamespace(completion=completion, per_token=per_token, policy=per_token.sum(1), ref=ref, p=p)


def _ours(b):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, nll_mean)."""
    pc, pr = b.policy.chunk(2)
    rc, rr = b.ref.chunk(2)
    lc, lr = b.completion.sum(1).chunk(2)
    chosen_tokens = b.per_token[: b.p][b.completion[: b.p, 1:].bool()]
    return pc, pr, rc, rr, lc, lr, -chosen_tokens.mean()


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, t):
        return torch.as_tensor(t)

    def gather(self, t):
        return t


class _Model:
    """Returns what TRL's fused LM head returns; only log_probs enters the loss."""
    training = True

    def __init__(self, per_token):
        z = torch.zeros_like(per_token)
        self.out = SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool(),
                                   log_sum_sq_probs=z, aux_loss=None)

    def __call__(self, **kwargs):
        return self.out


def trl_loss(b, loss_types, beta, loss_weights=None, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on the batch (reference log-probabilities precomputed) and its metrics."""
    model = _Model(b.per_token)
    trainer = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None))
    rc, rr = b.ref.chunk(2)
    inputs = {"input_ids": torch.zeros_like(b.completion), "attention_mask": torch.ones_like(b.completion),
              "completion_mask": b.completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _pair(b, i):
    rows = [i, b.p + i]
    return SimpleNamespace(completion=b.completion[rows], per_token=b.per_token[rows], policy=b.policy[rows],
                           ref=b.ref[rows], p=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_is_trls(loss_type, dtype):
    b = _batch(6, dtype, seed=LOSS_TYPES.index(loss_type))
    cfg = PreferenceConfig((loss_type,), beta=0.2, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    pc, pr, rc, rr, lc, lr, _ = _ours(b)
    ours = pair_losses(cfg, pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    assert set(ours) == {loss_type, "weighted"}
    torch.testing.assert_close(ours["weighted"], ours[loss_type], rtol=0, atol=0)
    for i in range(b.p):  # TRL only returns the mean: one pair per call gives the per-pair loss
        theirs, _ = trl_loss(_pair(b, i), [loss_type], 0.2, label_smoothing=cfg.label_smoothing)
        torch.testing.assert_close(ours[loss_type][i], theirs, **TOL[dtype])
    theirs, _ = trl_loss(b, [loss_type], 0.2, label_smoothing=cfg.label_smoothing)
    torch.testing.assert_close(ours[loss_type].mean(), theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mpo_is_trls_weighted_loss_list(dtype):
    """TRL's MPO: loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0]; ours: rpo_alpha 1.0."""
    b = _batch(7, dtype, seed=11)
    pc, pr, rc, rr, _, _, nll = _ours(b)
    theirs, metrics = trl_loss(b, ["sigmoid", "bco_pair", "sft"], 0.1, [0.8, 0.2, 1.0])
    for cfg in (PreferenceConfig.from_flags("sigmoid,bco_pair", "0.8,0.2", 0.1, 0.0, 1.0),
                PreferenceConfig.from_flags("sigmoid,bco_pair,sft", "0.8,0.2,1.0", 0.1, 0.0, None)):
        assert cfg == PreferenceConfig(("sigmoid", "bco_pair"), (0.8, 0.2), 0.1, 0.0, 1.0)
        losses = pair_losses(cfg, pc, pr, rc, rr)  # TRL 1.x has no bco baseline: delta 0
        torch.testing.assert_close(losses["weighted"], 0.8 * losses["sigmoid"] + 0.2 * losses["bco_pair"],
                                   **TOL[dtype])
        torch.testing.assert_close(combined_loss(losses["weighted"].mean(), nll, cfg), theirs, **TOL[dtype])
    ours_metrics = pair_metrics(cfg, pc, pr, rc, rr)
    assert ours_metrics.keys() <= metrics.keys()
    for k, v in ours_metrics.items():
        assert v == pytest.approx(metrics[k], rel=1e-6, abs=1e-6), k
    # without rpo_alpha the NLL is left out, whatever is passed
    cfg = PreferenceConfig.from_flags("sigmoid,bco_pair", "0.8,0.2", 0.1, 0.0, None)
    theirs, _ = trl_loss(b, ["sigmoid", "bco_pair"], 0.1, [0.8, 0.2])
    torch.testing.assert_close(combined_loss(pair_losses(cfg, pc, pr, rc, rr)["weighted"].mean(), nll, cfg),
                               theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rewards_are_trls(dtype):
    b = _batch(5, dtype, seed=3)
    pc, pr, rc, rr, *_ = _ours(b)
    cfg = PreferenceConfig(beta=0.3)
    r = rewards(cfg, pc.requires_grad_(), pr, rc, rr)
    assert not r["chosen"].requires_grad
    for i in range(b.p):
        _, m = trl_loss(_pair(b, i), ["sigmoid"], 0.3)
        assert float(r["chosen"][i]) == pytest.approx(m["rewards/chosen"], rel=1e-6, abs=1e-6)
        assert float(r["rejected"][i]) == pytest.approx(m["rewards/rejected"], rel=1e-6, abs=1e-6)


# ---- InternVL's MPO (internvl_chat/internvl/train/trainer_dpo.py, MultimodalDPOTrainer.get_batch_loss_metrics,
# which calls the dpo_loss of the TRL it was written against, trl/trainer/dpo_trainer.py of TRL 0.8-0.11) ----

def trl_running_moments_update(state: dict, rank_values: list[torch.Tensor]) -> None:
    """TRL's RunningMoments.update (trl/trainer/utils.py up to 0.2x; InternVL imports it from there), written out:
    the batch's moments over all ranks (get_global_statistics: global sum and count, then the global mean's squared
    deviations), cast to float32, merged into (mean, var, count) by the parallel-variance formula."""
    xs = torch.cat([v.reshape(-1) for v in rank_values])
    count = xs.numel()
    batch_mean = xs.sum() / count
    batch_var = ((xs - batch_mean) ** 2).sum() / count
    batch_mean, batch_var = batch_mean.float(), batch_var.float()
    shift = batch_mean - state["mean"]
    total = state["count"] + count
    m2 = state["var"] * state["count"] + shift ** 2 * state["count"] * count / total + batch_var * count
    state["mean"] += (shift * count / total).item()
    state["var"] = (m2 / total).item()
    state["count"] = total


def internvl_mpo_loss(pc, pr, rc, rr, nll, beta, label_smoothing, sigmoid_w, bco_w, rpo_alpha, running: dict):
    """One micro-batch of InternVL's MPO (--loss_type sigmoid,bco_pair, --{type}_loss_weight, --rpo_alpha):
    each type's per-pair losses times its weight, summed; plus rpo_alpha times the chosen answers' cross entropy
    (nn.CrossEntropyLoss over all chosen label tokens: a token mean); then the mean over pairs."""
    # sigmoid: the DPO logits (policy ratio minus reference ratio), conservative with label smoothing
    logits = (pc - pr) - (rc - rr)
    sigmoid = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
               - F.logsigmoid(-beta * logits) * label_smoothing)
    # bco_pair: the running mean is first updated with this micro-batch's mean reward, then used as delta
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    trl_running_moments_update(running, [torch.cat([chosen_r, rejected_r]).mean().detach()])
    delta = running["mean"]
    bco = -F.logsigmoid(chosen_r - delta) - F.logsigmoid(-(rejected_r - delta))
    losses = sigmoid * sigmoid_w + bco * bco_w
    losses = losses + nll * rpo_alpha
    return losses.mean()


def _fresh_moments():
    return {"mean": 0.0, "var": 1.0, "count": 1e-24}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_mpo_is_internvls(dtype, label_smoothing):
    cfg = PreferenceConfig.from_flags("sigmoid,bco_pair", "0.8,0.2", 0.1, label_smoothing, 1.0)
    theirs_running, ours_running = _fresh_moments(), RunningMean()
    previous_delta = 0.0
    for step in range(4):
        b = _batch(4, dtype, seed=100 + step)
        pc, pr, rc, rr, _, _, nll = _ours(b)
        theirs = internvl_mpo_loss(pc, pr, rc, rr, nll, 0.1, label_smoothing, 0.8, 0.2, 1.0, theirs_running)
        # InternVL's delta includes this step; given that delta, the loss is InternVL's
        same_delta = pair_losses(cfg, pc, pr, rc, rr, bco_delta=theirs_running["mean"])
        torch.testing.assert_close(combined_loss(same_delta["weighted"].mean(), nll, cfg), theirs,
                                   **TOL[dtype])
        # ours uses the previous steps' mean: InternVL's delta one step behind
        assert ours_running.mean == pytest.approx(previous_delta, rel=1e-6, abs=1e-7)
        r = rewards(cfg, pc, pr, rc, rr)
        everything = torch.cat([r["chosen"], r["rejected"]]).double()
        ours_running.update_from_moments(float(everything.sum()), float((everything ** 2).sum()),
                                         everything.numel())
        previous_delta = theirs_running["mean"]


def test_label_smoothing_is_conservative_dpo():
    b = _batch(6, torch.float64, seed=5)
    pc, pr, rc, rr, *_ = _ours(b)
    z = 0.1 * ((pc - rc) - (pr - rr))
    got = pair_losses(PreferenceConfig(beta=0.1, label_smoothing=0.2), pc, pr, rc, rr)["sigmoid"]
    torch.testing.assert_close(got, 0.8 * F.softplus(-z) + 0.2 * F.softplus(z), rtol=1e-12, atol=1e-12)
    # label smoothing 0 is TRL 1.x's sigmoid, which no longer smooths
    theirs, _ = trl_loss(b, ["sigmoid"], 0.1, label_smoothing=0.2)
    torch.testing.assert_close(pair_losses(PreferenceConfig(beta=0.1), pc, pr, rc, rr)["sigmoid"].mean(), theirs,
                               rtol=1e-12, atol=1e-12)


def test_bco_delta_shifts_both_rewards():
    b = _batch(4, torch.float64, seed=9)
    pc, pr, rc, rr, *_ = _ours(b)
    cfg = PreferenceConfig(("bco_pair",), beta=0.1)
    delta = 0.37
    got = pair_losses(cfg, pc, pr, rc, rr, bco_delta=delta)["bco_pair"]
    cr, rj = 0.1 * (pc - rc), 0.1 * (pr - rr)
    torch.testing.assert_close(got, F.softplus(-(cr - delta)) + F.softplus(rj - delta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pair_losses(cfg, pc, pr, rc, rr, bco_delta=torch.tensor(delta, dtype=torch.float64))
                               ["bco_pair"], got, rtol=0, atol=0)


def test_running_mean_is_trls_running_moments_across_ranks():
    """Two DP ranks all-reduce (sum, sum of squares, count); merged into RunningMean it is TRL's update over both
    ranks' values, step after step."""
    g = torch.Generator().manual_seed(0)
    theirs, ours = _fresh_moments(), RunningMean()
    assert ours.state_dict() == theirs
    for step in range(5):
        ranks = [torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + step * 0.1 for n in (6, 3)]
        trl_running_moments_update(theirs, ranks)
        total = sum(float(v.sum()) for v in ranks)
        total_sq = sum(float((v * v).sum()) for v in ranks)
        ours.update_from_moments(total, total_sq, sum(v.numel() for v in ranks))
        for k in ("mean", "var", "count"):
            assert getattr(ours, k) == pytest.approx(theirs[k], rel=1e-6, abs=1e-7), (step, k)
    restored = RunningMean()
    restored.load_state_dict(ours.state_dict())
    assert restored == ours
    single = RunningMean()
    single.update(torch.tensor([1.0, 2.0, 4.0]))
    assert (single.mean, single.var, single.count) == pytest.approx((7 / 3, 14 / 9, 3))
    single.update_from_moments(0.0, 0.0, 0)  # an empty batch leaves the state alone
    assert single.count == pytest.approx(3)


def test_ipo_needs_lengths():
    b = _batch(2, torch.float64)
    pc, pr, rc, rr, *_ = _ours(b)
    cfg = PreferenceConfig(("sigmoid", "ipo"))
    assert cfg.needs_lengths and not PreferenceConfig().needs_lengths
    with pytest.raises(ValueError, match="chosen_lengths"):
        pair_losses(cfg, pc, pr, rc, rr)


def test_combined_loss_requires_the_nll_when_rpo_alpha_is_set():
    cfg = PreferenceConfig(rpo_alpha=0.5)
    assert float(combined_loss(torch.tensor(1.0), torch.tensor(2.0), cfg)) == 2.0
    with pytest.raises(ValueError, match="NLL"):
        combined_loss(torch.tensor(1.0), None, cfg)


@pytest.mark.parametrize("args, flag", [
    (("sigmoid,dpo", None, 0.1, 0.0, None), "--loss-type"),
    (("sigmoid,,bco_pair", None, 0.1, 0.0, None), "--loss-type"),
    (("sigmoid,sigmoid", None, 0.1, 0.0, None), "--loss-type"),
    (("sft", None, 0.1, 0.0, None), "--loss-type"),
    (("sigmoid,sft", None, 0.1, 0.0, 1.0), "--loss-type"),
    (("sigmoid,bco_pair", "0.8", 0.1, 0.0, None), "--loss-weight"),
    (("sigmoid,bco_pair", "0.8,0.2,1.0", 0.1, 0.0, None), "--loss-weight"),
    (("sigmoid,bco_pair", "0.8,-0.2", 0.1, 0.0, None), "--loss-weight"),
    (("sigmoid,bco_pair", "0.8,x", 0.1, 0.0, None), "--loss-weight"),
    (("sigmoid,sft", "1.0,-1", 0.1, 0.0, None), "--loss-weight"),
    (("sigmoid", None, 0.0, 0.0, None), "--beta"),
    (("sigmoid", None, 0.1, -0.1, None), "--label-smoothing"),
    (("robust", None, 0.1, 0.5, None), "--label-smoothing"),
    (("sigmoid", None, 0.1, 0.0, -1.0), "--rpo-alpha"),
])
def test_from_flags_errors_name_the_flag(args, flag):
    with pytest.raises(UserError, match=flag):
        PreferenceConfig.from_flags(*args)
    assert issubclass(UserError, ValueError)


def test_from_flags_defaults_and_direct_construction():
    cfg = PreferenceConfig.from_flags(" sigmoid , hinge ", None, 0.2, 0.0, None)
    assert cfg.loss_types == ("sigmoid", "hinge") and cfg.weights == (1.0, 1.0) and cfg.rpo_alpha is None
    assert PreferenceConfig.from_flags("sigmoid,sft", None, 0.1, 0.0, None).rpo_alpha == 1.0
    with pytest.raises(UserError, match="loss_weights"):
        PreferenceConfig(("sigmoid",), (1.0, 2.0))
    assert PreferenceConfig(["sigmoid"], [1]).loss_weights == (1.0,)
