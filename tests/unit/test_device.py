"""The device adaptor (mindspeed_mm.device) and process setup (mindspeed_mm.distributed), one process."""
import logging

import pytest
import torch
import torch.nn.functional as F

from mindspeed_mm import device
from mindspeed_mm.device import PATCH_GROUPS, AdaptorError, adaptor_applied, apply_device_adaptor, rewrite_function
from mindspeed_mm.distributed import LaunchEnv, initialize_model_parallel, parse_launch_env

needs_adaptor = pytest.mark.skipif(not adaptor_applied(), reason="CUDA host: the adaptor is a no-op")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # megatron tests run on both


# --- patch groups -------------------------------------------------------------------------------

def test_patch_groups_listed():
    assert PATCH_GROUPS == ("cuda_shim", "device_map", "rng", "p2p_order", "type_str", "no_apex_fixes",
                            "moe_cpu", "moe_no_te", "inference_fast_paths")
    assert device.CPU_ONLY_GROUPS == set(PATCH_GROUPS) - {"moe_no_te", "inference_fast_paths"}
    for name in PATCH_GROUPS:
        patcher = device._PATCHERS[name]
        assert patcher.__doc__ and len(patcher.__doc__) > 100, name


@needs_adaptor
def test_apply_is_idempotent():
    zeros, tensor_to = torch.zeros, torch.Tensor.to
    assert apply_device_adaptor() == PATCH_GROUPS
    assert apply_device_adaptor(force=True) == PATCH_GROUPS
    assert adaptor_applied()
    assert torch.zeros is zeros and torch.Tensor.to is tensor_to  # nothing wrapped twice


def test_unknown_group_rejected():
    with pytest.raises(ValueError, match="unknown patch groups"):
        apply_device_adaptor(force=True, groups=["no_such_group"])


