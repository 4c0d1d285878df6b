"""Token generation: a prefill over the prompts, then one token per step against megatron-core's own KV cache
(`StaticInferenceContext`, which megatron's attention fills and reads when it is passed to GPTModel; keys are
cached with RoPE applied, see the `inference_fast_paths` group of `mindspeed_mm.device`), or, with
``use_cache: false``, the whole sequence recomputed every step (the reference system's way, kept as the baseline
the cache is tested and benchmarked against).

The last stage chooses each token after transformers' logits processors that ``generation_config`` turns on
(``processors``: repetition penalty, no-repeat n-grams, minimum lengths), then greedy or sampling.

Batched prompts of different lengths are left-padded, so every request's newest token sits in the same
column and one cache offset serves the batch (the static context has a single offset). The pads are masked
as keys; each pad attends to itself only, so no softmax row is empty (an empty row gives NaN, and NaN values
in the cache would leak through the zero weights). A request's positions then start at its pad count rather
than 0: RoPE scores depend only on the distance between positions, so this changes its logits by rounding
only (tested: batched tokens equal one-at-a-time tokens).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.config import GenerationConfig
from mindspeed_mm.inference.processors import LogitsProcessors
from mindspeed_mm.inference.sampling import next_tokens
from mindspeed_mm.inference.stages import StageRunner

__all__ = ["Generated", "PromptTooLong", "generate", "padded_batch"]


class PromptTooLong(UserError):
    """A prompt that leaves no room for a new token within the model's sequence length."""


@dataclass
class Generated:
    tokens: list[list[int]]  # new token ids per request, the stop token included when one was produced
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens or the sequence limit)
    prompt_lengths: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0  # the steps after the first token
    decode_steps: int = 0
    step_logits: list[Tensor] = field(default_factory=list)  # [b, vocab] per step, when asked for

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens each request gains per second of decoding, times the batch: the decode throughput."""
        n = self.decode_steps * len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def padded_batch(prompts: Sequence[Tensor], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Left-padded ids [b, L] and the pad count per request [b]."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    pads = torch.tensor([length - len(p) for p in prompts], device=device)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p.to(device)
    return ids, pads


def _mask(pads: Tensor, q_len: int, k_len: int) -> Tensor | None:
    """[b, 1, q, k] bool, True = masked: causal (queries are the last `q_len` of `k_len` positions) and the
    left pads as keys, except that a pad attends to itself. None when nothing is padded (the causal default)."""
    if not bool(pads.any()):
        return None
    k = torch.arange(k_len, device=pads.device)
    q = k[k_len - q_len:]
    future = k[None, :] > q[:, None]  # [q, k]
    pad_key = k[None, :] < pads[:, None]  # [b, k]
    masked = future[None] | pad_key[:, None, :]
    masked &= ~(k[None, None, :] == q[None, :, None])  # the diagonal stays
    return masked[:, None]


def _budgets(prompts: Sequence[Tensor], config: GenerationConfig, max_length: int,
             max_new_tokens: Sequence[int | None] | None) -> list[int]:
    out = []
    for i, p in enumerate(prompts):
        if len(p) >= max_length:
            raise PromptTooLong(f"request {i}: the prompt has {len(p)} tokens (images expanded), but the model's "
                                f"sequence length is {max_length} (seq_length / text_decoder.max_position_embeddings);"
                                f" use fewer tiles or frames (max_tiles, num_segments) or a shorter prompt")
        wanted = (max_new_tokens[i] if max_new_tokens is not None and max_new_tokens[i] is not None
                  else config.new_token_budget(len(p)))
        if wanted < 1:  # transformers refuses this too
            raise PromptTooLong(f"request {i}: the prompt has {len(p)} tokens (images expanded), but "
                                f"generation_config.max_length is {config.max_length}: give max_new_tokens instead")
        out.append(min(wanted, max_length - len(p)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(runner: StageRunner, prompts: Sequence[Tensor], pixel_values: Tensor | None,
             config: GenerationConfig, stop_ids: Sequence[int], pad_id: int, max_length: int,
             generator: torch.Generator | None = None, max_new_tokens: Sequence[int | None] | None = None,
             keep_logits: bool = False) -> Generated:
    """Generate for a batch of prompts (1-D id tensors) on every rank of the model.

    `pixel_values`: the tiles of all requests, concatenated in request order (None for text only).
    `stop_ids`: tokens that end a request (kept in its output). `max_length`: prompt + new tokens limit.
    `keep_logits` keeps every step's last-position logits (tests)."""
    budgets = _budgets(prompts, config, max_length, max_new_tokens)
    device = runner.device
    ids, pads = padded_batch(prompts, pad_id, device)
    b, length = ids.shape
    padded = bool(pads.any())
    stop = set(stop_ids)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=runner.dtype)
    context = StaticInferenceContext(b, length + max(budgets)) if config.use_cache else None
    processors = None
    if runner.is_last_stage:
        processors = LogitsProcessors(config, prompts, stop_ids, runner.spec.text.vocab_size, device)
        processors = processors if processors.active else None

    # Bookkeeping is plain Python on the tokens' one host copy per step: a handful of tiny tensor ops per
    # step cost as much as a transformer layer of a small model on CPU.
    result = Generated([[] for _ in range(b)], ["length"] * b, [len(p) for p in prompts])
    done = [False] * b
    last = ids[:, -1:]
    n = 0
    _sync(device)
    start = time.perf_counter()
    while True:
        if n == 0:
            logits = runner.forward(ids, pixel_values=pixel_values, splice_len=length,
                                    attention_mask=_mask(pads, length, length), context=context)
        elif context is not None:
            logits = runner.forward(last, attention_mask=_mask(pads, 1, length + n) if padded else None,
                                    context=context)
        else:
            seq = torch.cat([ids, torch.tensor([t + [pad_id] * (n - len(t)) for t in result.tokens], device=device)],
                            dim=1)
            logits = runner.forward(seq, pixel_values=pixel_values, splice_len=length, reuse_images=True,
                                    attention_mask=_mask(pads, length + n, length + n))
        if context is not None:
            # The context stays in "prefill mode": decode mode would route attention to megatron's flash
            # decoding kernel (see device.use_generation_fast_paths); the cache offset is all our steps need.
            context.increment_sequence_len_offset(length if n == 0 else 1)
        token = torch.empty(b, dtype=torch.long, device=device)
        if runner.is_last_stage:
            if keep_logits:
                result.step_logits.append(logits.cpu())
            token = next_tokens(processors(logits) if processors else logits, config, generator)
        tokens = runner.share_from_last_stage(token).tolist()
        if processors:
            processors.append(tokens, [not d for d in done])
        n += 1
        for i, t in enumerate(tokens):
            if done[i]:
                tokens[i] = pad_id  # a finished request's column is never read again
                continue
            result.tokens[i].append(t)
            if t in stop:
                done[i], result.finish_reasons[i] = True, "stop"
            elif n >= budgets[i]:
                done[i] = True
        if n == 1:
            _sync(device)
            result.prefill_s = time.perf_counter() - start
            start = time.perf_counter()
        if all(done):
            break
        last = torch.tensor(tokens, device=device).view(b, 1)
    _sync(device)
    result.decode_s = time.perf_counter() - start
    result.decode_steps = n - 1
    return result
