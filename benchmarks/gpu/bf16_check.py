"""bf16 tolerance: our model against transformers' in bf16, on the same tiny random weights and batch.

    python benchmarks/gpu/bf16_check.py --presets small,vit6b --device cuda --out bf16.json

bf16 has no exact answer to compare with, so both bf16 models are measured against transformers in fp32 and
ours must be no noisier than transformers' own bf16: mean |logits error| at most RATIO (1.5) times
transformers', and the loss within LOSS_TOL (0.02) of the fp32 loss. Exits 1 when a preset fails.
"""
from __future__ import annotations

import argparse
import sys

import common

RATIO, LOSS_TOL = 1.5, 0.02
SAMPLES = [[1], [2, 1]]  # two lengths, several tiles, padding


def check(preset: str, device) -> dict:
    import tempfile
    from pathlib import Path

    import torch

    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict, mean_loss
    from mindspeed_mm.testing.tiny_checkpoint import refresh_rope_buffers, write_tiny_checkpoint
    from tests.helpers.batches import make_batch
    from tests.helpers.oracle import load_native_model

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf", fmt="native", preset=preset, seed=1)
        config, fmt, state = load_hf_checkpoint(hf_dir)
        spec = common.bf16_spec(spec_from_hf_config(config))
        ours = InternVLModel(spec)
        load_full_state_dict(ours, hf_to_mm(state, spec, fmt))
        ours = ours.to(device).eval()
        hf32 = load_native_model(hf_dir).to(device)
        hf16 = load_native_model(hf_dir).to(device, torch.bfloat16)
        refresh_rope_buffers(hf16)  # RoPE frequencies stay fp32, as from_pretrained(dtype=bf16) leaves them
    b = make_batch(spec, SAMPLES)
    ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    pixels = b["pixel_values"].to(device)
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        theirs = hf16(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16(), labels=labels)
        logits = ours(ids, pixels.bfloat16(), attention_mask=mask)
        loss = mean_loss(ours(ids, pixels.bfloat16(), labels=labels, attention_mask=mask), labels)
    valid = mask.bool()
    exact = ref.logits[valid].float()
    ours_err = (logits[valid].float() - exact).abs().mean().item()
    hf_err = (theirs.logits[valid].float() - exact).abs().mean().item()
    r = {"preset": preset, "ours_mean_abs_logit_err": ours_err, "transformers_mean_abs_logit_err": hf_err,
         "ours_vs_transformers_bf16_max_abs": (logits[valid].float() - theirs.logits[valid].float()).abs().max().item(),
         "loss_fp32": ref.loss.item(), "loss_ours_bf16": loss.item(), "loss_transformers_bf16": theirs.loss.item()}
    r["ok"] = ours_err <= RATIO * hf_err and abs(loss.item() - ref.loss.item()) <= LOSS_TOL
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,vit6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = common.setup(args.device)
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel()
    rows = [check(p, device) for p in args.presets.split(",")]
    destroy_distributed()
    common.write_result(args.out, "bf16", {"ratio_limit": RATIO, "loss_tol": LOSS_TOL, "presets": rows,
                                           "ok": all(r["ok"] for r in rows)})
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
