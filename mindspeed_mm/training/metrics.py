"""Per-iteration metrics: one log line, one JSON record (`--metrics-file`), TensorBoard scalars when asked.

Records carry ``"record": "train"`` (a `--log-interval` line) or ``"record": "validation"`` (an evaluation,
`--eval-interval`), so one file holds both curves."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["MetricsLogger", "iteration_line", "memory_stats", "validation_ppl", "validation_box"]


def memory_stats() -> dict[str, float]:
    """Device memory on CUDA (allocated now, peak); the process's resident memory on CPU (now, peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"mem_alloc_gib": torch.cuda.memory_allocated() / 2 ** 30,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2 ** 30, "mem_peak_gib": peak_kib / 2 ** 20}


def iteration_line(record: dict[str, Any], train_iters: int, log_tps: bool = False,
                   now: Optional[datetime] = None) -> str:
    """Megatron's `training_log` line (its fields, formats and order, so scripts written for Megatron and
    MindSpeed-MM logs parse it), then ours in the same ` name: value |` form.

    `tokens per sample` (`--log-tps`) is MindSpeed-MM's figure: the mean padded sequence length of the global
    batch's samples, image tokens and padding included; its finetune scripts multiply it by samples/s. Our own
    `tokens/s` counts real tokens only (no padding), summed over DP."""
    r = record
    now = now or datetime.now()
    parts = [f" [{now.strftime('%Y-%m-%d %H:%M:%S')}] iteration {r['iteration']:8d}/{train_iters:8d} |",
             f" consumed samples: {r['consumed_samples']:12d} |",
             f" elapsed time per iteration (ms): {r['step_time_s'] * 1000.0:.1f} |",
             f" learning rate: {r['lr']:.6E} |",
             f" global batch size: {r['global_batch_size']:5d} |"]
    if log_tps:
        parts.append(f" tokens per sample: {r['tokens_per_sample']:.6E} |")
    parts += [f" lm loss: {r['loss']:.6E} |", f" loss scale: {r['loss_scale']:.1f} |"]
    if r.get("grad_norm") is not None:
        parts.append(f" grad norm: {r['grad_norm']:.3f} |")
    # a non-finite loss stops the run (train.py), so no logged interval has a nan iteration
    parts += [f" number of skipped iterations: {r['skipped_iterations_in_interval']:3d} |",
              " number of nan iterations:   0 |"]
    for key, fmt in _EXTRA:
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    if r.get("expert_load_max"):  # the most and least loaded expert of any sparse layer, tokens in the step
        parts.append(f" expert load min/max: {min(r['expert_load_min']):d}/{max(r['expert_load_max']):d} |")
    skipped = f" skipped samples: {r['skipped_samples']:d}"
    if r.get("skipped_by_reason"):
        skipped += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r["skipped_by_reason"].items())) + ")"
    parts.append(skipped + " |")
    if r.get("loaded_by_note"):  # samples trained on despite a defect (a truncated image), per image
        parts.append(" loaded despite: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["loaded_by_note"].items()))
                     + " |")
    return "".join(parts)


def validation_ppl(loss: float) -> float:
    """Megatron's perplexity: exp of the loss capped at 20, so a diverged run logs a number, not inf."""
    return math.exp(min(20.0, loss))


def validation_box(record: dict[str, Any]) -> str:
    """Megatron's `evaluate_and_print_results` box (its layout, so tools reading Megatron logs read ours)."""
    line = (f" validation loss at iteration {record['iteration']} | lm loss value: {record['validation_loss']:.6E} | "
            f"lm loss PPL: {record['validation_ppl']:.6E} | ")
    rule = "-" * (len(line) + 1)
    return f"{rule}\n{line}\n{rule}"


# after Megatron's fields; none of these names may contain its field names (the scripts grep for them)
_EXTRA = [("load_balancing_loss", " load balancing loss: {:.6E} |"), ("tokens_per_s", " tokens/s: {:.1f} |"), ("samples_per_s", " samples/s: {:.2f} |"),
          ("samples_per_step", " samples per step: {:.1f} |"), ("tiles_per_step", " tiles per step: {:.1f} |"),
          ("packs_per_step", " packs per step: {:.1f} |"), ("padding_fraction", " padding fraction: {:.3f} |"),
          ("tile_imbalance", " DP tile imbalance: {:.3f} |"),
          ("tflops_per_gpu", " throughput per GPU (TFLOP/s/GPU): {:.1f} |"), ("mfu", " MFU: {:.1%} |"),
          ("mem_peak_gib", " mem peak (GiB): {:.2f} |"), ("skipped_iterations", " skipped iterations in total: {:d} |")]


class MetricsLogger:
    """Writes only on the rank it is enabled on (rank 0); the record dict is the single source of both."""

    def __init__(self, enabled: bool, metrics_file: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                 train_iters: int = 0, log_tps: bool = False):
        self.enabled, self.train_iters, self.log_tps = enabled, train_iters, log_tps
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
        print(iteration_line(record, self.train_iters, self.log_tps), flush=True)
        self._write(record)

    def log_validation(self, record: dict[str, Any]) -> None:
        """An evaluation's record: Megatron's box on stdout, the JSON line, its TensorBoard scalars."""
        if not self.enabled:
            return
        print(validation_box(record), flush=True)
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
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
