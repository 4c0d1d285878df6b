"""The reference configs' tokenizer settings (`tokenizer_config` in the data JSON, `tokenizer` in the inference
JSON) and loading the tokenizer from them. `trust_remote_code` is accepted and never honoured: no Python file of a
tokenizer directory is ever imported.

A directory whose ``tokenizer_config.json`` names its own class through ``auto_map`` (InternVL3-9B and InternLM3:
``tokenization_internlm3.InternLM3Tokenizer``) is loaded through transformers' ``TokenizersBackend`` from its
files instead. For a SentencePiece ``tokenizer.model`` that backend follows the model's own normalizer spec and
gives every stretch of text between added tokens its own dummy prefix (``legacy=True``), which is what
InternLM3Tokenizer does: ``PreTrainedTokenizer.tokenize`` splits on the added tokens and runs
``SentencePieceProcessor.encode`` on each piece; a BOS is added when ``add_bos_token`` is set."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mindspeed_mm.errors import UserError

__all__ = ["TokenizerConfig", "load_tokenizer", "load_tokenizer_dir"]

logger = logging.getLogger(__name__)

# what a tokenizer directory must hold one of: a fast tokenizer, a SentencePiece model, a BPE vocabulary
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TokenizerConfig:
    from_pretrained: str  # the HF directory (the one the checkpoint was converted from)
    hub_backend: str = "hf"
    autotokenizer_name: str = "AutoTokenizer"
    add_eos_token: bool = False
    use_fast: bool = True
    trust_remote_code: bool = False

    def load(self):
        return load_tokenizer_dir(self.from_pretrained, use_fast=self.use_fast)


def _remote_class(path: Path) -> str | None:
    """The class ``tokenizer_config.json`` asks AutoTokenizer to import from the directory, if any."""
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_file}: not readable JSON ({e})") from None
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    # transformers' two spellings: {"AutoTokenizer": [slow, fast]} and the old bare [slow, fast]
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if isinstance(entry, (list, tuple)):
        entry = next((c for c in entry if c), None)
    return entry if isinstance(entry, str) and entry else None


def _require_sentencepiece(path: Path) -> None:
    # without both, transformers falls back to reading tokenizer.model as a tiktoken file and fails obscurely
    missing = [m for m in ("sentencepiece", "google.protobuf") if not _importable(m)]
    if missing:
        raise UserError(f"tokenizer {path} is a SentencePiece tokenizer.model, which needs the "
                        f"{' and '.join(missing)} package(s): pip install sentencepiece protobuf")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def load_tokenizer_dir(path: str, use_fast: bool = True):
    """The tokenizer in HF directory ``path``, never running the directory's code (see the module doc)."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"tokenizer directory {path} does not exist")
    present = [f for f in _VOCAB_FILES if (d / f).is_file()]
    if not present:
        raise UserError(f"tokenizer directory {path} has none of {', '.join(_VOCAB_FILES)}: not a tokenizer")
    remote = _remote_class(d)
    if remote is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d), use_fast=use_fast, trust_remote_code=False)
    from transformers import TokenizersBackend

    logger.warning("tokenizer %s names its own class %s (auto_map), which is never imported: loading its %s "
                   "with transformers' TokenizersBackend", path, remote, present[0])
    if "tokenizer.json" not in present and "tokenizer.model" in present:
        _require_sentencepiece(d)
        return TokenizersBackend.from_pretrained(str(d), legacy=True)
    return TokenizersBackend.from_pretrained(str(d))


def load_tokenizer(cfg: TokenizerConfig, img_context_token_id: int):
    """The tokenizer, checked to be the model's: its <IMG_CONTEXT> id must be the model's image token id."""
    from mindspeed_mm.data.template import IMG_CONTEXT_TOKEN

    tokenizer = cfg.load()
    img = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if img != img_context_token_id:
        raise UserError(f"tokenizer {cfg.from_pretrained} maps {IMG_CONTEXT_TOKEN} to {img}, but the model's "
                        f"img_context_token_id is {img_context_token_id}: not this model's tokenizer")
    return tokenizer
