"""A tiny offline SentencePiece tokenizer laid out like InternVL3-9B's (an InternLM3 LLM), for tests and an
internlm3 tiny preset.

``tokenizer.model`` is a BPE model trained with ``sentencepiece.SentencePieceTrainer`` on a fixed English +
Chinese + code text, with InternLM's model settings: ``<unk>`` ``<s>`` ``</s>`` at ids 0-2, byte fallback (so any
text encodes), split digits, no whitespace collapsing, identity normalization, a dummy prefix. After its
:data:`SP_VOCAB_SIZE` pieces come the added tokens of :data:`ADDED_TOKENS` (InternLM's chat tokens, then
InternVL's), listed in ``tokenizer_config.json`` as InternVL3-9B lists them, next to the ``auto_map`` entry for
InternLM3's own tokenizer class, which we never import (no ``tokenization_internlm3.py`` is written).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from mindspeed_mm.testing.tiny_checkpoint import INTERNVL_TOKENS, TRAINING_LINES
from mindspeed_mm.data.template import IM_END, IM_START

__all__ = ["SP_VOCAB_SIZE", "ADDED_TOKENS", "TINY_SP_TOKENIZER_LEN", "write_tiny_sentencepiece_tokenizer"]

SP_VOCAB_SIZE = 512
ADDED_TOKENS = (
    IM_START,
    IM_END,
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
    *INTERNVL_TOKENS,
)
TINY_SP_TOKENIZER_LEN = SP_VOCAB_SIZE + len(ADDED_TOKENS)
MODEL_MAX_LENGTH = 2048

_TRAINING_LINES = (
    *TRAINING_LINES,
    "def area(width, height):",
    "    return width  *  height",
)


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def train_tiny_sentencepiece(add_dummy_prefix: bool = True) -> bytes:
    """The serialized ``tokenizer.model``; the same bytes every call (one thread, fixed text)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TRAINING_LINES * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_tiny_sentencepiece_tokenizer(out_dir: str | os.PathLike, add_dummy_prefix: bool = True) -> Path:
    """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``: the
    SentencePiece pieces at ids 0..SP_VOCAB_SIZE-1, :data:`ADDED_TOKENS` after them; bos ``<s>`` (added to each
    encoding, as InternLM3's ``add_bos_token`` says), eos and pad ``</s>``, unk ``<unk>``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_tiny_sentencepiece(add_dummy_prefix))
    base = {"<unk>": 0, "<s>": 1, "</s>": 2}
    decoder = {str(i): _special(t) for t, i in base.items()}
    decoder.update({str(SP_VOCAB_SIZE + i): _special(t) for i, t in enumerate(ADDED_TOKENS)})
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDED_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_internlm3.InternLM3Tokenizer", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "</s>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "InternLM3Tokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    named = {k: {kk: v for kk, v in _special(config[k]).items() if kk != "special"}
             for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special_map = {"additional_special_tokens": list(ADDED_TOKENS), **named}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out
