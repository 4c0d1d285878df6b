"""InternVL's ``internvl2_5`` chat template with training labels.

Layout (each turn tokenised on its own, then concatenated)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ...

Labels are -100 on system and user turns, and on each assistant turn's ``<|im_start|>assistant\\n`` prefix and
trailing ``\\n``; the answer tokens and ``<|im_end|>`` are targets. A tokenizer that adds a BOS
(``add_bos_token``: InternLM2/3's SentencePiece tokenizers) gets one BOS before the system turn, as upstream
InternVL prepends it to the first turn only. Each ``<image>`` placeholder becomes
``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile x tiles, thumbnail included) + ``</img>``, in text order
over the user turns. When there are images and no turn has a placeholder, ``<image>\\n`` is prefixed to the
first user turn; placeholders written in any user turn (a later one included) are kept where they are, as
InternVL's ``preprocess_internvl2_5`` places them for a list of images (for one image given as a string,
InternVL's ``multi_modal_get_item`` prefixes one to ``conversations[0]`` unless that turn has one, and a
later-turn placeholder then stays literal text; here it holds the image). Text-only conversations are allowed
(upstream MindSpeed-MM rejects them).
"""
from __future__ import annotations

import torch

from mindspeed_mm.config.model_spec import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from mindspeed_mm.errors import UserError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "DEFAULT_SYSTEM_MESSAGE",
    "image_token_string",
    "build_conversation",
    "build_prompt",
]

# InternVL's default system prompt (template internvl2_5), used unless a conversation starts with a system turn.
DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def image_token_string(num_tiles: int, tokens_per_tile: int) -> str:
    """The text one ``<image>`` placeholder expands to."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (tokens_per_tile * num_tiles) + IMG_END_TOKEN


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    """The sequence's leading BOS: for the tokenizers that add one (``add_bos_token``), once, not per turn."""
    if getattr(tokenizer, "add_bos_token", False) and getattr(tokenizer, "bos_token_id", None) is not None:
        return [int(tokenizer.bos_token_id)]
    return []


def _check_turns(conversations) -> tuple[str | None, list[dict]]:
    if not conversations:
        raise ValueError("empty conversation")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {i} must be a dict with 'from' and 'value', got {turn!r}")
        if turn["from"] not in _ROLES:
            raise ValueError(f"turn {i}: unknown role {turn['from']!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {i}: 'value' must be a string, got {type(turn['value']).__name__}")
        if IMG_CONTEXT_TOKEN in turn["value"]:  # it would become an image slot with no image behind it
            raise UserError(f"turn {i}: the text holds {IMG_CONTEXT_TOKEN}, which only {IMAGE_PLACEHOLDER} "
                            f"placeholders may produce; write {IMAGE_PLACEHOLDER} instead")
    system = None
    turns = list(conversations)
    if turns[0]["from"] == "system":
        system = turns[0]["value"]
        turns = turns[1:]
    if not turns:
        raise ValueError("conversation has no human/gpt turns")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(
                f"roles must alternate human/gpt after an optional leading system turn: turn {i} "
                f"(after the system turn, if any) is {turn['from']!r}, expected {expected!r}"
            )
    if turns[-1]["from"] != "gpt":
        raise ValueError("conversation must end with a gpt turn")
    for i, turn in enumerate(turns):
        if turn["from"] == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:
            raise ValueError(f"{IMAGE_PLACEHOLDER} placeholder in a gpt turn (turn {i}); images belong in human turns")
    if system is not None and IMAGE_PLACEHOLDER in system:
        raise ValueError(f"{IMAGE_PLACEHOLDER} placeholder in the system turn")
    return system, turns


