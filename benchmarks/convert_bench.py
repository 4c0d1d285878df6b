"""mm-convert benchmark on an InternVL3-2B-shaped bf16 checkpoint (random weights, native format).

Prints hf_to_mm (TP2 PP4) and resplit (-> TP1 PP2) wall time against a plain copy of the same bytes, and each
step's peak RSS against its largest output file. Each step runs in a fresh subprocess that reports its own
peak RSS. Every timed step (the copies too) ends with os.sync() and starts after one, so each pays for its own
writes to disk and none for another's.

    python benchmarks/convert_bench.py [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_SHARD = 2 * 10**9


def synthesize(hf_dir: Path) -> int:
    import torch
    from safetensors.torch import save_file

    from mindspeed_mm.checkpoint.convert import mm_param_shapes
    from mindspeed_mm.config.model_spec import spec_from_hf_config
    from mindspeed_mm.models.internvl.hf_mapping import mapping_rules
    from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config

    cfg = tiny_native_config("vit300m")
    cfg["vision_config"].update(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                                image_size=[448, 448], patch_size=[14, 14])
    cfg["text_config"].update(vocab_size=151674, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, intermediate_size=8960, max_window_layers=28)
    cfg["image_seq_length"] = 256
    cfg["dtype"] = cfg["text_config"]["dtype"] = "bfloat16"
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    spec = spec_from_hf_config(cfg)
    shapes = mm_param_shapes(spec)
    hf_shapes = {}
    for r in mapping_rules(spec, "native"):
        meta = torch.empty(shapes[r.mm], device="meta")
        hf_shapes.update({k: tuple(p.shape) for k, p in zip(r.hf, r.op.split(meta))})
    g = torch.Generator().manual_seed(0)
    shards, cur, size, total = [], {}, 0, 0

    def flush():
        nonlocal cur, size
        name = f".part{len(shards)}"
        save_file(cur, str(hf_dir / name), metadata={"format": "pt"})
        shards.append((name, list(cur)))
        cur, size = {}, 0

    for k, shape in hf_shapes.items():
        n = 1
        for s in shape:
            n *= s
        t = (torch.randint(-2**14, 2**14, (n,), dtype=torch.int16, generator=g).view(torch.bfloat16)
             .reshape(shape))
        if cur and size + 2 * n > MAX_SHARD:
            flush()
        cur[k] = t
        size += 2 * n
        total += 2 * n
    flush()
    wm = {}
    for i, (tmp, keys) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (hf_dir / tmp).rename(hf_dir / name)
        wm.update({k: name for k in keys})
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": wm}))
    return total


# The child reports its own high-water mark from /proc (Linux). getrusage's ru_maxrss is no use here: it keeps
# the RSS of the forked copy of this process from before exec, and this process held the synthesized model.
_CHILD = """
import sys
from mindspeed_mm.cli.mm_convert import main
code = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VmHWM_kB", hwm, file=sys.stderr)
sys.exit(code)
"""


def timed_copy(src: Path, dst: Path) -> float:
    os.sync()
    t0 = time.perf_counter()
    shutil.copytree(src, dst)
    os.sync()
    return time.perf_counter() - t0


def run_step(args: list[str]) -> tuple[float, int]:
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, "InternVLConverter", *args, "--cfg.progress", "false"],
                         check=True, stderr=subprocess.PIPE, text=True)
    os.sync()
    dt = time.perf_counter() - t0
    sys.stderr.write("".join(l for l in res.stderr.splitlines(True) if not l.startswith("VmHWM_kB")))
    hwm = [l for l in res.stderr.splitlines() if l.startswith("VmHWM_kB")][0].split()[1]
    return dt, int(hwm) * 1024


def biggest(d: Path) -> int:
    return max(p.stat().st_size for p in d.rglob("*") if p.is_file())


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="convert_bench-"))
    try:
        t0 = time.perf_counter()
        total = synthesize(work / "hf")
        print(f"synthesized {total / 2**30:.2f} GiB bf16 InternVL3-2B-shaped checkpoint in "
              f"{time.perf_counter() - t0:.1f}s")
        copy_s = timed_copy(work / "hf", work / "hf_copy")
        print(f"plain copy of the HF files: {copy_s:.2f}s")
        dt, rss = run_step(["hf_to_mm", "--cfg.mm_dir", str(work / "mm"), "--cfg.hf_config.hf_dir", str(work / "hf"),
                            "--cfg.parallel_config.llm_pp_layers", "[[6,8,8,6]]",
                            "--cfg.parallel_config.vit_pp_layers", "[[24,0,0,0]]",
                            "--cfg.parallel_config.tp_size", "2"])
        big = biggest(work / "mm")
        print(f"hf_to_mm TP2 PP4: {dt:.2f}s ({dt / copy_s:.1f}x copy); peak RSS {rss / 2**30:.2f} GiB, largest "
              f"output file {big / 2**30:.2f} GiB ({rss / big:.2f}x), output {dir_bytes(work / 'mm') / 2**30:.2f} GiB")
        copy_mm = timed_copy(work / "mm", work / "mm_copy")
        dt, rss = run_step(["resplit", "--cfg.mm_dir", str(work / "mm"), "--cfg.save_mm_dir", str(work / "mm2"),
                            "--cfg.parallel_config.llm_pp_layers", "[[14,14]]",
                            "--cfg.parallel_config.vit_pp_layers", "[[24,0]]",
                            "--cfg.parallel_config.tp_size", "1"])
        big = biggest(work / "mm2")
        print(f"resplit TP2 PP4 -> TP1 PP2: {dt:.2f}s ({dt / copy_mm:.1f}x a {copy_mm:.2f}s copy of the MM dir); "
              f"peak RSS {rss / 2**30:.2f} GiB, largest output file {big / 2**30:.2f} GiB")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
