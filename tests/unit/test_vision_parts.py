"""Pieces of InternViT checked in isolation: pixel shuffle against transformers, the drop-path schedule."""
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel as HFInternVLModel

from mindspeed_mm.models.internvl.vision import drop_path, drop_path_rates, pixel_shuffle_v2


def test_pixel_shuffle_matches_transformers():
    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(pixel_shuffle_v2(x, 0.5), HFInternVLModel.pixel_shuffle(None, x, scale_factor=0.5))


def test_drop_path_rates_follow_the_global_layer_index():
    rates = drop_path_rates(0.4, 24)
    assert rates[0] == 0.0 and abs(rates[-1] - 0.4) < 1e-12 and len(rates) == 24
    # InternVL's schedule: linspace(0, rate, num_layers)
    assert torch.allclose(torch.tensor(rates, dtype=torch.float64), torch.linspace(0, 0.4, 24, dtype=torch.float64))


def test_drop_path_drops_whole_samples_in_training_only():
    x = torch.ones(5, 64, 3)  # [s, b, h]
    torch.manual_seed(0)
    y = drop_path(x, 0.5, training=True)
    per_sample = y[0, :, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0} and (y == y[:1]).all()
    assert 0 < (per_sample == 0).sum() < 64
    assert torch.equal(drop_path(x, 0.5, training=False), x)
