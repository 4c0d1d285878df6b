"""InternLM3-style SentencePiece tokenizers (InternVL3-9B): loaded without the directory's remote code, encoding
as InternLM3Tokenizer does, and the internvl2_5 template over them.

Oracles we did not write: ``sentencepiece.SentencePieceProcessor`` on the same model, driven by InternLM3's rule
(added tokens split out whole, each stretch of text between them encoded on its own: InternLM3Tokenizer's
``tokenize`` is ``PreTrainedTokenizer.tokenize`` and its ``_tokenize`` is ``sp_model.encode(text, out_type=str)``),
and transformers' slow ``SentencePieceBackend(legacy=True)``, which implements that same rule."""
from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch

from mindspeed_mm.data.template import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, build_conversation, build_prompt
from mindspeed_mm.data.tokenizer import TokenizerConfig, load_tokenizer, load_tokenizer_dir
from mindspeed_mm.errors import UserError
from mindspeed_mm.testing.tiny_sentencepiece import (
    ADDED_TOKENS,
    SP_VOCAB_SIZE,
    TINY_SP_TOKENIZER_LEN,
    train_tiny_sentencepiece,
    write_tiny_sentencepiece_tokenizer,
)
from tests.helpers.template_oracle import expected_conversation

spm = pytest.importorskip("sentencepiece")

IMG_CONTEXT_ID = SP_VOCAB_SIZE + ADDED_TOKENS.index("<IMG_CONTEXT>")
_BOOBY_TRAP = "raise RuntimeError('the tokenizer directory\\'s code was imported')\n"

TEXTS = [
    "Please describe this image in detail.",
    "请描述这张图片。图片中有什么？",
    "  two leading spaces,   three inside, trailing  ",
    "line one\nline two\n\n\tindented\n",
    "\n",
    " ",
    "<|im_start|>user\nHello 你好<|im_end|>\n<|im_start|>assistant\n",
    "a<img><IMG_CONTEXT><IMG_CONTEXT></img>b <box>1 2</box><ref>x</ref>",
    "digits 2024 and 3.14, emoji 🤖 and ▁ the meta symbol",
    "<s>bos and eos</s> as text",
    "def area(width, height):\n    return width  *  height",
]


def _write(tmp_path_factory, name, **kw):
    d = write_tiny_sentencepiece_tokenizer(tmp_path_factory.mktemp(name), **kw)
    (d / "tokenization_internlm3.py").write_text(_BOOBY_TRAP)
    return d


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def sp_dir(request, tmp_path_factory):
    return _write(tmp_path_factory, "sp", add_dummy_prefix=request.param)


@pytest.fixture(scope="module")
def tok(sp_dir):
    return load_tokenizer(TokenizerConfig(from_pretrained=str(sp_dir)), IMG_CONTEXT_ID)


