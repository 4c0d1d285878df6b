"""Device adaptor: run megatron-core 0.16.1 unchanged on CPU + gloo.

megatron-core assumes CUDA: it allocates on ``torch.cuda.current_device()``, synchronizes streams,
keeps its RNG states on the GPU generator and checks ``param.type() == 'torch.cuda.FloatTensor'``.
Like MindSpeed adapts Megatron to NPUs, this module patches those assumptions, in named groups
(``PATCH_GROUPS``), each documented with what it replaces and why. Apply it first thing in every
entry point, before any model is built. With CUDA available only the groups for any device are applied
(those not in ``CPU_ONLY_GROUPS``: generation fast paths), unless forced (tests).

``device_map`` rebinds torch's factory functions process-wide rather than pushing a
``torch.overrides.TorchFunctionMode``: a mode is entered for every torch call and tensor attribute read,
not only factories, and that Python call per op slows the small-model CPU steps this project runs (tests,
decoding) far beyond what the rebinding costs; it would also be thread-local, so threads would miss it.

It is tied to megatron-core's source: the version is checked, and every source rewrite asserts that
its pattern is still there, so an upgrade fails here, loudly, instead of computing something else.
"""
from __future__ import annotations

import __future__
import contextlib
import functools
import inspect
import sys
import textwrap
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

EXPECTED_MEGATRON_VERSION = "0.16.1"
PATCH_GROUPS = ("cuda_shim", "device_map", "rng", "p2p_order", "type_str", "no_apex_fixes", "moe_cpu",
                "moe_no_te", "inference_fast_paths")
CPU_ONLY_GROUPS = frozenset(PATCH_GROUPS) - {"moe_no_te", "inference_fast_paths"}
_applied: list[str] = []


class AdaptorError(RuntimeError):
    """megatron-core is not the version/source this adaptor was written against."""


