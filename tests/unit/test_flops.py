"""The MFU FLOP formula against torch's FlopCounterMode run over transformers' InternVL forward (matmuls,
convolutions and attention as the kernels compute them)."""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from tests.helpers.batches import make_batch
from tests.helpers.oracle import load_native_model
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
from mindspeed_mm.training.flops import llm_forward_flops, step_flops, vit_forward_flops


@pytest.mark.parametrize("preset", ["vit300m", "vit6b"])
def test_forward_flops_match_flop_counter(tmp_path, preset):
    hf_dir = write_tiny_checkpoint(tmp_path / "hf", fmt="native", preset=preset, seed=0)
    spec = spec_from_hf_dir(hf_dir)
    model = load_native_model(hf_dir).float().eval()
    batch = make_batch(spec, [[3]])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    want = counter.get_total_flops()
    got = vit_forward_flops(spec, 3) + llm_forward_flops(spec, [batch["input_ids"].shape[1]])
    assert abs(got - want) <= 0.01 * want, (got, want)


def test_training_multipliers(tmp_path):
    hf_dir = write_tiny_checkpoint(tmp_path / "hf", fmt="native", preset="vit300m", seed=0)
    spec = spec_from_hf_dir(hf_dir)
    frozen_vit = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, freeze=True),
                                     projector=dataclasses.replace(spec.projector, freeze=True))
    f = step_flops(frozen_vit, 2, [100])
    assert f.vit == vit_forward_flops(spec, 2) and f.llm == 3 * llm_forward_flops(spec, [100])
    frozen_llm = dataclasses.replace(spec, text=dataclasses.replace(spec.text, freeze=True))
    f = step_flops(frozen_llm, 2, [100])
    assert f.vit == 3 * vit_forward_flops(spec, 2) and f.llm == 2 * llm_forward_flops(spec, [100])
