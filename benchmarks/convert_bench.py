"""mm-convert benchmark on an InternVL3-2B-shaped (or `--shape 8b`) bf16 checkpoint (random weights, native format).

Prints hf_to_mm (TP2 PP4) and resplit (-> TP1 PP2) wall time against a plain copy of the same bytes, and each
step's peak RSS against its largest output file. Each step runs in a fresh subprocess (so its time includes
starting Python and importing the CLI, which for hf_to_mm and resplit no longer means torch) that reports its
own peak RSS. Every timed step, the copies too, starts
after and ends with os.sync(), so each pays for its own writes to disk and none for another's.

On a VM the copy itself can vary 3-5x from one run to the next (the host backs guest memory lazily), so after
an untimed warm-up round the copy and the step alternate `--reps` times, which goes first switching every
round, and the ratio is of the medians; the step's median against the fastest copy is printed too, as the
figure a quiet VM would give. Each round also times a direct copy: the same bytes moved the way mm-convert
writes them (8 MiB chunks, O_DIRECT), so the step's ratio to it is what converting costs over moving bytes.

    python benchmarks/convert_bench.py [--reps 3] [--shape 2b|8b] [--workdir DIR] [--keep]
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


# LLM sizes of the InternVL3 checkpoints (shared/reference/internvl3-formats.md section 3); both use InternViT-300M.
LLM_SHAPES = {
    "2b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
               intermediate_size=8960),
    "8b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944),
}


def synthesize(hf_dir: Path, shape: str = "2b") -> int:
    import torch
    from safetensors.torch import save_file

    from mindspeed_mm.models.internvl.params import param_shapes as mm_param_shapes
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
    from mindspeed_mm.models.internvl.hf.mapping import mapping_rules
    from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config

    cfg = tiny_native_config("vit300m")
    cfg["vision_config"].update(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                                image_size=[448, 448], patch_size=[14, 14])
    cfg["text_config"].update(vocab_size=151674, max_window_layers=28, **LLM_SHAPES[shape])
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


def timed_direct_copy(src: Path, dst: Path) -> float:
    """The same bytes copied as mm-convert writes them (8 MiB chunks from a mapping, O_DIRECT): what the
    conversion would cost if it did nothing but move bytes."""
    from copy_paths_bench import mmap_chunks

    copy = mmap_chunks(True)
    os.sync()
    t0 = time.perf_counter()
    for f in sorted(src.rglob("*")):
        to = dst / f.relative_to(src)
        if f.is_dir():
            to.mkdir(parents=True, exist_ok=True)
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as s, open(to, "wb") as d:
            if f.stat().st_size:
                copy(s.fileno(), d.fileno(), f.stat().st_size)
    os.sync()
    return time.perf_counter() - t0


def run_step(args: list[str]) -> tuple[float, int]:
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, "InternVLConverter", *args, "--cfg.progress", "false"],
                         stderr=subprocess.PIPE, text=True)
    os.sync()
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"mm-convert {args[0]} failed (exit {res.returncode})")
    hwm = [l for l in res.stderr.splitlines() if l.startswith("VmHWM_kB")][0].split()[1]
    return dt, int(hwm) * 1024


def process_floor() -> float:
    """What any step pays before and after its work: start Python, import the CLI, exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mindspeed_mm.cli.mm_convert"], check=True)
    return time.perf_counter() - t0