def rewrite_function(fn: Callable, replacements: Sequence[tuple[str, str]], owner: type | None = None):
    """Recompile ``fn`` from its source with each ``(old, new)`` text replacement applied.

    Raises AdaptorError naming the function if any ``old`` is missing. ``owner`` is the class for
    methods that use zero-argument ``super()``. Decorators in the source are re-applied, so a
    ``@classmethod`` comes back as a classmethod object.
    """
    target = inspect.unwrap(fn)
    where = f"{target.__module__}.{target.__qualname__}"
    try:
        src = textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError) as e:
        raise AdaptorError(f"device adaptor: cannot read the source of {where}: {e}") from e
    for old, new in replacements:
        if old not in src:
            raise AdaptorError(
                f"device adaptor: {where} no longer contains {old!r}; megatron-core changed and "
                f"mindspeed_mm/device.py must be updated (written for {EXPECTED_MEGATRON_VERSION})")
        src = src.replace(old, new)
    # The factory's `__class__` argument becomes the closure cell that zero-argument super() reads.
    # Leading newlines keep traceback line numbers equal to those in megatron's file.
    first_line = target.__code__.co_firstlineno
    factory = "\n" * max(first_line - 2, 0) + "def _factory(__class__):\n"
    factory += f"{textwrap.indent(src, '    ')}    return {target.__name__}\n"
    code = compile(factory, f"<device.py rewrite of {where}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    namespace: dict = {}
    exec(code, target.__globals__, namespace)  # noqa: S102 - our own rewrite of installed source
    new = namespace["_factory"](owner)
    inner = getattr(new, "__func__", new)
    for f in {inner, inspect.unwrap(inner)}:
        f.__qualname__ = target.__qualname__
    return new


def _rebind(old, new) -> None:
    """Replace a module-level function everywhere megatron imported it by name."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("megatron"):
            for name, value in list(vars(module).items()):
                if value is old:
                    setattr(module, name, new)


def _noop(*args, **kwargs):
    return None


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered, so all calls are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # wait_stream, wait_event, record, synchronize, ...
        return _noop

    def query(self):
        return True

    def record_event(self, event=None):
        return event or _NoStream()

    def elapsed_time(self, other):
        return 0.0


def _patch_cuda_shim() -> None:
    """Replaces torch.cuda.current_device (-> "cpu"), synchronize, set_stream, Stream, Event,
    ExternalStream, current_stream, default_stream, stream, nvtx.range_push/range_pop/mark and
    Tensor.record_stream. megatron-core calls these unconditionally (~175 current_device sites used as
    `device=`, ~32 synchronize sites: GlobalMemoryBuffer, RoPE, p2p, grad buffers, timers,
    update_pg_timeout, checkpoint writers); a CPU build of torch raises on each of them."""
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = cuda.set_stream = _noop
    cuda.Stream = cuda.Event = cuda.ExternalStream = _NoStream
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = cuda.nvtx.range_pop = cuda.nvtx.mark = _noop
    torch.Tensor.record_stream = _noop


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
              "randint_like", "eye", "linspace", "as_tensor", "empty_strided", "randperm")


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # megatron passes device indices
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)
    return wrapper


def _patch_device_map() -> None:
    """Maps device="cuda"/"cuda:N"/int to CPU in torch's factory functions (_FACTORIES), turns
    pin_memory=True off, makes Tensor.cuda()/Tensor.pin_memory() return self and Tensor.to("cuda")
    stay on CPU. megatron-core hard-codes device="cuda" (causal masks, schedules' loss buffers,
    p2p receive buffers, broadcast_data, optimizer) and pins RoPE buffers; pinning needs CUDA.
    This is what torch_npu.contrib.transfer_to_npu does for NPUs."""
    # torch's device context manager (`with torch.device("meta")`, used by transformers' loaders) finds
    # factories by identity in a lazily cached set: fill that cache with the real builtins before the
    # wrappers replace them, or the context silently stops applying to torch.tensor & co.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    tensor_to = torch.Tensor.to

    @functools.wraps(tensor_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_rng() -> None:
    """Keeps megatron's tracked RNG states (tensor_parallel.random) in the CPU default generator,
    which is the generator CPU dropout draws from. Replaces _get_cuda_rng_state and
    _set_cuda_rng_state (the original setter queues a torch.cuda._lazy_call that never runs on
    CPU: setting the state silently does nothing), CudaRNGStatesTracker.add (reads
    torch.cuda.get_rng_state), CudaRNGStatesTracker.fork (its "CPU RNG state changed" warning
    would fire on every fork, since the tracked state *is* the CPU one) and
    model_parallel_cuda_manual_seed (seeds the CUDA generator, a silent no-op here)."""
    from megatron.core.tensor_parallel import random as mrandom

    for name, new in (("_get_cuda_rng_state", _cpu_get_rng_state),
                      ("_set_cuda_rng_state", _cpu_set_rng_state)):
        _rebind(getattr(mrandom, name), new)
    tracker = mrandom.CudaRNGStatesTracker
    # The CPU-only generator: torch.manual_seed would also reseed CUDA when forced on a GPU host.
    tracker.add = rewrite_function(tracker.add, [
        ("torch.cuda.get_rng_state()", "torch.get_rng_state()"),
        ("torch.cuda.manual_seed(seed)", "torch.default_generator.manual_seed(seed)")])
    tracker.fork = rewrite_function(tracker.fork, [(
        "if not torch.all(cpu_rng_state == torch.get_rng_state()).item():",
        "if False:  # the forked state is the CPU generator's own")])
    seed_fn = mrandom.model_parallel_cuda_manual_seed
    _rebind(seed_fn, rewrite_function(seed_fn, [(
        "torch.cuda.manual_seed(data_parallel_seed)",
        "torch.default_generator.manual_seed(data_parallel_seed)")]))


def _ordered_batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next,
                             tensor_recv_next, group, prev_pipeline_rank, next_pipeline_rank):
    send_next = (dist.isend, tensor_send_next, next_pipeline_rank)
    recv_prev = (dist.irecv, tensor_recv_prev, prev_pipeline_rank)
    send_prev = (dist.isend, tensor_send_prev, prev_pipeline_rank)
    recv_next = (dist.irecv, tensor_recv_next, next_pipeline_rank)
    if group.rank() % 2 == 0:  # the same even/odd order as p2p_communication._p2p_ops
        order = (send_next, recv_prev, send_prev, recv_next)
    else:
        order = (recv_prev, send_next, recv_next, send_prev)
    ops = [dist.P2POp(op, tensor, peer, group) for op, tensor, peer in order if tensor is not None]
    return dist.batch_isend_irecv(ops) if ops else []


def _patch_p2p_order() -> None:
    """Replaces p2p_communication._batched_p2p_ops (used when config.batch_p2p_comm, the default).
    gloo pairs messages between two ranks in posting order, and the original posts
    [send_prev, recv_prev, send_next, recv_next] on every rank. At PP=2 prev == next, so a rank's
    recv_prev receives the peer's send_prev: activations and gradients are silently swapped in the
    interleaved (VPP) schedule. The replacement posts in _p2p_ops' even/odd order, which pairs
    every send with its matching receive. The original stays at ``__mm_original__``."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    _ordered_batched_p2p_ops.__mm_original__ = p2p._batched_p2p_ops
    _rebind(p2p._batched_p2p_ops, _ordered_batched_p2p_ops)
    # With variable_seq_lengths (pipelines whose boundary tensors change shape, as ours do) the shapes
    # go first, posted by _communicate_shapes in the same bad order: route them through the fix too.
    _ordered_communicate_shapes.__mm_original__ = p2p.P2PCommunicator._communicate_shapes
    p2p.P2PCommunicator._communicate_shapes = _ordered_communicate_shapes


def _ordered_communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    if self.config.use_ring_exchange_p2p:
        return _ordered_communicate_shapes.__mm_original__(self, tensor_send_next, tensor_send_prev,
                                                           recv_prev, recv_next)
    shape = lambda t: None if t is None else torch.tensor(t.size(), dtype=torch.int64)  # noqa: E731
    recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
    for req in _ordered_batched_p2p_ops(
            tensor_send_prev=shape(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
            tensor_send_next=shape(tensor_send_next), tensor_recv_next=recv_next_shape,
            group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank):
        req.wait()
    return (recv_prev_shape.tolist() if recv_prev else [0, 0, 0],
            recv_next_shape.tolist() if recv_next else [0, 0, 0])


_FLOAT = ("'torch.cuda.FloatTensor'", "'torch.FloatTensor'")
_HALF = ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'")
_BF16 = ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'")


def _patch_type_str() -> None:
    """Recompiles functions that accept parameters by comparing ``param.type()`` with the CUDA type
    strings, with the CPU ones instead: clip_grads.clip_grad_by_total_norm_fp32 (assert; also
    rebound in optimizer.py), DistributedOptimizer._build_model_and_main_param_groups (TypeError)
    and DistributedOptimizer.__init__ (fp16 params get no main_param), and
    Float16OptimizerWithFloat16Params.__init__ (TypeError)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    clip = clip_grads.clip_grad_by_total_norm_fp32
    _rebind(clip, rewrite_function(clip, [_FLOAT]))
    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    DistributedOptimizer._build_model_and_main_param_groups = rewrite_function(
        build, [_FLOAT, _HALF, _BF16], DistributedOptimizer)
    DistributedOptimizer.__init__ = rewrite_function(
        DistributedOptimizer.__init__, [_HALF, _BF16], DistributedOptimizer)
    Float16OptimizerWithFloat16Params.__init__ = rewrite_function(
        Float16OptimizerWithFloat16Params.__init__, [_FLOAT, _HALF, _BF16],
        Float16OptimizerWithFloat16Params)


def _patch_no_apex_fixes() -> None:
    """Fixes DistributedOptimizer's torch-Adam path (taken without apex/TransformerEngine):
    state_dict asserted exactly one 'step' value, so a fresh optimizer (no state yet) could not give
    the template for loading a checkpoint; _set_main_param_and_optimizer_states raised KeyError 'step'
    (optimizer state has it, the checkpoint tensors do not) and copied in place into views of leaves
    that require grad; load_state_dict gave one shared `step` tensor to every parameter, which torch
    Adam increments once per parameter, so resumed bias corrections were silently wrong."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    DO.state_dict = rewrite_function(DO.state_dict, [
        ("assert len(steps) == 1\n", "assert len(steps) <= 1\n"),
        ("step = steps[0]\n", "step = steps[0] if steps else 0\n")], DO)
    DO._set_main_param_and_optimizer_states = rewrite_function(
        DO._set_main_param_and_optimizer_states, [
            ('dst_tensors = {"param": main_param, **optim_state}',
             'dst_tensors = {"param": main_param, '
             '**{k: v for k, v in optim_state.items() if k != "step"}}'),
            ("dst_tensors[key].copy_(tensors[key])", "dst_tensors[key].detach().copy_(tensors[key])")],
        DO)
    DO.load_state_dict = rewrite_function(
        DO.load_state_dict, [('s["step"] = step\n', 's["step"] = step.clone()\n')], DO)


