"""Resume in the middle of an epoch: seconds from start (dataset built from its annotation file) to the first
batch, at consumed samples 0 and 150k of a 200k-record text-only jsonl, with and without group_by_length.

    python benchmarks/resume_bench.py [--records 200000] [--consumed 150000] [--dir /tmp/resume_bench]
"""
import argparse
import json
import time
from pathlib import Path

from mindspeed_mm.data.data_spec import load_data_spec
from mindspeed_mm.data.dataset import InternVLChatDataset
from mindspeed_mm.data.mixture import length_grouped_order
from mindspeed_mm.data.sampler import build_dataloader
from mindspeed_mm.testing.tiny_checkpoint import build_tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "internvl3"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--consumed", type=int, default=150_000)
    ap.add_argument("--dir", default="/tmp/resume_bench")
    a = ap.parse_args()
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "records.jsonl"
    if not data.is_file() or sum(1 for _ in data.open()) != a.records:
        data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"q {i} " + "x " * (i % 7)},
                                                               {"from": "gpt", "value": f"a {i}"}]}) + "\n"
                                for i in range(a.records)))
    raw = json.loads((EXAMPLES / "data_tiny.json").read_text())
    raw["dataset_param"]["basic_parameters"] = {"data_path": str(data), "data_folder": str(out)}
    spec = load_data_spec(raw)
    tokenizer = build_tiny_tokenizer()
    mbs, dp, gbs = 4, 2, 64
    for group in (False, True):
        for consumed in (0, a.consumed):
            t0 = time.perf_counter()
            ds = InternVLChatDataset(spec, tokenizer, 1024, tokens_per_tile=4, seed=1)
            t1 = time.perf_counter()
            order = length_grouped_order(ds.records.lengths(spec.dataset_param, 4), gbs, mbs, 1) if group else None
            batch = next(iter(build_dataloader(ds, mbs, 0, dp, 1, consumed, 0, 0, order=order)))
            t2 = time.perf_counter()
            print(f"group_by_length {str(group):5s} consumed {consumed:7d}: start to first batch {t2 - t0:.2f} s "
                  f"(dataset {t1 - t0:.2f} s, order + first batch {t2 - t1:.2f} s; {batch['num_samples']} samples)")


if __name__ == "__main__":
    main()
