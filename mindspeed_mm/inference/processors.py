"""transformers' logits processors that ``generation_config`` turns on, with its semantics exactly (its
``RepetitionPenaltyLogitsProcessor``, ``NoRepeatNGramLogitsProcessor``, ``MinLengthLogitsProcessor`` and
``MinNewTokensLengthLogitsProcessor``, in its order), applied before the temperature / top-k / top-p of
``sampling``. Each request's history is its own prompt (without the batch's left pads) and its new tokens, so
a batch gives every request the tokens it gets alone and those transformers gives it alone.

The history is kept incrementally (a seen-token mask, an n-gram table), one update per step, rather than
rescanned every step as transformers does: a prompt of a few thousand image tokens would otherwise cost a scan
per new token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mindspeed_mm.inference.config import GenerationConfig

__all__ = ["LogitsProcessors"]


class LogitsProcessors:
    """The processors of one batch: ``__call__`` before choosing a step's tokens, ``append`` after."""

    def __init__(self, config: GenerationConfig, prompts: Sequence[Tensor], stop_ids: Sequence[int],
                 vocab_size: int, device):
        self.config, self.vocab_size = config, vocab_size
        self.prompt_lengths = [len(p) for p in prompts]
        self.new = 0  # tokens appended so far (the same for every request still running)
        self.stop = torch.tensor(sorted({i for i in stop_ids if 0 <= i < vocab_size}), dtype=torch.long,
                                 device=device)
        self.min_total = [max(config.min_length, n + config.min_new_tokens) for n in self.prompt_lengths]
        self.seen: Tensor | None = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size + 1, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):  # ids past the logits (none in practice) land in the spare column
                self.seen[i, p.to(device).clamp(max=vocab_size)] = True
        n = config.no_repeat_ngram_size
        self.history: list[list[int]] = []
        self.ngrams: list[dict[tuple[int, ...], set[int]]] = []
        if n > 0:
            for p in prompts:
                seq = p.tolist()
                table: dict[tuple[int, ...], set[int]] = {}
                for start in range(len(seq) - n + 1):
                    table.setdefault(tuple(seq[start:start + n - 1]), set()).add(seq[start + n - 1])
                self.history.append(seq)
                self.ngrams.append(table)

    @property
    def active(self) -> bool:
        return (self.seen is not None or bool(self.ngrams)
                or (len(self.stop) > 0 and any(m > n for m, n in zip(self.min_total, self.prompt_lengths))))

    def __call__(self, logits: Tensor) -> Tensor:
        """[b, V] float logits of the next position -> the processed logits."""
        if self.seen is not None:
            p = self.config.repetition_penalty
            penalised = torch.where(logits < 0, logits * p, logits / p)
            logits = torch.where(self.seen[:, : logits.shape[-1]], penalised, logits)
        n = self.config.no_repeat_ngram_size
        if self.ngrams:
            banned = torch.zeros_like(logits, dtype=torch.bool)
            for i, (seq, table) in enumerate(zip(self.history, self.ngrams)):
                if len(seq) >= n:  # a complete n-gram exists, so the last n - 1 tokens may end one
                    tokens = table.get(tuple(seq[len(seq) - n + 1:]))
                    if tokens:
                        banned[i, list(tokens)] = True
            logits = logits.masked_fill(banned, float("-inf"))
        if len(self.stop):
            short = [i for i, (m, n0) in enumerate(zip(self.min_total, self.prompt_lengths)) if n0 + self.new < m]
            if short:
                logits = logits.clone()
                rows = torch.tensor(short, device=logits.device)
                logits[rows[:, None], self.stop[None, :]] = float("-inf")
        return logits

    def append(self, tokens: Sequence[int], running: Sequence[bool]) -> None:
        """This step's tokens; rows not ``running`` (finished before it) are left as they were."""
        self.new += 1
        n = self.config.no_repeat_ngram_size
        for i, t in enumerate(tokens):
            if not running[i]:
                continue
            if self.seen is not None:
                self.seen[i, min(t, self.vocab_size)] = True
            if self.ngrams:
                seq = self.history[i]
                seq.append(t)
                if len(seq) >= n:
                    self.ngrams[i].setdefault(tuple(seq[len(seq) - n:-1]), set()).add(t)