def _uneven_all_gather(tensor_list: list, tensor: torch.Tensor, group=None) -> None:
    """torch.distributed.all_gather for first dimensions that differ by rank, which gloo refuses: every rank
    sends its tensor padded to the longest, and keeps each rank's own rows."""
    longest = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    dist.all_gather(gathered, padded, group=group)
    for out, got in zip(tensor_list, gathered):
        out.copy_(got[:out.shape[0]])


def _patch_moe_cpu() -> None:
    """What MoEAlltoAllTokenDispatcher needs on CPU/gloo.

    moe_utils.maybe_move_tensor_to_cpu (rebound in token_dispatcher) turns the per-rank token counts
    (input_splits, output_splits, output_splits_tp) into the numpy split sizes of all_to_all_single, but
    only from CUDA tensors; on CPU they stay tensors, which all_to_all_single's binding rejects (TypeError).
    The rewrite converts a CPU tensor too when numpy is asked for, as the CUDA path ends up.

    With expert tensor parallelism the dispatcher gathers tokens over the expert-TP group in uneven shares
    (tensor_parallel.mappings._gather_along_first_dim with split sizes). gloo has no uneven all_gather
    ("invalid tensor size"): the rewrite routes that call through `_uneven_all_gather` (padded, equal
    sizes); the equal-split call is untouched. The backward's uneven reduce_scatter works on gloo as it is."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher  # noqa: F401 - rebound below

    move = moe_utils.maybe_move_tensor_to_cpu
    _rebind(move, rewrite_function(move, [(
        "if torch.is_tensor(tensor) and tensor.is_cuda:",
        "if torch.is_tensor(tensor) and (tensor.is_cuda or as_numpy):")]))
    mappings._mm_uneven_all_gather = _uneven_all_gather
    gather = mappings._gather_along_first_dim
    _rebind(gather, rewrite_function(gather, [(
        "torch.distributed.all_gather(output_tensor_list, input_, group=group)",
        "_mm_uneven_all_gather(output_tensor_list, input_, group=group)")]))


def _patch_moe_no_te() -> None:
    """megatron-core's MoE router without TransformerEngine, on every device (a no-op where TE is installed).
    moe_utils imports ``te_general_gemm`` inside its ``try: import transformer_engine`` block and
    RouterGatingLinearFunction, the router's linear, tests ``te_general_gemm is not None`` unconditionally,
    so without TE every router forward raises NameError, on CUDA as on CPU. The name is defined as None,
    which selects the function's own torch.mm path. The block's other TE names (fused permute, top-k, aux
    loss) are reached only behind config flags that need TE (moe_permute_fusion, moe_router_fusion)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _rotary_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """flash-attn's `apply_rotary_emb` in torch: x [b, s, heads, d], cos/sin [s, r/2]; the first r dims rotate
    (rotate-half pairs), the rest pass through. The same products as megatron's own RoPE
    (x * [cos, cos] + [-x2, x1] * [sin, sin]), written per half so that no cos/sin copy is built."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE (Qwen2 is not interleaved)")
    half = cos.shape[-1]
    cos, sin = (t[None, :, None, :].to(x.dtype) for t in (cos, sin))
    x1, x2, x_pass = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return torch.cat(parts + [x_pass] if x_pass.shape[-1] else parts, dim=-1)


def _patch_inference_fast_paths() -> None:
    """Generation fast paths, on every device (not CPU-only). Process-wide it only fills
    rope_utils.apply_rotary_emb_flash when flash-attn is missing: generation chunks run with
    config.flash_decode (the KV cache holds keys with RoPE applied), and megatron's fallback for that
    hook feeds the cos/sin values to cos() and sin() again, giving wrong numbers; `_rotary_cos_sin` is
    flash-attn's function in torch. Training never sets flash_decode, so it never reaches the hook.
    The rest is per chunk, in `use_generation_fast_paths`, because training must keep megatron's
    autograd linears: it switches the chunk's LLM to flash_decode (megatron otherwise caches keys
    unrotated and re-applies RoPE to the whole cache in every layer at every step), memoizes GPTModel's
    per-length cos/sin tables and gives its tensor-parallel linears a plain F.linear forward."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.apply_rotary_emb_flash is None:
        rope_utils.apply_rotary_emb_flash = _rotary_cos_sin


