"""Per-iteration metrics: one log line, one JSON record (`--metrics-file`), TensorBoard scalars when asked."""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["MetricsLogger", "memory_stats"]


def memory_stats() -> dict[str, float]:
    """Device memory on CUDA (allocated now, peak); the process's resident memory on CPU (now, peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"mem_alloc_gib": torch.cuda.memory_allocated() / 2 ** 30,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2 ** 30, "mem_peak_gib": peak_kib / 2 ** 20}


_LINE = [("iteration", "iter {:d}"), ("loss", "loss {:.6f}"), ("grad_norm", "grad norm {:.4f}"),
         ("lr", "lr {:.3e}"), ("tokens_per_s", "tokens/s {:.1f}"), ("samples_per_s", "samples/s {:.2f}"),
         ("step_time_s", "step {:.3f} s"), ("tflops_per_gpu", "TFLOP/s/GPU {:.1f}"), ("mfu", "MFU {:.1%}"),
         ("mem_peak_gib", "mem peak {:.2f} GiB"), ("skipped_samples", "skipped {:d}"),
         ("skipped_iterations", "skipped steps {:d}")]


class MetricsLogger:
    """Writes only on the rank it is enabled on (rank 0); the record dict is the single source of both."""

    def __init__(self, enabled: bool, metrics_file: Optional[str] = None, tensorboard_dir: Optional[str] = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"--tensorboard-dir needs the tensorboard package: {e}") from e
            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [fmt.format(record[k]) for k, fmt in _LINE if record.get(k) is not None]
        if record.get("skipped_by_reason"):
            parts.append("(" + ", ".join(f"{k}: {v}" for k, v in sorted(record["skipped_by_reason"].items())) + ")")
        print(" | ".join(parts), flush=True)
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, record["iteration"])

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
