"""Tensor names of the two HF InternVL3 formats, one into the other: views of the registry (`params.py`).

* ``original``: OpenGVLab's ``InternVLChatModel`` (``vision_model.*`` with a fused ``attn.qkv``, ``mlp1.{0,1,3}``,
  ``language_model.*``).
* ``native``: transformers' ``InternVLForConditionalGeneration`` (``vision_tower.*`` with ``attention.{q,k,v}_proj``,
  ``multi_modal_projector.*``, ``language_model.*``).

On-disk native names are what transformers (5.x) ``save_pretrained`` writes; the in-memory module names
(``model.vision_tower.…``, ``model.language_model.…``, ``lm_head.weight``) are accepted wherever a native name
is read and normalised to the on-disk ones. Tensors are only split and concatenated, never cast.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

import re

from mindspeed_mm.models.internvl.params import REGISTRY, ParamDef, template_regex

if TYPE_CHECKING:
    import torch

# in-memory (module) name or prefix -> on-disk one, for InternVLForConditionalGeneration
_MODULE_TO_DISK = [
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
]


def _swap(name: str, pairs) -> str:
    for src, dst in pairs:
        if name == src or src.endswith(".") and name.startswith(src):
            return dst + name[len(src):]
    return name


def normalize_native_key(name: str) -> str:
    """An in-memory native name -> the on-disk name transformers writes; on-disk names are returned unchanged."""
    return _swap(name, _MODULE_TO_DISK)


def native_key_to_module(name: str) -> str:
    """On-disk native name -> the parameter name inside ``InternVLForConditionalGeneration``."""
    return _swap(name, [(disk, module) for module, disk in _MODULE_TO_DISK])


@lru_cache(maxsize=None)
def _find(name: str, fmt: str) -> tuple[ParamDef, int, tuple[int, ...]] | None:
    """The registry row naming `name` in format `fmt`, the position of `name` among its HF names, its indices
    (layer, and expert for an expert's tensor)."""
    for d in REGISTRY:
        for k, template in enumerate(d.hf(fmt)):
            m = template_regex(template).match(name)
            if m:
                return d, k, tuple(int(g) for g in m.groups())
    return None


def with_layer(template: str, indices: tuple[int, ...]) -> str:
    """`template` with its `{i}` (and `{e}`) filled from `indices`."""
    for key, value in zip(("{i}", "{e}"), indices):
        template = template.replace(key, str(value))
    return template


# transformers 5 holds a Qwen3-MoE layer's experts in two 3-D tensors (what it writes to disk is one tensor per
# expert and matrix, the names the registry has)
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def split_fused_experts(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory `mlp.experts.gate_up_proj` [E, 2F, h] / `down_proj` [E, h, F] -> per expert `gate_proj`, `up_proj`
    ([F, h] each) and `down_proj` weights; other tensors are passed through."""
    out: dict = {}
    for name, t in sd.items():
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            out[name] = t
            continue
        base, which = m.groups()
        for e in range(t.shape[0]):
            if which == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{base}.{e}.up_proj.weight"] = up.contiguous()
    return out


def _fused(d: ParamDef) -> bool:
    """The original format stores as one tensor what the native one stores as several (the ViT's qkv)."""
    return len(d.original) == 1 < len(d.native)


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `split_fused_experts`: per-expert weights -> transformers 5's in-memory 3-D expert tensors."""
    import torch

    out: dict = {}
    groups: dict = {}
    for name, t in sd.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = t
        else:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for base, parts in groups.items():
        n = len(parts["down_proj"])
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([parts["gate_proj"][e], parts["up_proj"][e]])
                                                   for e in range(n)])
        out[f"{base}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    return out


def original_key_to_native(name: str) -> str | tuple[str, ...]:
    """One original-format name -> its on-disk native name; the fused ViT ``attn.qkv`` -> the tuple of its
    ``(q_proj, k_proj, v_proj)`` names (rows ``[Q; K; V]``). An unknown name raises KeyError naming it."""
    hit = _find(name, "original")
    if hit is None:
        raise KeyError(f"unknown original-format InternVL key: {name!r}")
    d, k, layer = hit
    if _fused(d):
        return tuple(with_layer(t, layer) for t in d.native)
    return with_layer(d.native[k], layer)


def native_key_to_original(name: str) -> str:
    """One native name (on-disk or in-memory) -> its original-format name (q/k/v_proj all -> the fused
    ``attn.qkv``). An unknown name raises KeyError naming it."""
    return _native_to_original(name)[0]


def _native_to_original(name: str) -> tuple[str, ParamDef, int]:
    """`native_key_to_original(name)`, with the registry row and the position of `name` among its HF names."""
    hit = _find(normalize_native_key(name), "native")
    if hit is None:
        raise KeyError(f"unknown native-format InternVL key: {name!r}")
    d, k, layer = hit
    return with_layer(d.original[0 if _fused(d) else k], layer), d, k


def _put(out: dict, key: str, value, source: str) -> None:
    if key in out:
        raise ValueError(f"two source keys map to {key!r} (second one: {source!r})")
    out[key] = value


def original_to_native_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-format state dict -> on-disk native names; splits each fused ``attn.qkv`` into contiguous
    copies. Other tensors are passed through as the same objects."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        target = original_key_to_native(name)
        if isinstance(target, tuple):
            if tensor.dim() == 0 or tensor.shape[0] % len(target):
                raise ValueError(f"{name}: a fused tensor needs a leading dim divisible by {len(target)}, "
                                 f"got shape {tuple(tensor.shape)}")
            for tname, part in zip(target, tensor.chunk(len(target), dim=0)):
                _put(out, tname, part.clone(memory_format=torch.contiguous_format), name)
        else:
            _put(out, target, tensor, name)
    return out


def native_to_original_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native state dict (on-disk or in-memory names) -> original-format names, fusing q/k/v into
    ``attn.qkv``. A fused tensor with a missing part raises KeyError naming the missing key."""
    import torch

    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for name, tensor in split_fused_experts(sd).items():
        target, d, k = _native_to_original(name)
        if not _fused(d):
            _put(out, target, tensor, name)
            continue
        if target in out:
            raise ValueError(f"two source keys map to {target!r} (second one: {name!r})")
        group = pending.setdefault(target, {})
        if k in group:
            raise ValueError(f"two source keys map to part {k} of {target!r} (second one: {name!r})")
        group[k] = (name, tensor)
        if len(group) == len(d.native):
            parts = [group[j][1] for j in range(len(d.native))]
            if len({(p.shape, p.dtype) for p in parts}) != 1:
                raise ValueError(f"the parts of {target!r} differ in shape or dtype: "
                                 f"{[(tuple(p.shape), p.dtype) for p in parts]}")
            out[target] = torch.cat(parts, dim=0)
            del pending[target]
    for target, group in pending.items():
        d, _, layer = _find(target, "original")  # type: ignore[misc]
        missing = [with_layer(t, layer) for j, t in enumerate(d.native) if j not in group]
        raise KeyError(f"cannot fuse {target!r}: missing {missing} (have {next(iter(group.values()))[0]!r})")
    return out
