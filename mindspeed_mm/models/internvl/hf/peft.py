"""LoRA adapters as PEFT files for transformers' native InternVL, and back: ``adapter_config.json`` and the
tensors of ``adapter_model.safetensors`` <-> our LoRA specs and adapter matrices (full, unsharded, our names).

PEFT names an adapter by the module it wraps inside ``InternVLForConditionalGeneration``
(``model.language_model.layers.0.self_attn.q_proj``), prefixed ``base_model.model.``, then ``lora_A.weight`` /
``lora_B.weight``; the registry's adapter rows carry the on-disk native names (``language_model.model.
layers.0...``), which `hf.keys` turns into module names. Which linears are adapted is a regex over module names
(a list of suffixes would also catch the ViT's q/k/v when only the LLM's are meant); the ViT's rank and alpha,
when they differ from the LLM's, go in ``rank_pattern`` / ``alpha_pattern``, as PEFT reads them.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Optional

from mindspeed_mm.config.model_spec import LORA_PARTS, InternVLSpec, LoraSpec
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.keys import native_key_to_module, normalize_native_key
from mindspeed_mm.models.internvl.params import LORA_BASE, LORA_LINEARS, LORA_REGISTRY, params, template_regex

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = Any

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_config", "to_peft", "from_peft", "PEFT_PREFIX"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LAYERS = {"vision": r"model\.vision_tower\.encoder\.layer\.\d+\.", "text": r"model\.language_model\.layers\.\d+\."}
_MODULE_PREFIX = {"vision": r"model\.vision_tower\..*", "text": r"model\.language_model\..*"}


def _targets(module: str, lora: LoraSpec) -> str:
    hf = "|".join(re.escape(LORA_LINEARS[module][part][2]) for part in lora.target_modules)
    return f"{_LAYERS[module]}({hf})"


def adapter_config(spec: InternVLSpec, base_model_name_or_path: str) -> dict:
    """PEFT's LoraConfig for `spec`'s adapters, as ``adapter_config.json`` holds it."""
    loras = {m: getattr(spec, m).lora for m in ("text", "vision") if getattr(spec, m).lora is not None}
    if not loras:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(loras.values()))
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
        "target_modules": "|".join(f"({_targets(m, lora)})" for m, lora in loras.items()),
        "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    for m, lora in loras.items():
        if lora.rank != first.rank:
            config["rank_pattern"][_MODULE_PREFIX[m]] = lora.rank
        if lora.alpha != first.alpha:
            config["alpha_pattern"][_MODULE_PREFIX[m]] = lora.alpha
    return config


def to_peft(adapters: Mapping[str, Tensor], spec: InternVLSpec) -> dict[str, Tensor]:
    """Our full adapter matrices (global names) -> ``adapter_model.safetensors``'s keys."""
    out = {}
    for p in params(spec, adapters=True):
        if p.adapter:
            out[PEFT_PREFIX + native_key_to_module(p.native[0])] = adapters[p.name]
    return out


def _native_names() -> list[tuple[re.Pattern, str]]:
    return [(template_regex(d.native[0]), d.name) for d in LORA_REGISTRY]


def _our_name(key: str) -> Optional[str]:
    """A PEFT adapter key (any of the spellings PEFT itself loads) -> our global name, or None."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    key = key.replace(".default.weight", ".weight")
    key = normalize_native_key(key)
    for pattern, ours in _native_names():
        m = pattern.match(key)
        if m:
            return ours.replace("{i}", m.group(1))
    return None


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: the first key of `patterns` matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_complete(module: str, parts: set, adapters: Mapping[str, Tensor], bad) -> None:
    """Every layer of `module` holding an adapter holds lora_A and lora_B of each of `parts` (one LoRA for the
    module, as our spec has it)."""
    base = LORA_BASE[module]
    prefix = base.split("{i}")[0]
    layers = sorted({int(n[len(prefix):].split(".", 1)[0]) for n in adapters if n.startswith(prefix)})
    for i in layers:
        for part in (p for p in LORA_PARTS[module] if p in parts):
            linear, suffix, hf = LORA_LINEARS[module][part]
            for ab in "ab":
                if f"{base.replace('{i}', str(i))}{linear}.lora_{ab}{suffix}" not in adapters:
                    layer = _LAYERS[module].replace(r"\d+", str(i)).replace("\\", "")
                    raise bad(f"no {PEFT_PREFIX}{layer}{hf}.lora_{ab.upper()}.weight: every adapted layer must "
                              f"adapt the same linears ({', '.join(sorted(parts))}), each with lora_A and lora_B")


def from_peft(config: Mapping[str, Any], state: Mapping[str, Tensor], source: str) -> tuple[
        dict[str, Optional[LoraSpec]], dict[str, Tensor]]:
    """A PEFT LoRA adapter for transformers' native InternVL -> ({"vision": LoraSpec | None, "text": ...}, our
    full adapter matrices by global name). Features our LoRA does not have are errors naming `source`."""
    def bad(msg: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{source}: {msg}")

    if config.get("peft_type") != "LORA":
        raise bad(f"peft_type {config.get('peft_type')!r}: only LORA adapters load")
    for key, off in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if config.get(key, off) != off:
            raise bad(f"{key} {config[key]!r} is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise bad("trains biases or whole modules besides the adapters (bias / modules_to_save): not supported")
    for key in ("layers_to_transform", "layers_pattern"):
        if config.get(key) not in (None, [], ""):
            raise bad(f"{key} {config[key]!r} is not supported (our LoRA adapts the same linears in every layer)")
    out: dict[str, Tensor] = {}
    found: dict[str, dict[str, Any]] = {"vision": {}, "text": {}}
    for key, tensor in state.items():
        ours = _our_name(key)
        if ours is None:
            raise bad(f"tensor {key!r} is not a LoRA matrix of a linear our InternVL adapts")
        module = "vision" if ours.startswith("image_encoder.") else "text"
        module_name = native_key_to_module(normalize_native_key(
            key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)).rsplit(".lora_", 1)[0]
        rank = _pattern_value(config.get("rank_pattern"), module_name, config.get("r", 8))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", 8)))
        part = next(p for p, (linear, suffix, hf) in LORA_LINEARS[module].items() if module_name.endswith(hf))
        dim = 0 if ".lora_A" in key else 1
        if tensor.shape[dim] != rank:
            raise bad(f"{key}: shape {tuple(tensor.shape)} does not have rank {rank} (r / rank_pattern)")
        seen = found[module].setdefault("ranks", {})
        seen[(rank, alpha)] = module_name
        found[module].setdefault("parts", set()).add(part)
        out[ours] = tensor
    specs: dict[str, Optional[LoraSpec]] = {}
    for module, f in found.items():
        if not f:
            specs[module] = None
            continue
        _check_complete(module, f["parts"], out, bad)
        if len(f["ranks"]) > 1:
            raise bad(f"{module} linears with different (rank, alpha) {sorted(f['ranks'])}: one per module only")
        (rank, alpha), = f["ranks"]
        specs[module] = LoraSpec(rank, alpha, float(config.get("lora_dropout", 0.0)),
                                 tuple(p for p in LORA_PARTS[module] if p in f["parts"]))
    return specs, out
