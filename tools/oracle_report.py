"""Prints how far our InternVL3 is from transformers' InternVLForConditionalGeneration on tiny random
checkpoints (both ViT styles): max |logits diff| over six batch shapes, loss diff, and the worst
per-parameter gradient difference relative to the parameter's largest gradient. tests/oracle asserts the
same comparisons stay <= 1e-5.

    python tools/oracle_report.py
"""
import tempfile
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.helpers

from mindspeed_mm.device import apply_device_adaptor

CASES = {"one_tile": [[1]], "several_tiles": [[3]], "two_images": [[2, 1]],
         "batch_of_two_lengths": [[1], [2, 1]], "text_only": [[]], "mixed_text_and_image": [[], [2]]}


def report(preset: str, root: str) -> str:
    import torch

    from mindspeed_mm.checkpoint.hf_files import load_hf_checkpoint
    from mindspeed_mm.models.internvl.hf.keys import normalize_native_key
    from mindspeed_mm.models.internvl.hf.mapping import hf_to_mm
    from mindspeed_mm.models.internvl.model import InternVLModel, load_full_state_dict, mean_loss
    from tests.helpers.batches import make_batch
    from tests.helpers.layout_check import trainable_spec
    from tests.helpers.oracle import load_native_model
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

    hf_dir = write_tiny_checkpoint(f"{root}/{preset}", fmt="native", preset=preset, seed=1)
    _, fmt, state = load_hf_checkpoint(hf_dir)
    spec = trainable_spec(hf_dir)
    ours = InternVLModel(spec)
    load_full_state_dict(ours, hf_to_mm(state, spec, fmt))
    ours.eval()
    hf = load_native_model(hf_dir)
    worst_logits = worst_loss = 0.0
    for samples in CASES.values():
        b = make_batch(spec, samples)
        with torch.no_grad():
            ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                     labels=b["labels"])
            logits = ours(b["input_ids"], b["pixel_values"])
            loss = mean_loss(ours(b["input_ids"], b["pixel_values"], labels=b["labels"]), b["labels"])
        valid = b["attention_mask"].bool()
        worst_logits = max(worst_logits, (logits[valid] - ref.logits[valid]).abs().max().item())
        worst_loss = max(worst_loss, abs(loss.item() - ref.loss.item()))

    b = make_batch(spec, CASES["batch_of_two_lengths"])
    hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
       labels=b["labels"]).loss.backward()
    mean_loss(ours(b["input_ids"], b["pixel_values"], labels=b["labels"]), b["labels"]).backward()
    ref_grads = hf_to_mm({normalize_native_key(n): p.grad for n, p in hf.named_parameters()}, spec, "native")
    worst_grad = max((p.grad - ref_grads[n]).abs().max().item() / max(ref_grads[n].abs().max().item(), 1e-3)
                     for n, p in ours.named_parameters())
    return (f"{preset}: max |logits diff| {worst_logits:.2e} over {len(CASES)} batches, max |loss diff| "
            f"{worst_loss:.2e}, max grad relative diff {worst_grad:.2e} over {len(ref_grads)} parameters")


def main() -> None:
    apply_device_adaptor()
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel()
    with tempfile.TemporaryDirectory(prefix="oracle_report-") as root:
        for preset in ("vit300m", "vit6b"):
            print(report(preset, root), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
