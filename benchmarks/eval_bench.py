"""Items/s of `evaluate_vlm.py` at batch sizes 1, 4 and 8, with one instance and with 2 instances (2 processes,
`torchrun --standalone`), on the same model and benchmark files, each run as a user would run it.

    python benchmarks/eval_bench.py [--preset small] [--mcq 32] [--vqa 16] [--max-new-tokens 16] [--reps 2]

The baseline is what VLMEvalKit gives by default: one instance answering one item at a time (batch 1). Ratios
are of medians over `--reps` runs per configuration, the order of the configurations reversed every round.
items/s is evaluate_vlm.py's own figure (its metrics.jsonl: items answered / seconds answering, summed over
the benchmarks); wall time is the whole torchrun command, start-up, model loading and scoring included. Every
run has a fresh work dir, so nothing is resumed. Threads: one instance gets every core (OMP_NUM_THREADS = the
core count), each of N instances a 1/N share of them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MCQ_NAME, VQA_NAME = "MMStar", "TextVQA_VAL"  # VLMEvalKit names: multiple choice, open VQA (6 tiles per image)
QUESTIONS = [
    ("What is the main object in the picture?", ["a person", "an animal", "a vehicle", "a drink"]),
    ("Which colour dominates the image?", ["red", "green", "blue", "grey"]),
    ("Where was this photo most likely taken?", ["indoors", "outdoors", "in space"]),
    ("How many objects are in focus?", ["one", "two", "three or more"]),
    ("What is the mood of the scene?", ["calm", "busy"]),
    ("Which of these words describes the picture best?", ["portrait", "landscape", "still life", "action shot"]),
]
VQA_QUESTIONS = ["What is written in the picture?", "How many things can you see?", "What colour is the background?",
                 "What is the object on the left?", "Describe the scene in one word."]
# (width, height) of each item's picture, in turn: 1 tile, 2 tiles + thumbnail, 3 tiles + thumbnail.
SIZES = ((60, 60), (112, 60), (60, 180))


def write_benchmarks(out: Path, n_mcq: int, n_vqa: int) -> list[Path]:
    """An MCQ and a VQA TSV in VLMEvalKit's format: the sample photos at varied aspect ratios (so items differ
    in tile count and prompt length), the pictures base64 in the `image` column."""
    import base64
    import io

    from PIL import Image

    from mindspeed_mm.testing.tiny_benchmarks import write_photos

    photos = write_photos(out / "photos")

    def picture(k: int) -> str:
        w, h = SIZES[k % len(SIZES)]
        with Image.open(photos[k % len(photos)]) as im:
            buf = io.BytesIO()
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def write(path: Path, header: list[str], rows: list[dict]) -> Path:
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, delimiter="\t", lineterminator="\n")
            w.writeheader()
            w.writerows({h: r.get(h, "") for h in header} for r in rows)
        return path

    mcq = []
    for k in range(n_mcq):
        question, options = QUESTIONS[k % len(QUESTIONS)]
        row = {"index": str(k), "question": question, "answer": "ABCD"[k % len(options)],
               "category": f"c{k % 3}", "image": picture(k)}
        row.update({"ABCD"[j]: o for j, o in enumerate(options)})
        mcq.append(row)
    vqa = [{"index": str(k), "question": VQA_QUESTIONS[k % len(VQA_QUESTIONS)], "answer": str(["one", "two"]),
            "category": "ocr", "image": picture(k + 1)} for k in range(n_vqa)]
    return [write(out / f"{MCQ_NAME}.tsv", ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
                  mcq),
            write(out / f"{VQA_NAME}.tsv", ["index", "question", "answer", "category", "image"], vqa)]


def run_once(eval_json: Path, tsvs: list[Path], work: Path, instances: int, batch: int, max_new: int,
             threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={instances}",
           str(REPO / "evaluate_vlm.py"), "--mm-model", str(eval_json), "--work-dir", str(work),
           "--batch-size", str(batch), "--max-new-tokens", str(max_new), "--no-progress"]
    for t in tsvs:
        cmd += ["--benchmark", str(t)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"instances {instances}, batch {batch} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [(x["instances"], x["batch_size"]) for x in recs] == [(instances, batch)] * len(tsvs), recs
    items = sum(x["answered_now"] for x in recs)
    seconds = sum(x["seconds"] for x in recs)
    tokens, predictions = 0, {}
    for t in tsvs:
        for part in (work / t.stem / "parts").glob("*.jsonl"):
            for line in part.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                tokens += rec.get("num_new_tokens", 0)
        predictions[t.stem] = (work / t.stem / "predictions.jsonl").read_text(encoding="utf-8")
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds, "wall": wall, "tokens": tokens,
            "predictions": predictions}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--mcq", type=int, default=32, help="multiple-choice items")
    ap.add_argument("--vqa", type=int, default=16, help="open VQA items")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--instances", default="1,2")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)

    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
    from mindspeed_mm.testing.tiny_benchmarks import write_eval_json
    from mindspeed_mm.testing.tiny_run import prepare_tiny_run

    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="eval_bench-"))
    tiny = prepare_tiny_run(root / "run", preset=a.preset, seed=0)
    spec = spec_from_hf_dir(tiny.hf_dir)
    tsvs = write_benchmarks(root / "bench", a.mcq, a.vqa)
    eval_json = write_eval_json(root / "eval.json", tiny.mm_dir, tiny.hf_dir, batch_size=1,
                                max_new_tokens=a.max_new_tokens)
    cores = os.cpu_count() or 1
    configs = [(i, b) for i in map(int, a.instances.split(",")) for b in map(int, a.batch_sizes.split(","))]
    base = (1, 1)
    if base not in configs:
        configs.insert(0, base)
    print(f"preset {a.preset}: ViT {spec.vision.hidden_size} x {spec.vision.num_layers} layers at "
          f"{spec.vision.image_size} px, LLM {spec.text.hidden_size} x {spec.text.num_layers} layers; "
          f"{a.mcq} {MCQ_NAME} + {a.vqa} {VQA_NAME} items (1-4 tiles each), greedy, max {a.max_new_tokens} new "
          f"tokens, fp32 on CPU, {cores} cores; {a.reps} runs per configuration", flush=True)

    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for rep in range(a.reps):
        for inst, bs in configs if rep % 2 == 0 else configs[::-1]:
            threads = max(1, cores // inst)
            r = run_once(eval_json, tsvs, root / f"work-i{inst}-b{bs}-r{rep}", inst, bs, a.max_new_tokens, threads)
            runs[(inst, bs)].append(r)
            print(f"  round {rep + 1}: {inst} instance(s) x {threads} thread(s), batch {bs}: "
                  f"{r['items_per_s']:.3f} items/s ({r['items']} items in {r['seconds']:.2f} s), "
                  f"command {r['wall']:.1f} s", flush=True)

    reference = runs[base][0]["predictions"]
    same = all(r["predictions"] == reference for rs in runs.values() for r in rs)
    med = {c: (statistics.median(r["items_per_s"] for r in rs), statistics.median(r["wall"] for r in rs))
           for c, rs in runs.items()}
    b_rate, b_wall = med[base]
    print(f"\n{'instances':>9} {'batch':>5} {'items/s (median)':>17} {'runs':>15} {'vs baseline':>11} "
          f"{'command wall (median)':>22} {'vs baseline':>11} {'new tokens':>10}")
    for c, rs in runs.items():
        rate, wall = med[c]
        each = ", ".join(f"{r['items_per_s']:.2f}" for r in rs)
        print(f"{c[0]:>9} {c[1]:>5} {rate:>17.3f} {each:>15} {rate / b_rate:>10.2f}x {wall:>20.1f} s "
              f"{b_wall / wall:>10.2f}x {rs[0]['tokens']:>10}")
    print("baseline: 1 instance, batch 1 (VLMEvalKit's default); 'vs baseline' is items/s / the baseline's, and "
          "for wall time the baseline's time / this one's (above 1: faster)")
    print(f"predictions identical in every run: {'yes' if same else 'NO'}")
    print(f"whole benchmark: {time.perf_counter() - t_start:.0f} s; files in {root}")


if __name__ == "__main__":
    main()
