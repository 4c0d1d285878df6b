"""Full finetuning of the LLM against LoRA on it, both with the ViT frozen, on the same model and batches:
trainable parameters, optimizer-state bytes, peak memory and step time of `pretrain_vlm.py`, run twice in this
command as a user would run it (single rank, fp32, AdamW, one micro-batch of 2 samples).

    python benchmarks/lora_bench.py [--preset medium] [--iters 4] [--rank 16]

The baseline is full finetuning (the reference's recipe: `freeze` false on the LLM). Ratios are LoRA / full.
Peak memory is the process's peak resident memory on CPU (everything: Python, torch, data workers' parent),
megatron's peak allocation on CUDA. Step time is the median over the iterations after the first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(tiny, model_json: Path, iters: int, name: str, extra: list[str]) -> list[dict]:
    from mindspeed_mm.testing.tiny_run import pretrain_args

    metrics = tiny.root / f"{name}.jsonl"
    args = pretrain_args(tiny, model_json, iters=iters, mbs=2, gbs=2, load=tiny.mm_dir, metrics=metrics,
                         extra=tuple(extra))
    r = subprocess.run([sys.executable, str(REPO / "pretrain_vlm.py"), *args], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args(argv)

    from mindspeed_mm.testing.tiny_run import prepare_tiny_run, write_model_json

    tiny = prepare_tiny_run(Path(tempfile.mkdtemp(prefix="lora_bench-")), preset=a.preset, seed=0)
    model = write_model_json(tiny.hf_dir, tiny.root / "model.json", freeze_vit=True)
    raw = json.loads(model.read_text())
    raw["text_decoder"].pop("freeze", None)  # the LLM trains in full, unless LoRA freezes its base
    raw["image_encoder"]["vision_projector"]["freeze"] = True  # only the LLM (or its adapters) trains
    model.write_text(json.dumps(raw))
    full = run(tiny, model, a.iters, "full", [])
    lora = run(tiny, model, a.iters, "lora", ["--use-llm-lora", str(a.rank)])

    def row(name: str, recs: list[dict]) -> dict:
        return {"name": name, "trainable": recs[0]["trainable_params"],
                "optim_bytes": recs[0]["optimizer_state_bytes"],
                "peak_gib": max(r["mem_peak_gib"] for r in recs),
                "step_s": statistics.median(r["step_time_s"] for r in recs[1:]),
                "loss": [round(r["loss"], 4) for r in recs]}

    rows = [row("full finetune (LLM)", full), row(f"LoRA r={a.rank} (LLM)", lora)]
    print(f"preset {a.preset}: {a.iters} iterations each, 2 samples per step, ViT and projector frozen")
    print(f"{'run':<22} {'trainable params':>17} {'optimizer state':>16} {'peak memory':>12} {'step':>8}")
    for r in rows:
        print(f"{r['name']:<22} {r['trainable']:>17,} {r['optim_bytes'] / 2 ** 20:>12.1f} MiB "
              f"{r['peak_gib']:>8.2f} GiB {r['step_s']:>7.2f}s")
    f, lo = rows
    print(f"LoRA / full: trainable {lo['trainable'] / f['trainable']:.4f}, optimizer state "
          f"{lo['optim_bytes'] / f['optim_bytes']:.4f}, peak memory {lo['peak_gib'] / f['peak_gib']:.2f}, "
          f"step time {lo['step_s'] / f['step_s']:.2f}")
    print("losses:", {r["name"]: r["loss"] for r in rows})


if __name__ == "__main__":
    main()
