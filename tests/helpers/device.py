"""The device the oracle tests compare on: CPU unless ``MM_TEST_DEVICE`` names another (``cuda``), so that the
same comparisons against transformers run on a GPU (``MM_TEST_DEVICE=cuda pytest tests/oracle/...``; what
benchmarks/gpu/run.sh does). The tolerances stay fp32's, so TF32 is turned off: cuDNN allows it by default
(the ViT's patch convolution), and its 10-bit mantissa alone is off by more than 1e-5."""
from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("MM_TEST_DEVICE", "cpu"))

if TEST_DEVICE.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def on_test_device(*xs):
    """Each tensor or module moved to TEST_DEVICE (None passes through); one argument gives one result."""
    out = tuple(x.to(TEST_DEVICE) if x is not None else None for x in xs)
    return out[0] if len(xs) == 1 else out