def test_version_is_checked(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    with pytest.raises(AdaptorError, match="0.16.1.*0.99.0"):
        device._check_megatron_version()


# --- the source-rewrite helper -----------------------------------------------------------------

def test_rewrite_missing_pattern_names_the_function():
    from megatron.core.pipeline_parallel import p2p_communication

    with pytest.raises(AdaptorError) as err:
        rewrite_function(p2p_communication._p2p_ops, [("group.rank() % 2", "0"),
                                                      ("text that is not there", "x")])
    message = str(err.value)
    assert "megatron.core.pipeline_parallel.p2p_communication._p2p_ops" in message
    assert "text that is not there" in message and "device.py" in message


class _Base:
    def value(self):
        return 1


class _Child(_Base):
    @classmethod
    def kind(cls):
        return "child"

    def value(self):
        return super().value() + 10


def test_rewrite_keeps_super_decorators_and_names():
    value = rewrite_function(_Child.value, [("+ 10", "+ 20")], owner=_Child)
    assert value(_Child()) == 21 and value.__qualname__ == "_Child.value"
    kind = rewrite_function(_Child.__dict__["kind"].__func__, [('"child"', '"rewritten"')], _Child)
    assert isinstance(kind, classmethod) and kind.__get__(None, _Child)() == "rewritten"


# --- cuda_shim and device_map ---------------------------------------------------------------------

@needs_adaptor
def test_cuda_calls_run_on_cpu():
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query() and event.elapsed_time(event) == 0.0
    torch.cuda.nvtx.range_push("x")
    torch.cuda.nvtx.range_pop()
    t = torch.ones(2)
    t.record_stream(stream)
    assert t.cuda() is t and t.pin_memory() is t


@needs_adaptor
def test_device_map():
    for dev in ("cuda", "cuda:1", 0, torch.device("cuda", 0), torch.cuda.current_device()):
        assert torch.zeros(2, device=dev).device.type == "cpu"
        assert torch.ones(1).to(dev).device.type == "cpu"
        assert torch.ones(1).to(device=dev, dtype=torch.half).dtype == torch.half
    assert torch.empty(1, device="meta").device.type == "meta"  # only CUDA is remapped
    assert torch.arange(3, pin_memory=True).tolist() == [0, 1, 2]
    assert torch.ones(1).to(torch.float64).dtype == torch.float64
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    with torch.device("meta"):  # the device context still reaches the wrapped factories
        assert torch.zeros(2).device.type == "meta" and torch.tensor([1.0]).device.type == "meta"


# --- rng --------------------------------------------------------------------------------------------

@needs_adaptor
def test_rng_state_set_really_sets(megatron_single_rank):
    from megatron.core.tensor_parallel import random as mrandom

    state = mrandom._get_cuda_rng_state()
    a = torch.rand(4)
    mrandom._set_cuda_rng_state(state)  # unpatched: queued in a _lazy_call that never runs
    assert torch.equal(torch.rand(4), a)


@needs_adaptor
def test_rng_tracker_forks_cpu_generator(megatron_single_rank, caplog):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert set(tracker.get_states()) == {"data-parallel-rng", "model-parallel-rng",
                                         "expert-parallel-rng"}
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        with tracker.fork():
            first = F.dropout(torch.ones(64), 0.5)
        with tracker.fork():
            second = F.dropout(torch.ones(64), 0.5)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    assert not torch.equal(first, second)  # the tracked stream advanced
    assert "RNG state changed" not in caplog.text
    initialize_model_parallel(seed=1234)  # the same seed replays the same tracked stream
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(F.dropout(torch.ones(64), 0.5), first)


@needs_adaptor
def test_recompute_replays_dropout(megatron_single_rank):
    from megatron.core import tensor_parallel

    def block(x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, 0.5) * x

    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    x = torch.randn(64, requires_grad=True)
    y = tensor_parallel.checkpoint(block, False, x)  # backward re-runs block with the saved states
    y.sum().backward()
    grad, x.grad = x.grad, None
    tracker.set_states(states)
    y_ref = block(x)
    y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(grad, x.grad)


# --- p2p_order ------------------------------------------------------------------------------------

class _FakeGroup:
    def __init__(self, rank):
        self._rank = rank

    def rank(self):
        return self._rank


@needs_adaptor
@pytest.mark.parametrize("use_patch", [True, False])
def test_p2p_order_pairs_messages_at_pp2(monkeypatch, use_patch):
    """Simulate gloo: between two ranks, the k-th send is received by the k-th posted receive."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import p2p_communication

    batched = p2p_communication._batched_p2p_ops
    assert batched is device._ordered_batched_p2p_ops
    if not use_patch:
        batched = batched.__mm_original__
    posted, received = {}, {}
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, group: (op, tensor))
    for rank in (0, 1):
        monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops, rank=rank: posted.update({rank: ops}))
        received[rank] = {"prev": torch.zeros(1), "next": torch.zeros(1)}
        # Interleaved schedule at PP=2: an activation goes forward (> 0), a gradient back (< 0).
        batched(tensor_send_next=torch.tensor([rank + 1.0]), tensor_recv_prev=received[rank]["prev"],
                tensor_send_prev=torch.tensor([-rank - 1.0]), tensor_recv_next=received[rank]["next"],
                group=_FakeGroup(rank), prev_pipeline_rank=1 - rank, next_pipeline_rank=1 - rank)
    for src, dst in ((0, 1), (1, 0)):
        sends = [t for op, t in posted[src] if op is dist.isend]
        recvs = [t for op, t in posted[dst] if op is dist.irecv]
        for sent, buffer in zip(sends, recvs):
            buffer.copy_(sent)
    paired = all(received[r]["prev"].item() > 0 > received[r]["next"].item() for r in (0, 1))
    assert paired == use_patch  # megatron's own order swaps activations and gradients


@needs_adaptor
def test_p2p_order_also_orders_the_shape_exchange():
    """Pipelines with variable_seq_lengths exchange shapes first through a second posting routine; the
    behaviour is proven by tests/multirank/test_layouts.py (PP2 x VPP2 with changing boundary shapes)."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    assert P2PCommunicator._communicate_shapes is device._ordered_communicate_shapes
    assert device._ordered_communicate_shapes.__mm_original__.__qualname__ == "P2PCommunicator._communicate_shapes"


# --- type_str and no_apex_fixes -------------------------------------------------------------------

def _tiny_gpt(num_layers=2):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # megatron records the attention backend in NVTE_* variables once per process and asserts that
        # every later model agrees: use the backend every model of ours uses.
        attention_backend=AttnBackend.local)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=64, max_sequence_length=8, position_embedding_type="rope")
    return config, model.to(DEV)


def _gpt_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, labels = (torch.randint(0, 64, (2, 8), generator=g).to(DEV) for _ in range(2))
    return model(tokens, torch.arange(8, device=DEV).expand(2, 8), None, labels=labels).mean()


@needs_adaptor
def test_clip_grads_accepts_cpu_fp32():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)


def _distributed_adam(model, config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True),
                                 [ddp])
    return ddp, getattr(opt, "chained_optimizers", [opt])[0]


