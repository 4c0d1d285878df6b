"""Our LoRA against PEFT's on transformers' InternVLForConditionalGeneration, the same tiny random weights.

PEFT (its LoraConfig with a regex `target_modules`, `rank_pattern`/`alpha_pattern` so that the ViT's rank and
alpha differ from the LLM's) wraps transformers' model; its adapters get random non-zero A and B, and the same
matrices load into our InternVLModel through `hf.peft.from_peft`. In fp32: logits and loss within 1e-5, every
LoRA matrix's gradient within 1e-5 relative (as test_model_vs_transformers.py), the trainable parameters
exactly the adapters (ViT, projector and LLM frozen) and as many as PEFT's; merged (`merge_lora_` on every
LoRA linear of ours, `merge_and_unload` on PEFT's) the logits and weights agree and PEFT's merged weights are
W + (alpha/r) B A; our adapters exported (`adapter_config`, `to_peft`) load into PEFT and give its logits.
Both ViT kinds (InternViT-300M, 6B with 5 heads and qk-norm) and one Qwen3 LLM; LoRA on the ViT, the LLM,
both, and subsets of the linears (a fused qkv or gate/up with only some parts adapted).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

peft = pytest.importorskip("peft")

from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint  # noqa: E402
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config  # noqa: E402
from mindspeed_mm.models.internvl.hf.keys import normalize_native_key  # noqa: E402
from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm  # noqa: E402
from mindspeed_mm.models.internvl.hf.peft import adapter_config, from_peft, to_peft  # noqa: E402
from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict, mean_loss  # noqa: E402
from mindspeed_mm.models.internvl.params import is_adapter  # noqa: E402
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from tests.helpers.batches import make_batch  # noqa: E402
from tests.helpers.oracle import load_native_model  # noqa: E402

TOL = 1e-5
VIT_RANK, VIT_ALPHA, LLM_RANK, LLM_ALPHA = 2, 6.0, 4, 8.0
_VIT_LAYER, _LLM_LAYER = r"model\.vision_tower\.encoder\.layer\.\d+\.", r"model\.language_model\.layers\.\d+\."
VIT_ALL = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer", "mlp.fc1",
           "mlp.fc2")
LLM_ALL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
# case -> (the ViT's adapted HF linears, the LLM's), by transformers' module names
TARGETS = {
    "vit": (VIT_ALL, ()),
    "llm": ((), LLM_ALL),
    "both": (VIT_ALL, LLM_ALL),
    "llm_q_v": ((), ("self_attn.q_proj", "self_attn.v_proj")),
    # one part of each fused linear: the ViT's qkv (k only), the LLM's gate/up (up only); a row-parallel each
    "subset": (("attention.k_proj", "mlp.fc2"), ("self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj")),
}
CASES = [(preset, t) for preset in ("vit300m", "vit6b") for t in TARGETS] + [("qwen3_vit6b", "both")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """preset -> (hf_dir, config, fmt, hf_state), written once per preset."""
    out = {}

    def get(preset):
        if preset not in out:
            hf_dir = write_tiny_checkpoint(tmp_path_factory.mktemp(preset) / "hf", fmt="native", preset=preset,
                                           seed=1)
            out[preset] = (hf_dir, *load_hf_checkpoint(hf_dir))
        return out[preset]
    return get


def _regex(vit: tuple, llm: tuple) -> str:
    alts = [f"{layer}({'|'.join(n.replace('.', r'.') for n in names)})"
            for layer, names in ((_VIT_LAYER, vit), (_LLM_LAYER, llm)) if names]
    return "|".join(f"({a})" for a in alts)


def _lora_config(vit: tuple, llm: tuple):
    vision = r"model\.vision_tower\..*"
    return peft.LoraConfig(r=LLM_RANK, lora_alpha=LLM_ALPHA, lora_dropout=0.0, target_modules=_regex(vit, llm),
                           rank_pattern={vision: VIT_RANK} if vit else {},
                           alpha_pattern={vision: VIT_ALPHA} if vit else {})


def _frozen(spec, loras):
    """`spec` with `loras` and the ViT, projector and LLM frozen: only the adapters train."""
    return dataclasses.replace(
        spec, vision=dataclasses.replace(spec.vision, lora=loras["vision"], freeze=True),
        projector=dataclasses.replace(spec.projector, freeze=True),
        text=dataclasses.replace(spec.text, lora=loras["text"], freeze=True))


@pytest.fixture(scope="module", params=CASES, ids=[f"{p}-{t}" for p, t in CASES])
def pair(request, checkpoints, megatron_world):
    """(peft_model, our_model, spec, case) with the same random adapters."""
    preset, case = request.param
    hf_dir, config, fmt, hf_state = checkpoints(preset)
    pm = peft.get_peft_model(load_native_model(hf_dir), _lora_config(*TARGETS[case]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    loras, adapters = from_peft(pm.peft_config["default"].to_dict(), peft.get_peft_model_state_dict(pm), "peft")
    spec = _frozen(spec_from_hf_config(config), loras)
    torch.manual_seed(0)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, {**hf_to_mm(hf_state, spec, fmt), **adapters})
    ours.eval()
    return pm, ours, spec, (preset, case)


def _batch(spec):
    b = make_batch(spec, [[1], [2, 1]])
    return b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"]


def _max_logit_diff(a, b, mask):
    return (a[mask.bool()] - b[mask.bool()]).abs().max().item()


def test_lora_specs_from_peft(pair):
    _, _, spec, (_, case) = pair
    vit, llm = TARGETS[case]
    for lora, names, rank, alpha in ((spec.vision.lora, vit, VIT_RANK, VIT_ALPHA),
                                     (spec.text.lora, llm, LLM_RANK, LLM_ALPHA)):
        if not names:
            assert lora is None
            continue
        assert (lora.rank, lora.alpha, lora.dropout) == (rank, alpha, 0.0)
        assert set(lora.target_modules) == {n.split(".")[-1] for n in names}


def test_logits_and_loss_match_peft(pair):
    pm, ours, spec, _ = pair
    ids, mask, labels, pixels = _batch(spec)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        logits = ours(ids, pixels)
        loss = mean_loss(ours(ids, pixels, labels=labels), labels)
    diff = _max_logit_diff(logits, ref.logits, mask)
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"
    assert abs(loss.item() - ref.loss.item()) <= TOL, (loss.item(), ref.loss.item())
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert _max_logit_diff(base, ref.logits, mask) > 100 * TOL, "the adapters hardly change the logits"


def test_lora_gradients_match_peft(pair):
    pm, ours, spec, _ = pair
    ids, mask, labels, pixels = _batch(spec)
    pm.zero_grad()
    ours.zero_grad()
    pm(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()
    mean_loss(ours(ids, pixels, labels=labels), labels).backward()
    grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    _, ref = from_peft(pm.peft_config["default"].to_dict(), grads, "PEFT's gradients")
    checked = set()
    for name, p in ours.named_parameters():
        if not is_adapter(name):
            assert p.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        scale = ref[name].abs().max().item()
        assert scale > 0, f"{name}: PEFT's gradient is zero (the test would not see a wrong one)"
        err = (p.grad - ref[name]).abs().max().item()
        assert err <= TOL * max(scale, 1e-3), f"{name}: max |grad diff| {err:.3g} vs max |grad| {scale:.3g}"
        checked.add(name)
    assert checked == set(ref)


def test_trainable_parameters_are_the_adapters(pair):
    pm, ours, spec, _ = pair
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in ours.named_parameters() if is_adapter(n)}
    assert adapters and set(trainable) == adapters
    peft_trainable, _ = pm.get_nb_trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == peft_trainable
    # PEFT's adapters are what `from_peft` maps to ours, one to one
    assert len(peft.get_peft_model_state_dict(pm)) == len(adapters)


def test_exported_adapters_load_into_peft(pair, checkpoints):
    """adapter_config + to_peft of our adapters, loaded by PEFT itself into a fresh transformers model: the
    same adapted modules and PEFT's logits."""
    pm, ours, spec, (preset, _) = pair
    hf_dir = checkpoints(preset)[0]
    ours_adapters = {n: p.detach() for n, p in ours.named_parameters() if is_adapter(n)}
    cfg = adapter_config(spec, str(hf_dir))
    loaded = peft.get_peft_model(load_native_model(hf_dir), peft.LoraConfig(**{
        k: v for k, v in cfg.items() if k not in ("peft_type", "base_model_name_or_path")}))
    exported = to_peft(ours_adapters, spec)
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert {k: tuple(v.shape) for k, v in exported.items()} == want
    result = peft.set_peft_model_state_dict(loaded, exported)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    ids, mask, _, pixels = _batch(spec)
    with torch.no_grad():
        got = loaded.eval()(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ref = pm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert _max_logit_diff(got, ref, mask) <= TOL


def test_merged_matches_peft_merge_and_unload(pair, checkpoints):
    """Last of the module's tests on `pair`: it merges both models in place (ours holds process groups, which
    do not deep-copy)."""
    pm, ours, spec, (preset, _) = pair
    _, _, fmt, hf_state = checkpoints(preset)
    peft_state = {k.replace("base_model.model.", "", 1): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    merged_linears = [m for m in ours.modules() if hasattr(m, "merge_lora_")]
    assert merged_linears
    for m in merged_linears:
        m.merge_lora_()
    assert not any(is_adapter(n) for n, _ in ours.named_parameters())
    hf = pm.merge_and_unload().eval()

    # PEFT's merged weights are W + (alpha / r) B A, our rank and alpha per module
    checked = 0
    hf_merged = {normalize_native_key(n): p.detach() for n, p in hf.named_parameters()}
    for key, a in peft_state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = peft_state[key.replace(".lora_A.", ".lora_B.")]
        vision = module.startswith("model.vision_tower.")
        r, alpha = (VIT_RANK, VIT_ALPHA) if vision else (LLM_RANK, LLM_ALPHA)
        assert a.shape[0] == r, (key, a.shape)
        native = normalize_native_key(module + ".weight")
        want = hf_state[native].double() + alpha / r * b.double() @ a.double()
        err = (hf_merged[native].double() - want).abs().max().item()
        assert err <= TOL, f"{native}: PEFT's merged weight is {err:.3g} from W + (alpha/r) B A"
        checked += 1
    assert checked == len(peft_state) // 2

    # our merged weights are PEFT's, in our layout (fused qkv, gate/up)
    ref = hf_to_mm(hf_merged, spec, fmt)
    for name, p in ours.named_parameters():
        err = (p.detach() - ref[name]).abs().max().item()
        assert err <= TOL, f"{name}: merged weight differs from PEFT's by {err:.3g}"

    ids, mask, _, pixels = _batch(spec)
    with torch.no_grad():
        diff = _max_logit_diff(ours(ids, pixels), hf(input_ids=ids, attention_mask=mask,
                                                     pixel_values=pixels).logits, mask)
    assert diff <= TOL, f"max |merged logits diff| {diff:.3g}"
