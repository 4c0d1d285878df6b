"""Padded against packed training on a length and tile mix like real SFT data: tokens/s (real tokens, image
tokens included, padding not) and the padding fraction of `pretrain_vlm.py`, same model and samples, one
command; and the DP2 tile imbalance of the packed run.

    python benchmarks/packing_bench.py [--preset small] [--samples 64] [--iters 4]

The mix: each sample's text is log-uniform in 64-2048 tokens, and it has 0 to 13 image tiles (no image, or one
image whose aspect ratio tiles it into 1, 3, 5, 7, 9 or 13 tiles with the thumbnail, at max_dynamic_patch 12),
drawn uniformly. The baseline is the loop as users run it today: padded micro-batches of 4 samples (padding each
to its longest sample), and the reference recipe's micro-batch of 1 (no padding, one sample per micro-batch).
Packed: packs of up to 4096 tokens and 40 tiles (best-fit), one pack per micro-batch. Every run: single rank,
fp32, 2 micro-batches per step; tokens/s is the median over the iterations after the first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (width, height) in tiles: with the thumbnail, 1 x 1 is 1 tile, the others w*h + 1
_SHAPES = [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (4, 3)]
_WORDS = ["red", "green", "blue", "colour", "picture", "the", "a", "is", "of", "and", "sky", "snow", "grass"]


def write_mix(root: Path, n: int, image_size: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        words = int(np.exp(rng.uniform(np.log(64), np.log(2048))) // 2)  # the tiny BPE: ~2 tokens a word
        text = " ".join(rng.choice(_WORDS, size=words))
        k = int(rng.integers(0, len(_SHAPES) + 1))
        record = {"conversations": [{"from": "human", "value": ("<image>\n" if k else "") + "Say: " + text[:200]},
                                    {"from": "gpt", "value": text}]}
        if k:
            w, h = _SHAPES[k - 1]
            rel = f"images/{i}.jpg"
            pixels = rng.integers(0, 255, size=(h * image_size, w * image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / rel, quality=70)
            record["image"] = rel
        lines.append(json.dumps(record))
    path = root / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tiny, model: Path, data: Path, iters: int, mbs: int, name: str, nproc: int = 1, micro: int = 2) -> list[dict]:
    from mindspeed_mm.testing.tiny_run import pretrain_args

    metrics = tiny.root / f"{name}.jsonl"
    args = pretrain_args(tiny, model, iters=iters, mbs=mbs, gbs=mbs * micro * nproc, load=tiny.mm_dir,
                         metrics=metrics, extra=("--seq-length", "4096"))
    args[args.index("--mm-data") + 1] = str(data)
    cmd = [sys.executable, str(REPO / "pretrain_vlm.py"), *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "pretrain_vlm.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--iters", type=int, default=4)
    a = ap.parse_args(argv)

    from mindspeed_mm.testing.tiny_run import prepare_tiny_run, write_model_json

    tiny = prepare_tiny_run(Path(tempfile.mkdtemp(prefix="packing_bench-")), preset=a.preset, seed=0)
    model = write_model_json(tiny.hf_dir, tiny.root / "model.json", freeze_vit=True)
    spec_image = json.loads(model.read_text())["image_encoder"]["vision_encoder"]["image_size"]
    mix = write_mix(tiny.root / "mix", a.samples, spec_image, seed=0)
    base = json.loads(tiny.data_json.read_text())
    base["dataset_param"]["basic_parameters"] = {"data_path": str(mix), "data_folder": str(mix.parent),
                                                 "repeat_time": 1}
    base["dataset_param"]["max_dynamic_patch"] = 12
    padded = tiny.root / "data_padded.json"
    padded.write_text(json.dumps(base))
    base["dataset_param"].update(use_packed_ds=True, max_packed_tokens=4096, num_images_expected=40,
                                 max_buffer_size=20)
    packed = tiny.root / "data_packed.json"
    packed.write_text(json.dumps(base))

    rows = []
    for name, data, mbs in (("padded, 4 samples per micro-batch", padded, 4),
                            ("padded, 1 sample per micro-batch", padded, 1),
                            ("packed, 1 pack per micro-batch", packed, 1)):
        recs = run(tiny, model, data, a.iters, mbs, name.split(",")[0] + str(mbs))
        rows.append({"name": name, "tokens_s": statistics.median(r["tokens_per_s"] for r in recs[1:]),
                     "padding": statistics.mean(r["padding_fraction"] for r in recs),
                     "samples": statistics.mean(r["samples_per_step"] for r in recs),
                     "tiles": statistics.mean(r["tiles_per_step"] for r in recs)})
    dp2 = run(tiny, model, packed, 2, 1, "packed_dp2", nproc=2, micro=4)
    print(f"preset {a.preset}, {a.samples} samples: text 64-2048 tokens (log-uniform), 0-13 tiles; single rank, "
          f"2 micro-batches per step")
    print(f"{'run':<36} {'tokens/s':>9} {'padding':>8} {'samples/step':>13} {'tiles/step':>11}")
    for r in rows:
        print(f"{r['name']:<36} {r['tokens_s']:>9.0f} {r['padding']:>8.3f} {r['samples']:>13.1f} {r['tiles']:>11.1f}")
    base_row, one, pk = rows
    print(f"packed / padded(4): tokens/s {pk['tokens_s'] / base_row['tokens_s']:.2f}x; packed / padded(1): "
          f"{pk['tokens_s'] / one['tokens_s']:.2f}x")
    print(f"packed at DP2 (4 packs per rank per step): tile imbalance "
          f"{max(r['tile_imbalance'] for r in dp2) * 100:.1f}% (max over DP ranks / mean - 1, worst step)")


if __name__ == "__main__":
    main()
