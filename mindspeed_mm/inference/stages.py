"""One forward pass through this rank's pipeline stages, for generation.

Training runs the same chunks through megatron's schedules; generation needs something simpler and
different: one micro-batch, no backward, a KV cache in the LLM, the ViT only on the prefill step, and the
chosen token shared by every rank. So each rank walks the flat stage order (`vpp_rank * pp + pp_rank`) and
passes the one boundary tensor on with plain send/recv; a header carries its shape and dtype, because it is
ViT hidden states, image features or LLM hidden states depending on the stage and the step.

Every rank holds the same requests (prompt ids, pixels, mask), so all of them agree on which stages run:
without images to encode (text prompts, decode steps) the ViT-only stages sit out and the LLM's first stage
starts the pass.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.models.internvl.model import InternVLModel

__all__ = ["StageRunner", "use_rotated_key_cache"]

_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS = 4


def _send(t: Tensor, dst: int) -> None:
    t = t.contiguous()
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"boundary tensor of {t.dim()} dims (at most {_MAX_DIMS})")
    shape = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
    header = torch.tensor([_WIRE_DTYPES.index(t.dtype), t.dim(), *shape], dtype=torch.long, device=t.device)
    dist.send(header, dst)
    dist.send(t, dst)


def _recv(src: int, device: torch.device) -> Tensor:
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.long, device=device)
    dist.recv(header, src)
    code, ndim, *shape = header.tolist()
    t = torch.empty(shape[:ndim], dtype=_WIRE_DTYPES[code], device=device)
    dist.recv(t, src)
    return t


def _rotary_cos_sin(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
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


def use_rotated_key_cache(decoder_config) -> None:
    """Make megatron's static KV cache hold keys with RoPE already applied, as its `flash_decode` option does.

    Without it, megatron caches keys unrotated and re-applies RoPE to the whole cache in every layer at every
    step (cos, sin and products over all cached positions): 15% of a decode step at 300 cached tokens on CPU,
    more on longer prompts. With `flash_decode` the prompt's and each new token's keys are rotated once, by
    cos/sin tables computed once per step. We never switch the context to decode mode, so megatron's flash
    decoding kernel (flash-attn, CUDA) is not called and attention stays our core attention. Where flash-attn
    is missing, megatron's fallback for the rotation feeds cos/sin values to cos() and sin() again (wrong
    numbers), so its hook takes a torch version of flash-attn's rotary function."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.apply_rotary_emb_flash is None:
        rope_utils.apply_rotary_emb_flash = _rotary_cos_sin
    decoder_config.flash_decode = True


def memoize_rope_tables(gpt) -> None:
    """megatron's GPTModel caches the flash-decode cos/sin tables with `cache.setdefault(n, get_cos_sin(n))`,
    which computes them (cos and sin over every position up to the cache length) again at every step anyway:
    3% of a CPU decode step. The tables depend on the length alone, so compute each once."""
    rope = gpt.rotary_pos_emb
    compute, tables = rope.get_cos_sin, {}

    def get_cos_sin(max_seq_len: int, offset: int = 0):
        key = (max_seq_len, offset)
        if key not in tables:
            tables[key] = compute(max_seq_len, offset)
        return tables[key]

    rope.get_cos_sin = get_cos_sin


def _inference_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, sequence_parallel: bool = False,
                      **_) -> Tensor:
    """The forward of megatron's tensor-parallel linears without their autograd Function: with no sequence
    parallelism the forward is the local matmul alone (the TP communication sits outside `_forward_impl`), and
    the Function's wrapping costs ~15 us per call, a tenth of a CPU decode step of a small model."""
    if sequence_parallel:
        raise AssertionError("sequence parallelism is not used at inference")
    return torch.nn.functional.linear(input, weight, bias)