@needs_adaptor
def test_distributed_optimizer_resumes_adam_step(megatron_single_rank):
    config, model = _tiny_gpt()
    ddp, opt = _distributed_adam(model, config)
    assert opt.state_dict()["optimizer"]["param_groups"][0]["step"] == 0  # fresh: was an assert

    def train_step(ddp, opt):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _gpt_loss(ddp).backward()
        ddp.finish_grad_sync()
        assert opt.step()[0]

    for _ in range(2):
        train_step(ddp, opt)
    saved = opt.state_dict()
    assert saved["optimizer"]["param_groups"][0]["step"] == 2

    resumed_ddp, resumed = _distributed_adam(_tiny_gpt()[1], config)
    resumed.load_state_dict(saved)
    steps = [s["step"] for s in resumed.optimizer.state.values()]
    assert len({id(s) for s in steps}) == len(steps) > 1  # was one shared tensor
    for model_param in resumed.model_param_group_index_map:  # was KeyError 'step'
        twin = next(p for p in opt.model_param_group_index_map if p.shape == model_param.shape)
        tensors = opt._get_main_param_and_optimizer_states(twin)
        resumed._set_main_param_and_optimizer_states(
            model_param, {k: v for k, v in tensors.items() if k != "step"})
    train_step(resumed_ddp, resumed)  # torch Adam adds 1 to each param's own step
    assert {s["step"].item() for s in resumed.optimizer.state.values()} == {3.0}


# --- inference_fast_paths ----------------------------------------------------------------------------

def test_rotated_key_hook_matches_megatron_rope():
    """flash_decode rotates keys through rope_utils' flash-attn hook; without flash-attn megatron's fallback
    gives other numbers, so the group fills the hook with a torch version of flash-attn's function."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.apply_rotary_emb_flash is not device._rotary_cos_sin:
        pytest.skip("flash-attn is installed: megatron uses its own kernel")
    theta = torch.randn(5, 4)
    t = torch.randn(5, 2, 3, 10)  # [s, b, heads, d]: 8 dims rotate, 2 pass through
    ref = rope_utils._apply_rotary_pos_emb_bshd(t, torch.cat([theta, theta], -1)[:, None, None, :])
    assert torch.allclose(rope_utils.apply_rotary_pos_emb_with_cos_sin(t, theta.cos(), theta.sin()), ref,
                          atol=1e-6)


# --- megatron on one rank ---------------------------------------------------------------------------

def test_column_parallel_linear_matches_torch(megatron_single_rank):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False)
    layer = ColumnParallelLinear(8, 6, config=config, init_method=torch.nn.init.normal_, bias=True,
                                 gather_output=True).to(DEV)
    x = torch.randn(3, 2, 8, device=DEV, requires_grad=True)
    y, _ = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    assert torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()
    assert torch.allclose(layer.weight.grad, x.detach().flatten(0, 1).sum(0).expand(6, 8),
                          atol=1e-5)


def test_gpt_model_forward_backward(megatron_single_rank):
    _, model = _tiny_gpt()
    loss = _gpt_loss(model)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 1.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    initialize_model_parallel(seed=1234)  # same seed and CPU init: the same model and loss
    assert _gpt_loss(_tiny_gpt()[1]).item() == loss.item()


# --- launch environment -----------------------------------------------------------------------------

def test_env_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert parse_launch_env(env) == LaunchEnv(3, 4, 1, "10.0.0.1", 1234, "torchrun")


def test_env_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.2"}
    assert parse_launch_env(env) == LaunchEnv(5, 8, 1, "10.0.0.2", 29500, "slurm")
    env.update(MASTER_ADDR="node01", MASTER_PORT="4000")
    assert parse_launch_env(env) == LaunchEnv(5, 8, 1, "node01", 4000, "slurm")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        parse_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_env_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    with pytest.raises(ValueError, match="OpenMPI.*MASTER_ADDR"):  # two nodes: no default master
        parse_launch_env(env)
    env["MASTER_ADDR"] = "10.0.0.3"
    assert parse_launch_env(env) == LaunchEnv(2, 4, 0, "10.0.0.3", 29500, "openmpi")
    local = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert parse_launch_env(local) == LaunchEnv(1, 2, 1, "127.0.0.1", 29500, "openmpi")


def test_env_single_process():
    assert parse_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", None, "single")


@needs_adaptor
def test_moe_groups_give_numpy_split_sizes_and_a_router_without_te():
    import numpy as np
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 1]  # all_to_all_single takes these
    counts = torch.tensor([3, 1])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)  # NameError without moe_no_te
    out.sum().backward()
    torch.testing.assert_close(out, x @ w.t())
    torch.testing.assert_close(w.grad, torch.ones(5, 3).t() @ x)