def biggest(d: Path) -> int:
    return max(p.stat().st_size for p in d.rglob("*") if p.is_file())


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def alternate(reps: int, src: Path, copy_dst: Path, out: Path, args: list[str], label: str) -> None:
    """One untimed warm-up round, then `reps` rounds of (copy `src`, run the step into `out`), the order
    switching every round; prints each round and the medians."""
    copies, directs, steps, rss, floors = [], [], [], [], []

    direct_dst = copy_dst.with_name(copy_dst.name + "_direct")

    def copy() -> tuple[float, float]:
        shutil.rmtree(copy_dst, ignore_errors=True)
        c = timed_copy(src, copy_dst)
        shutil.rmtree(direct_dst, ignore_errors=True)
        return c, timed_direct_copy(src, direct_dst)

    def step() -> tuple[float, int]:
        shutil.rmtree(out, ignore_errors=True)
        return run_step(args)

    for i in range(reps + 1):
        # Each side (each copy apart) deletes its own previous output just before it runs, so the plain copy
        # writes into the page-cache memory its last output freed (the direct copy and mm-convert use none):
        # on this VM, memory freed a while ago has been handed back to the host (free page reporting), and
        # taking it again made the same buffered writes 2-20x slower (2 GiB with dd: 34 s into such memory,
        # 1.8 s into memory just freed). The warm-up round gives the copy such an output; alternating the
        # order keeps either side from always running second.
        if i % 2:
            dt, peak = step()
            c, d = copy()
        else:
            c, d = copy()
            dt, peak = step()
        floor = process_floor()
        if i == 0:
            print(f"  warm-up: copy {c:.2f}s, direct copy {d:.2f}s, {label} {dt:.2f}s ({dt / c:.2f}x)", flush=True)
            continue
        copies.append(c)
        directs.append(d)
        steps.append(dt)
        rss.append(peak)
        floors.append(floor)
        print(f"  round {i}{' (step first)' if i % 2 else ''}: copy {c:.2f}s, direct copy {d:.2f}s, {label} "
              f"{dt:.2f}s ({dt / c:.2f}x the copy, {dt / d:.2f}x the direct copy), peak RSS {peak / 2**30:.2f} GiB",
              flush=True)
    shutil.rmtree(copy_dst, ignore_errors=True)
    shutil.rmtree(direct_dst, ignore_errors=True)
    big = biggest(out)
    print(f"{label}: median {median(steps):.2f}s = {median(steps) / median(copies):.2f}x the median copy "
          f"({median(copies):.2f}s of {dir_bytes(src) / 2**30:.2f} GiB), {median(steps) / min(copies):.2f}x the "
          f"fastest ({min(copies):.2f}s), {median(steps) / median(directs):.2f}x the median direct copy "
          f"({median(directs):.2f}s); peak RSS {max(rss) / 2**30:.2f} GiB "
          f"(max of {reps}), largest output file {big / 2**30:.2f} GiB, RSS - largest file = "
          f"{(max(rss) - big) / 2**30:.2f} GiB (target <= 1); a process that only starts, imports the CLI and "
          f"exits: median {median(floors):.2f}s = {median(floors) / median(copies):.2f}x the copy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--shape", choices=sorted(LLM_SHAPES), default="2b",
                    help="InternVL3 size to imitate (8b: 15 GiB; needs ~4x that on disk)")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="convert_bench-"))
    try:
        t0 = time.perf_counter()
        total = synthesize(work / "hf", a.shape)
        print(f"synthesized {total / 2**30:.2f} GiB bf16 InternVL3-{a.shape.upper()}-shaped checkpoint in "
              f"{time.perf_counter() - t0:.1f}s")
        alternate(a.reps, work / "hf", work / "hf_copy", work / "mm",
                  ["hf_to_mm", "--cfg.mm_dir", str(work / "mm"), "--cfg.hf_config.hf_dir", str(work / "hf"),
                   "--cfg.parallel_config.llm_pp_layers", "[[6,8,8,6]]",
                   "--cfg.parallel_config.vit_pp_layers", "[[24,0,0,0]]",
                   "--cfg.parallel_config.tp_size", "2"], "hf_to_mm TP2 PP4")
        if not a.keep:  # the 8B shape's four copies would not fit beside it on a small disk
            shutil.rmtree(work / "hf")
        alternate(a.reps, work / "mm", work / "mm_copy", work / "mm2",
                  ["resplit", "--cfg.mm_dir", str(work / "mm"), "--cfg.save_mm_dir", str(work / "mm2"),
                   "--cfg.parallel_config.llm_pp_layers", "[[14,14]]",
                   "--cfg.parallel_config.vit_pp_layers", "[[24,0]]",
                   "--cfg.parallel_config.tp_size", "1"], "resplit TP2 PP4 -> TP1 PP2")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
