"""`text_decoder.rope_scaling`: dynamic-NTK RoPE for the LLM, as transformers' Qwen2 applies it.

For a forward over a sequence of L positions (L = the largest position + 1) longer than
``max_position_embeddings``, every position of that forward rotates with the base
``base * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))`` (d: the rotary dimension); up to
``max_position_embeddings`` positions RoPE is plain. L is the full micro-batch's length as the data pipeline
gives it: before the model's CP/SP padding and before any CP split, so every layout computes the same
frequencies. In generation L is the cached length plus the new tokens, recomputed every step: the keys cached
at earlier steps keep the rotation they were computed with, as in transformers' cache.

transformers' module also keeps the frequencies of the longest sequence it has seen for a later, shorter
sequence still longer than ``max_position_embeddings`` (until one at most that long resets it). Here each
forward's frequencies follow its own length: the two agree for one forward on a fresh model and for
generation, where the length only grows.

Packed sequences (`LLMDecoder.forward(..., packed_rope=(positions, lengths))`): positions restart at 0 in every
sample of a pack, so each token's rotation is the table's row at its position within its sample (megatron's table
gathered per token: [s, b, 1, d] instead of [s, 1, 1, d], which megatron's bshd RoPE broadcasts alike). Dynamic
NTK then follows each sample's own length (its token count), as if the sample ran alone: a pack of samples gives
each of them the rotations it would get unpacked and by itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from mindspeed_mm.config.model_spec import RopeScaling

__all__ = ["DynamicNTKRotaryEmbedding", "LLMDecoder", "dynamic_ntk_inv_freq", "packed_rotary_emb"]

# megatron's forward is lru-cached on its arguments alone; the scaled frequencies depend on the length too
_ROPE_FORWARD = RotaryEmbedding.forward.__wrapped__


def dynamic_ntk_inv_freq(base: float, dim: int, factor: float, max_position_embeddings: int, seq_len: int,
                         device=None) -> Tensor:
    """transformers' `_compute_dynamic_ntk_parameters`, with its float32 rounding (it scales the base as a
    float32 tensor), so that the frequencies are the same numbers."""
    length = torch.tensor(max(seq_len, max_position_embeddings), dtype=torch.int64)
    scaled = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (scaled.to(device) ** exponents)


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding whose frequencies follow `set_seq_len`, called before every forward."""

    def __init__(self, *, rotary_base: float, factor: float, max_position_embeddings: int, **kwargs):
        super().__init__(rotary_base=rotary_base, **kwargs)
        self.base, self.factor, self.max_position_embeddings = rotary_base, factor, max_position_embeddings
        self.dim = 2 * self.inv_freq.shape[0]
        self.plain_inv_freq = self.inv_freq
        # None while RoPE is plain; device.use_generation_fast_paths does not memoize tables otherwise
        self.ntk_seq_len: Optional[int] = None

    def set_seq_len(self, seq_len: int) -> bool:
        """The full sequence length of the coming forward; True if the frequencies changed."""
        ntk = seq_len if seq_len > self.max_position_embeddings else None
        if ntk == self.ntk_seq_len:
            return False
        device = self.inv_freq.device  # megatron moves inv_freq to the GPU at the first forward
        self.inv_freq = (self.plain_inv_freq.to(device) if ntk is None else dynamic_ntk_inv_freq(
            self.base, self.dim, self.factor, self.max_position_embeddings, ntk, device))
        self.ntk_seq_len = ntk
        return True

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        if self.ntk_seq_len is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        return _ROPE_FORWARD(self, max_seq_len, offset, packed_seq, cp_group)


def packed_rotary_emb(rope: RotaryEmbedding, positions: Tensor, lengths: Tensor) -> Tensor:
    """megatron's rotary table [s, b, 1, d] for tokens at `positions` [b, s] within samples of `lengths` [b, s]
    tokens (the full sequence, before any CP split): row `positions[j, t]` of the table that sample would get alone.
    With dynamic NTK, each sample longer than ``max_position_embeddings`` gets the frequencies of its own length."""
    n = int(positions.max()) + 1
    if not isinstance(rope, DynamicNTKRotaryEmbedding):
        table = rope.get_emb(n)[:, 0, 0, :]
        return table[positions.to(table.device)].transpose(0, 1).unsqueeze(2)
    saved = rope.ntk_seq_len
    ntk = torch.where(lengths > rope.max_position_embeddings, lengths, torch.zeros_like(lengths))
    out = None
    try:
        for length in sorted(set(ntk.flatten().tolist())):
            rope.set_seq_len(length)  # 0: plain RoPE
            table = rope.get_emb(n)[:, 0, 0, :]
            rows = table[positions.to(table.device)]  # [b, s, d]
            pick = (ntk == length).to(table.device).unsqueeze(-1)
            out = rows if out is None else torch.where(pick, rows, out)
    finally:
        rope.set_seq_len(saved or 0)
    return out.transpose(0, 1).unsqueeze(2)


