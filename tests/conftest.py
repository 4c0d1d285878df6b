"""Shared fixtures. The device adaptor is applied at import, before any test builds megatron objects
(a no-op where CUDA is available)."""
import pytest

from mindspeed_mm.device import apply_device_adaptor

apply_device_adaptor()


@pytest.fixture
def megatron_single_rank():
    """A world of one process with megatron's groups at TP=PP=CP=1; torn down afterwards, so tests
    that need another layout can build their own."""
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def megatron_world():
    """As `megatron_single_rank`, shared by a module's tests (the oracle modules build many models in it)."""
    from mindspeed_mm.distributed import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(tp=1, pp=1, cp=1)
    yield
    destroy_distributed()
