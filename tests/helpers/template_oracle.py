"""The internvl2_5 template's expected ids and labels, built from the spec text independently of
mindspeed_mm.data.template's helpers, as upstream InternVL does it: each turn tokenised alone (an assistant turn
whole, so a SentencePiece dummy prefix is not put before its answer), the assistant prefix and trailing newline
masked, one BOS first for the tokenizers that add one (upstream puts it before the first turn only)."""
from __future__ import annotations

IGNORE_INDEX = -100


def _enc(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def expected_conversation(tok, system, pairs, image_strings):
    """``pairs``: (question, answer) per round; ``image_strings``: (placeholder, replacement), applied in order."""
    ids = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    s = _enc(tok, f"<|im_start|>system\n{system}<|im_end|>\n")
    ids += s
    labels += [IGNORE_INDEX] * len(s)
    for q, a in pairs:
        for ph, rep in image_strings:
            q = q.replace(ph, rep, 1)
        u = _enc(tok, f"<|im_start|>user\n{q}<|im_end|>\n")
        ids += u
        labels += [IGNORE_INDEX] * len(u)
        pre = _enc(tok, "<|im_start|>assistant\n")
        nl = _enc(tok, "\n")
        turn = _enc(tok, f"<|im_start|>assistant\n{a}<|im_end|>\n")
        assert turn[: len(pre)] == pre and turn[-len(nl):] == nl, "prefix or newline merged with the answer"
        ids += turn
        labels += [IGNORE_INDEX] * len(pre) + turn[len(pre): len(turn) - len(nl)] + [IGNORE_INDEX] * len(nl)
    return ids, labels