class LLMDecoder(GPTModel):
    """megatron's GPTModel with the spec's `rope_scaling` applied; without one it is GPTModel unchanged."""

    def __init__(self, *args, rope_scaling: Optional[RopeScaling], rotary_base: float, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        if self.share_embeddings_and_output_weights and self.pre_process and not self.post_process:
            # megatron marks the embedding so only on the first pipeline rank's first chunk, where it assumes it;
            # the mark gives it a bucket of its own under the distributed optimizer, so that it is sharded over DP
            # as the last stage's copy is and the copies' gradients can be summed after the reduce-scatter
            self.embedding.word_embeddings.weight.shared_embedding = True
        if rope_scaling is None or not hasattr(self, "rotary_pos_emb"):
            return
        assert rope_scaling.type == "dynamic", rope_scaling  # RopeScaling admits no other type
        plain = self.rotary_pos_emb
        self.rotary_pos_emb = DynamicNTKRotaryEmbedding(
            kv_channels=self.config.kv_channels, rotary_percent=self.rotary_percent,
            rotary_interleaved=self.config.rotary_interleaved, rotary_base=rotary_base,
            use_cpu_initialization=self.config.use_cpu_initialization, cp_group=plain.cp_group,
            factor=rope_scaling.factor, max_position_embeddings=self.max_position_embeddings)

    def _is_in_embd_group(self) -> bool:
        """Tied embeddings over several stages: megatron copies the embedding to the last stage's output layer
        at construction by an all-reduce over its embedding group, on the chunk it takes for the first or last
        one by pipeline position; here the LLM's first stage may be a later rank or chunk (the ViT comes first),
        or the same rank as the last stage, so that all-reduce could wait forever. The copy is loaded with the
        checkpoint (`sharding.stage_name`: the rank files hold it) and training copies it once more
        (`training.pipeline.wrap_ddp`, for megatron's random initialisation)."""
        return False

    def forward(self, input_ids: Tensor, *args, rope_seq_len: Optional[int] = None,
                packed_rope: Optional[tuple[Tensor, Tensor]] = None, cp_index: Optional[Tensor] = None, **kwargs):
        """`rope_seq_len`: the micro-batch's length before the model padded it for CP/SP (default: the ids'
        length, plus the cached tokens when an inference context is given). `packed_rope`: (positions, lengths)
        [b, s] of every token of a packed micro-batch (full padded sequence, before the CP split): RoPE restarts
        per sample (`packed_rotary_emb`). `cp_index` [b, S/cp]: the padded positions this CP rank holds
        (`PackedLayout.index`, every sample split over the CP ranks) instead of the whole-sequence zigzag."""
        rope = getattr(self, "rotary_pos_emb", None)
        if packed_rope is not None and rope is not None:
            cp = self.config.context_parallel_size
            if cp_index is not None:
                idx = cp_index.to(packed_rope[0].device)
                emb = packed_rotary_emb(rope, *(t.gather(1, idx) for t in packed_rope))
            else:
                emb = packed_rotary_emb(rope, *packed_rope)
            if cp > 1 and cp_index is None:
                from megatron.core import parallel_state

                from mindspeed_mm.parallel.context_parallel import zigzag_split
                emb = zigzag_split(emb, cp, parallel_state.get_context_parallel_rank(), 0)
            self._packed_rotary_emb = emb
            try:
                return super().forward(input_ids, *args, **kwargs)
            finally:
                self._packed_rotary_emb = None
        if isinstance(rope, DynamicNTKRotaryEmbedding):
            if rope_seq_len is None:
                context = kwargs.get("inference_context")
                rope_seq_len = input_ids.shape[1] + (context.sequence_len_offset if context is not None else 0)
            if rope.set_seq_len(rope_seq_len):
                # GPTModel keeps the generation cos/sin tables per maximum length, not per frequencies
                self.rotary_pos_emb_cache.clear()
        return super().forward(input_ids, *args, **kwargs)

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        emb = getattr(self, "_packed_rotary_emb", None)
        if emb is None:
            return out
        return (out[0], emb, *out[2:])