def use_generation_fast_paths(chunk: torch.nn.Module) -> None:
    """The per-chunk half of ``inference_fast_paths``, for a chunk that only generates (eval, no backward)."""
    apply_device_adaptor(groups=("inference_fast_paths",))
    _use_plain_linears(chunk)
    decoder = getattr(chunk, "text_decoder", None)
    if decoder is not None:
        # Never switched to decode mode, so megatron's flash decoding kernel (flash-attn, CUDA) is not called
        # and attention stays the model's core attention: only the rotated-key cache is taken.
        decoder.config.flash_decode = True
        _memoize_rope_tables(decoder)


def _memoize_rope_tables(gpt) -> None:
    # GPTModel caches the flash-decode tables with `cache.setdefault(n, get_cos_sin(n))`, which computes them
    # again at every step anyway (3% of a CPU decode step); they depend on the length alone.
    rope = gpt.rotary_pos_emb
    compute, tables = rope.get_cos_sin, {}

    def get_cos_sin(max_seq_len: int, offset: int = 0):
        if getattr(rope, "ntk_seq_len", None) is not None:
            # dynamic-NTK RoPE beyond max_position_embeddings (models.internvl.rope): the tables change with
            # the length at every step, so keeping them would only grow the memo
            return compute(max_seq_len, offset)
        key = (max_seq_len, offset)
        if key not in tables:
            tables[key] = compute(max_seq_len, offset)
        return tables[key]

    rope.get_cos_sin = get_cos_sin


