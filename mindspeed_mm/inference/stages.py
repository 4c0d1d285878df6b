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

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from mindspeed_mm.device import use_generation_fast_paths
from mindspeed_mm.models.internvl.model import InternVLModel

__all__ = ["StageRunner"]

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


class StageRunner:
    """This rank's model chunks (one per virtual stage) and how a forward crosses the pipeline. It gives the
    chunks the device adaptor's generation fast paths (`use_generation_fast_paths`: rotated-key cache, plain
    linears): chunks for generation only."""

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
            use_generation_fast_paths(chunk)

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
