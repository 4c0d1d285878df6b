"""What the GPU check's steps share: the repository on sys.path (benchmarks and tests.helpers are reused, not
copied), the checkpoint they all read, the device, and one JSON file per step for report.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def setup(device: str):
    """The CPU adaptor where there is no GPU (a no-op on CUDA) and the device to run on."""
    import torch

    from mindspeed_mm.device import apply_device_adaptor

    apply_device_adaptor()
    return torch.device(device)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_spec(spec):
    """The spec with bf16 parameters (the model JSON's params_dtype), as --bf16 makes it."""
    import dataclasses

    return dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, params_dtype="bf16"),
                               text=dataclasses.replace(spec.text, params_dtype="bf16"))


def write_result(path: str, section: str, result: dict) -> None:
    Path(path).write_text(json.dumps({"section": section, **result}, indent=2) + "\n")
    print(f"[{section}] " + json.dumps(result), flush=True)


def main() -> None:
    """Writes the checkpoint the train and decode steps load: `common.py PRESET OUT_DIR` (bf16 weights, so
    both sides start from the same rounded values)."""
    preset, out = sys.argv[1], sys.argv[2]
    setup("cpu")
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint(out, fmt="native", preset=preset, seed=0, dtype="bf16", overwrite=True)
    print(f"wrote {preset} checkpoint to {out}")


if __name__ == "__main__":
    main()