def _assistant_turn(tokenizer, answer: str) -> tuple[list[int], list[int]]:
    """Tokenise one assistant turn as a whole (as upstream does) and mask its prefix and trailing newline; if
    the answer's first characters merge with the prefix or the final newline merges with the end (BPE
    boundary effects), fall back to tokenising prefix / answer+<|im_end|> / newline separately."""
    prefix = _encode(tokenizer, f"{IM_START}assistant\n")
    newline = _encode(tokenizer, "\n")
    ids = _encode(tokenizer, f"{IM_START}assistant\n{answer}{IM_END}\n")
    n_pre, n_nl = len(prefix), len(newline)
    if not (ids[:n_pre] == prefix and ids[-n_nl:] == newline and len(ids) > n_pre + n_nl):
        ids = prefix + _encode(tokenizer, f"{answer}{IM_END}") + newline
    labels = [IGNORE_INDEX] * n_pre + ids[n_pre : len(ids) - n_nl] + [IGNORE_INDEX] * n_nl
    return ids, labels


def build_conversation(
    conversations: list[dict],
    tiles_per_image: list[int],
    tokens_per_tile: int,
    tokenizer,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a ``[{"from": "system"|"human"|"gpt", "value": str}, ...]`` conversation.

    ``tiles_per_image[k]`` is the tile count (thumbnail included) of the image behind the k-th ``<image>``
    placeholder, in text order. A leading system turn overrides ``system_message``. Returns
    ``(input_ids, labels)``, both 1-D LongTensors of equal length.
    """
    system, turns = _check_turns(conversations)
    if system is None:
        system = system_message
    tiles_per_image = [int(t) for t in tiles_per_image]
    if any(t < 1 for t in tiles_per_image):
        raise ValueError(f"every image needs at least one tile, got tiles_per_image={tiles_per_image}")
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be positive, got {tokens_per_tile}")

    values = [t["value"] for t in turns]
    if tiles_per_image and not any(IMAGE_PLACEHOLDER in v for v in values):  # placeholders stay where written
        values[0] = IMAGE_PLACEHOLDER + "\n" + values[0]
    n_placeholders = sum(v.count(IMAGE_PLACEHOLDER) for v in values)
    if n_placeholders != len(tiles_per_image):
        raise UserError(
            f"conversation has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"{len(tiles_per_image)} image(s) were given (tiles_per_image={tiles_per_image})"
        )

    image_iter = iter(tiles_per_image)

    def expand(text: str) -> str:
        pieces = text.split(IMAGE_PLACEHOLDER)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out.append(image_token_string(next(image_iter), tokens_per_tile))
            out.append(piece)
        return "".join(out)

    input_ids: list[int] = _bos(tokenizer)
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    sys_ids = _encode(tokenizer, f"{IM_START}system\n{system}{IM_END}\n")
    input_ids += sys_ids
    labels += [IGNORE_INDEX] * len(sys_ids)
    for turn, value in zip(turns, values):
        if turn["from"] == "human":
            ids = _encode(tokenizer, f"{IM_START}user\n{expand(value)}{IM_END}\n")
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        else:
            ids, lab = _assistant_turn(tokenizer, value)
            input_ids += ids
            labels += lab
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def build_prompt(
    conversations: list[dict],
    tiles_per_image: list[int],
    tokens_per_tile: int,
    tokenizer,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> torch.Tensor:
    """Token ids for generation: a conversation that ends with a human turn, then ``<|im_start|>assistant\\n``
    for the model to continue. Tokenised exactly as :func:`build_conversation` tokenises the same turns in
    training (it does the work: the conversation gets an empty answer, which is then cut off again)."""
    if not conversations or not isinstance(conversations[-1], dict) or conversations[-1].get("from") != "human":
        raise ValueError("a prompt must end with a human turn")
    ids, _ = build_conversation(list(conversations) + [{"from": "gpt", "value": ""}], tiles_per_image,
                                tokens_per_tile, tokenizer, system_message)
    empty_answer, _ = _assistant_turn(tokenizer, "")
    if ids[-len(empty_answer):].tolist() != empty_answer:
        raise AssertionError("the empty assistant turn is not the conversation's tail")  # turns are tokenised alone
    prefix = torch.tensor(_encode(tokenizer, f"{IM_START}assistant\n"), dtype=torch.long)
    return torch.cat([ids[: len(ids) - len(empty_answer)], prefix])