def use_plain_linears(chunk: torch.nn.Module) -> None:
    """Give every Column/RowParallelLinear of a generation-only chunk the plain forward (`_inference_linear`)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    tp1 = parallel_state.get_tensor_model_parallel_world_size() == 1
    for module in chunk.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and not module.sequence_parallel:
            module._forward_impl = _inference_linear
            if tp1:
                # without TP the scatter/gather/reduce around the matmul are identities, each still an
                # autograd Function call (~5 us): the whole layer is one F.linear
                module.forward = functools.partial(_tp1_linear_forward, module)


def _tp1_linear_forward(module, input_: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
    """Column/RowParallelLinear.forward at TP1 without SP: (output, bias returned separately or None)."""
    w = module.weight if weight is None else weight
    bias = getattr(module, "bias", None)
    if module.skip_bias_add:
        return torch.nn.functional.linear(input_, w), bias
    return torch.nn.functional.linear(input_, w, bias), None


class StageRunner:
    """This rank's model chunks (one per virtual stage) and how a forward crosses the pipeline. It switches the
    chunks' LLM config to the rotated-key cache (`use_rotated_key_cache`) and their linears to a plain forward
    (`use_plain_linears`): chunks for generation only."""

    def __init__(self, chunks: list[InternVLModel]):
        self.chunks = sorted(chunks, key=lambda c: c.stage.stage)
        self.plan = self.chunks[0].plan
        self.spec = self.chunks[0].spec
        pp = self.plan.parallel.pp
        self.pp = pp
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
        self.num_stages = len(self.plan.stages)
        self.llm_first = next(s.stage for s in self.plan.stages if s.has_llm_embed)
        param = next(self.chunks[0].parameters())
        self.device, self.dtype = param.device, param.dtype
        self._features: Tensor | None = None  # image features at the LLM's first stage (recompute steps)
        for chunk in self.chunks:
            use_plain_linears(chunk)
            if chunk.text_decoder is not None:
                use_rotated_key_cache(chunk.text_decoder.config)
                memoize_rope_tables(chunk.text_decoder)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ---------------------------------------------------------------------------------------- a forward
    @torch.inference_mode()
    def forward(self, ids: Tensor, *, pixel_values: Tensor | None = None, splice_len: int = 0,
                attention_mask: Tensor | None = None, context=None, reuse_images: bool = False
                ) -> Tensor | None:
        """Logits of the last position, [b, vocab] (the full vocabulary on every TP rank), on the last pipeline
        rank; None on the others.

        ids [b, s]: the first `splice_len` columns take the image features (the prompt), the rest are plain
        token embeddings (generated tokens). `pixel_values` are the prompt's tiles; with `reuse_images` the
        features of the previous call are spliced again instead of running the ViT (recomputation).
        `attention_mask` [b, 1, sq, sk] bool, True = masked, or None for plain causal. `context`: megatron's
        StaticInferenceContext (KV cache), or None to compute the whole sequence."""
        has_images = pixel_values is not None
        run_vit = has_images and not reuse_images
        first = 0 if run_vit else self.llm_first
        x: Tensor | None = None
        for chunk in self.chunks:
            s = chunk.stage.stage
            if s < first:
                continue
            if s > first:
                x = _recv(parallel_state.get_pipeline_model_parallel_prev_rank(), self.device)
            x = self._stage(chunk, x, ids, pixel_values if run_vit else None, has_images, splice_len,
                            attention_mask, context)
            if s < self.num_stages - 1:
                _send(x, parallel_state.get_pipeline_model_parallel_next_rank())
        if not self.is_last_stage:
            return None
        # The output layer gathered the vocab-parallel logits; the rows padding the vocab to a multiple of TP
        # come last and are dropped.
        return x[:, -1, : self.spec.text.vocab_size].float()

    def _stage(self, chunk: InternVLModel, x: Tensor | None, ids: Tensor, tiles: Tensor | None,
               has_images: bool, splice_len: int, attention_mask: Tensor | None, context) -> Tensor:
        st = chunk.stage
        if st.has_vit and tiles is not None:
            encoder = chunk.image_encoder
            if not st.has_vit_embed:
                encoder.encoder.set_input_tensor(x)
            x = encoder(tiles if st.has_vit_embed else None)
        if not st.has_llm:
            return x
        decoder_input = None
        if st.has_llm_embed:
            if tiles is not None:
                self._features = x
            features = self._features if has_images else None
            decoder_input = self._embed(chunk, ids, features, splice_len)
        else:
            chunk.text_decoder.set_input_tensor(x)
        # runtime_gather_output: megatron's output layer all-gathers the vocab-parallel logits over TP.
        return chunk.text_decoder(input_ids=ids, position_ids=None, attention_mask=attention_mask,
                                  decoder_input=decoder_input, inference_context=context,
                                  runtime_gather_output=True)

    @staticmethod
    def _embed(chunk: InternVLModel, ids: Tensor, features: Tensor | None, splice_len: int) -> Tensor:
        """[s, b, h]: the prompt part with the image features spliced in (the model's own splice, so the slot
        count is checked), the generated part as plain embeddings: a generated <IMG_CONTEXT> is only a token."""
        parts = []
        if splice_len:
            parts.append(chunk.splice(ids[:, :splice_len], features, dummy=features is None))
        if splice_len < ids.shape[1]:
            parts.append(chunk.text_decoder.embedding(input_ids=ids[:, splice_len:], position_ids=None))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---------------------------------------------------------------------------------------- tokens
    def share_from_last_stage(self, t: Tensor) -> Tensor:
        """The last stage's tensor (chosen tokens, finished flags) on every rank of its pipeline."""
        if self.pp > 1:
            dist.broadcast(t, parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return t