def _inference_linear(input, weight, bias=None, sequence_parallel: bool = False, **_):
    # Without SP the forward is the local matmul alone (TP communication sits outside `_forward_impl`), and the
    # autograd Function's wrapping costs ~15 us per call, a tenth of a CPU decode step of a small model.
    if sequence_parallel:
        raise AssertionError("sequence parallelism is not used at inference")
    return torch.nn.functional.linear(input, weight, bias)


def _use_plain_linears(chunk: torch.nn.Module) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    tp1 = parallel_state.get_tensor_model_parallel_world_size() == 1
    for module in chunk.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and not module.sequence_parallel:
            module._forward_impl = _inference_linear
            if tp1:
                # without TP the scatter/gather/reduce around the matmul are identities, each still an
                # autograd Function call (~5 us): the whole layer is one F.linear
                module.forward = functools.partial(_tp1_linear_forward, module)


def _tp1_linear_forward(module, input_, weight=None, runtime_gather_output=None):
    """Column/RowParallelLinear.forward at TP1 without SP: (output, bias returned separately or None)."""
    w = module.weight if weight is None else weight
    bias = getattr(module, "bias", None)
    if module.skip_bias_add:
        return torch.nn.functional.linear(input_, w), bias
    return torch.nn.functional.linear(input_, w, bias), None


_PATCHERS = {"cuda_shim": _patch_cuda_shim, "device_map": _patch_device_map, "rng": _patch_rng,
             "p2p_order": _patch_p2p_order, "type_str": _patch_type_str,
             "no_apex_fixes": _patch_no_apex_fixes, "moe_cpu": _patch_moe_cpu, "moe_no_te": _patch_moe_no_te,
             "inference_fast_paths": _patch_inference_fast_paths}


def _check_megatron_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != EXPECTED_MEGATRON_VERSION:
        raise AdaptorError(
            f"mindspeed_mm.device is written for megatron-core=={EXPECTED_MEGATRON_VERSION}, found "
            f"{package_info.__version__}; its patches rewrite that version's source")


def apply_device_adaptor(force: bool = False, groups: Iterable[str] | None = None) -> tuple[str, ...]:
    """Apply the patch groups (all by default); idempotent. Returns the groups applied so far.

    With CUDA available the CPU_ONLY_GROUPS are skipped unless ``force`` (tests of the adaptor on a GPU host).
    """
    wanted = PATCH_GROUPS if groups is None else tuple(groups)
    unknown = set(wanted) - set(PATCH_GROUPS)
    if unknown:
        raise ValueError(f"unknown patch groups {sorted(unknown)}; known: {PATCH_GROUPS}")
    if torch.cuda.is_available() and not force:
        wanted = tuple(g for g in wanted if g not in CPU_ONLY_GROUPS)
    todo = [g for g in PATCH_GROUPS if g in wanted and g not in _applied]
    if todo:
        _check_megatron_version()
    for name in todo:
        _PATCHERS[name]()
        _applied.append(name)
    return tuple(g for g in PATCH_GROUPS if g in _applied)


def adaptor_applied() -> bool:
    """True once every patch group is applied."""
    return all(g in _applied for g in PATCH_GROUPS)
