"""The reference configs' tokenizer settings (`tokenizer_config` in the data JSON, `tokenizer` in the inference
JSON) and loading the tokenizer from them. `trust_remote_code` is accepted and never honoured: a tokenizer that
needs a checkpoint's Python code is refused by transformers rather than run."""
from __future__ import annotations

from dataclasses import dataclass

from mindspeed_mm.errors import UserError

__all__ = ["TokenizerConfig", "load_tokenizer"]


@dataclass(frozen=True)
class TokenizerConfig:
    from_pretrained: str  # the HF directory (the one the checkpoint was converted from)
    hub_backend: str = "hf"
    autotokenizer_name: str = "AutoTokenizer"
    add_eos_token: bool = False
    use_fast: bool = True
    trust_remote_code: bool = False

    def load(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.from_pretrained, use_fast=self.use_fast, trust_remote_code=False)


def load_tokenizer(cfg: TokenizerConfig, img_context_token_id: int):
    """The tokenizer, checked to be the model's: its <IMG_CONTEXT> id must be the model's image token id."""
    from mindspeed_mm.data.template import IMG_CONTEXT_TOKEN

    tokenizer = cfg.load()
    img = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if img != img_context_token_id:
        raise UserError(f"tokenizer {cfg.from_pretrained} maps {IMG_CONTEXT_TOKEN} to {img}, but the model's "
                        f"img_context_token_id is {img_context_token_id}: not this model's tokenizer")
    return tokenizer
