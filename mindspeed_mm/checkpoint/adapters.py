"""Adapter directories read without torch: a PEFT LoRA adapter for transformers' native InternVL
(``adapter_config.json`` + ``adapter_model.safetensors``), or an adapter save of ours (a training save whose
`mm_convert_meta.json` references its frozen base). Which LoRA each module has, and the PEFT one's matrices."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from mindspeed_mm.config.model_spec import InternVLSpec, LoraSpec
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, from_peft

__all__ = ["is_peft_dir", "read_peft_adapter", "adapter_loras", "with_loras", "check_same_loras"]

MODULES = {"vision": "image_encoder.vision_encoder.lora", "text": "text_decoder.lora"}


def is_peft_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclasses.dataclass(frozen=True)
class _Shape:
    shape: tuple


def read_peft_adapter(path, load: bool = True) -> tuple[dict, dict[str, Optional[LoraSpec]], dict]:
    """(adapter_config.json, the LoRA per module, the full matrices by our names: torch tensors, or with `load`
    false only their shapes, read off the header) of a PEFT adapter dir."""
    from mindspeed_mm.checkpoint.hf_files import read_safetensors, read_safetensors_header

    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path / ADAPTER_CONFIG}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{path / ADAPTER_CONFIG}: expected a JSON object")
    if not weights.is_file():
        raise CheckpointFormatError(f"{path}: {ADAPTER_WEIGHTS} is missing (adapter_model.bin is not read: it "
                                    f"would run pickled code)")
    if load:
        state = read_safetensors(weights)
    else:
        header, _ = read_safetensors_header(weights)
        state = {k: _Shape(tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    loras, tensors = from_peft(config, state, str(path))
    return config, loras, tensors


def adapter_loras(path) -> dict[str, Optional[LoraSpec]]:
    """The LoRA per module of a PEFT adapter dir or of an adapter save of ours."""
    if is_peft_dir(path):
        return read_peft_adapter(path, load=False)[1]
    from mindspeed_mm.checkpoint.mm_format import checkpoint_meta, has_meta

    if not Path(path).is_dir() or not has_meta(Path(path)):
        raise CheckpointFormatError(f"--load-adapter {path}: neither a PEFT adapter ({ADAPTER_CONFIG}) nor a save "
                                    f"of this loop")
    meta = checkpoint_meta(Path(path))
    if meta.base is None:
        raise CheckpointFormatError(f"--load-adapter {path}: a full checkpoint, not an adapter save (use --load)")
    spec = meta.spec()
    return {"vision": spec.vision.lora, "text": spec.text.lora}


def check_same_loras(run: InternVLSpec, loras: dict[str, Optional[LoraSpec]], where: str) -> None:
    """The adapters at `where` fit the run's LoRA: the same rank, alpha and targets per module."""
    for module, key in MODULES.items():
        mine, theirs = getattr(run, module).lora, loras[module]
        if (mine and (mine.rank, mine.alpha, mine.target_modules)) != (
                theirs and (theirs.rank, theirs.alpha, theirs.target_modules)):
            def text(lora):
                return "no LoRA" if lora is None else (f"rank {lora.rank}, alpha {lora.alpha:g} on "
                                                       f"{', '.join(lora.target_modules)}")
            raise CheckpointFormatError(f"{where}: {key} is {text(theirs)} there, {text(mine)} in this run")


def with_loras(spec: InternVLSpec, loras: dict[str, Optional[LoraSpec]], where: str) -> InternVLSpec:
    """`spec` with the adapters' LoRA where it has none; where it has one, it must be the adapters'."""
    if spec.vision.lora is None and spec.text.lora is None:
        return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, lora=loras["vision"]),
                                   text=dataclasses.replace(spec.text, lora=loras["text"]))
    check_same_loras(spec, loras, where)
    return spec
