"""Merges the steps' JSON files into one results file and prints the table: `report.py OUT_JSON STEP_JSON...`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    out, parts = sys.argv[1], sys.argv[2:]
    results = {}
    for p in parts:
        r = json.loads(Path(p).read_text())
        results[r.pop("section")] = r
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'section':10s} {'what':44s} {'ours':>12s} {'transformers':>12s} {'ours/hf':>8s}")
    for sec, r in results.items():
        if sec == "oracle":
            print(f"{sec:10s} {'fp32 tests (passed / failed)':44s} {r['passed']:>12d} {r['failed']:>12d}")
        elif sec == "bf16":
            for row in r["presets"]:
                print(f"{sec:10s} {row['preset'] + ' mean |logit err| vs fp32':44s} "
                      f"{row['ours_mean_abs_logit_err']:12.2e} {row['transformers_mean_abs_logit_err']:12.2e} "
                      f"{row['ours_mean_abs_logit_err'] / row['transformers_mean_abs_logit_err']:8.2f}"
                      f"  {'ok' if row['ok'] else 'FAIL'}")
        elif sec == "train":
            o, h = r["ours"], r["transformers_sdpa"]
            what = f"{r['tokens']} tokens, {r['tiles']} tiles"
            print(f"{sec:10s} {what + ': tokens/s':44s} {o['tokens_per_s']:12.1f} {h['tokens_per_s']:12.1f} "
                  f"{o['tokens_per_s'] / h['tokens_per_s']:8.2f}")
            print(f"{sec:10s} {'TFLOP/s':44s} {o['tflops']:12.3f} {h['tflops']:12.3f}")
            print(f"{sec:10s} {'MFU (peak ' + _f(r['peak_tflops'], '.0f') + ' TFLOP/s)':44s} "
                  f"{_f(o['mfu'], '12.3f'):>12s} {_f(h['mfu'], '12.3f'):>12s}")
            print(f"{sec:10s} {'peak memory GiB':44s} {_f(o['peak_memory_gib'], '12.1f'):>12s} "
                  f"{_f(h['peak_memory_gib'], '12.1f'):>12s}")
        elif sec == "decode":
            t = r["decode_tokens_per_s"]
            print(f"{sec:10s} {'decode tokens/s (' + r['dtype'] + ', ' + str(r['new_tokens']) + ' new)':44s} "
                  f"{t['ours, KV cache']:12.1f} {t['transformers generate (sdpa)']:12.1f} "
                  f"{r['ratio_ours_over_hf']:8.2f}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