def _internlm3_rule(sp_dir, text):
    """InternLM3Tokenizer's encoding (add_special_tokens=False), straight from sentencepiece."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    added = {t: SP_VOCAB_SIZE + i for i, t in enumerate(ADDED_TOKENS)}
    added.update({t: sp.piece_to_id(t) for t in ("<unk>", "<s>", "</s>")})
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = []
    for part in re.split(pattern, text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids += sp.encode(part)
    return ids


def test_loads_without_remote_code(sp_dir, tok, caplog):
    assert "tokenization_internlm3" not in sys.modules
    assert not any(m.startswith("transformers_modules") for m in sys.modules)
    assert len(tok) == TINY_SP_TOKENIZER_LEN
    with caplog.at_level(logging.WARNING, logger="mindspeed_mm.data.tokenizer"):
        load_tokenizer_dir(str(sp_dir))
    lines = [r.getMessage() for r in caplog.records if r.name == "mindspeed_mm.data.tokenizer"]
    assert len(lines) == 1 and "tokenization_internlm3.InternLM3Tokenizer" in lines[0] and "\n" not in lines[0]
    assert "tokenization_internlm3" not in sys.modules


def test_tiny_model_is_deterministic():
    assert train_tiny_sentencepiece() == train_tiny_sentencepiece()


def test_special_tokens_are_single_ids(tok):
    for i, t in enumerate(ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == SP_VOCAB_SIZE + i
        assert tok(t, add_special_tokens=False)["input_ids"] == [SP_VOCAB_SIZE + i]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == IMG_CONTEXT_ID


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_sentencepiece_with_internlm3_rules(sp_dir, tok, text):
    assert tok(text, add_special_tokens=False)["input_ids"] == _internlm3_rule(sp_dir, text)


def test_encoding_matches_transformers_slow_sentencepiece(sp_dir, tok):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    slow = SentencePieceBackend.from_pretrained(str(sp_dir), legacy=True)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == slow(text, add_special_tokens=False)["input_ids"]


def test_bos_added_once_and_plain_text_round_trips(tok):
    ids = tok("Hello 你好")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    for text in ("Please describe this image in detail.", "请描述这张图片。", "two  spaces\nand a newline"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_template_over_sentencepiece(tok):
    conv = [
        {"from": "human", "value": "Image-1: <image>\n请描述这张图片。"},
        {"from": "gpt", "value": "A cat  on a table.\n这是一只猫。"},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "1"},
    ]
    ids, labels = build_conversation(conv, [2], tokens_per_tile=3, tokenizer=tok)
    exp_ids, exp_labels = expected_conversation(
        tok, DEFAULT_SYSTEM_MESSAGE, [(conv[0]["value"], conv[1]["value"]), (conv[2]["value"], conv[3]["value"])],
        [("<image>", "<img>" + "<IMG_CONTEXT>" * 6 + "</img>")])
    assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    lst = ids.tolist()
    im_start, im_end, img, ctx = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<img>",
                                                                          "<IMG_CONTEXT>"))
    # one BOS, first, masked; then the system turn; the image block is one contiguous run
    assert lst[0] == tok.bos_token_id and lst.count(tok.bos_token_id) == 1 and lst[1] == im_start
    assert labels[0].item() == IGNORE_INDEX
    s = lst.index(img)
    assert lst[s + 1: s + 7] == [ctx] * 6 and lst.count(ctx) == 6
    # targets: exactly the two answers, each ending in <|im_end|>
    target_pos = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert [lst[p] for p in target_pos] == [t for t in labels.tolist() if t != IGNORE_INDEX]
    runs = _runs(labels.tolist())
    assert [r[-1] for r in runs] == [im_end, im_end]
    # the answers are tokenised inside their turn: no dummy prefix before them (InternLM3 splits on added tokens)
    assert tok.decode(runs[0]) == conv[1]["value"] + "<|im_end|>" and tok.decode(runs[1]) == "1<|im_end|>"
    # the trailing "\n" is masked whole: with a dummy prefix it is two pieces ("▁", "\n") after <|im_end|>
    nl = len(_enc(tok, "\n"))
    assert (labels[-nl:] == IGNORE_INDEX).all() and labels[-nl - 1].item() == im_end
    assert not torch.isin(labels, torch.tensor([img, ctx, tok.bos_token_id])).any()


def test_prompt_over_sentencepiece_matches_training_prefix(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "An astronaut."}]
    train_ids, _ = build_conversation(conv, [1], 2, tok)
    prompt = build_prompt(conv[:1], [1], 2, tok)
    assert prompt[0].item() == tok.bos_token_id
    assert train_ids[: len(prompt)].tolist() == prompt.tolist()
    assert prompt[-len(_enc(tok, "<|im_start|>assistant\n")):].tolist() == _enc(tok, "<|im_start|>assistant\n")


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _runs(labels):
    runs, cur = [], []
    for t in labels + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs


def test_directory_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer_dir(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM3Tokenizer"}))
    with pytest.raises(UserError, match="none of tokenizer.json, tokenizer.model, vocab.json"):
        load_tokenizer_dir(str(empty))
    bad = write_tiny_sentencepiece_tokenizer(tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json: not readable JSON"):
        load_tokenizer_dir(str(bad))


def test_wrong_model_is_refused(sp_dir):
    with pytest.raises(UserError, match="img_context_token_id"):
        load_tokenizer(TokenizerConfig(from_pretrained=str(sp_dir)), IMG_CONTEXT_ID + 1)
