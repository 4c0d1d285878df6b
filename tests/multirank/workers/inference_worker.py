"""N ranks: the inference CLI's `run` on a converted checkpoint, at the checkpoint's layout.

Usage: torchrun --nproc_per_node N inference_worker.py CONFIG.json OUT_DIR
Every rank writes its results to OUT_DIR/rank{r}.json (all ranks must agree).
"""
import json
import sys
from pathlib import Path

from mindspeed_mm.device import apply_device_adaptor


def main(config_path: str, out_dir: str) -> None:
    apply_device_adaptor(force=True)  # the CPU/gloo path, also on a CUDA host
    import torch.distributed as dist

    from mindspeed_mm.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.inference.cli import run
    from mindspeed_mm.inference.config import load_inference_config

    init_distributed(backend="gloo")
    try:
        results = run(load_inference_config(config_path))
        Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
