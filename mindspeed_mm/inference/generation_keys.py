"""Every key of transformers' ``GenerationConfig``, and what ``inference_vlm.py`` does with it.

The reference's ``inference_8B.json`` writes out all of them (a ``GenerationConfig().to_dict()`` of transformers
4.x). A key is one of:

* **honoured** (:data:`HONOURED`): read by ``inference.config.GenerationConfig`` with transformers' meaning;
* **inert** (:data:`INERT`): any value leaves the tokens unchanged here (what transformers returns besides the
  tokens, its own caches and compilation, beam-search or encoder-decoder settings with neither in use);
* **neutral only** (:data:`NEUTRAL`): another value would change the tokens in a way we do not implement, so
  only null and the values listed (transformers' no-op defaults) are accepted.

A static table, not an import of transformers: the config is read before torch or transformers load, so a bad
key fails in a second. ``tests/unit/test_inference.py`` checks it against the installed transformers (every key
of its ``GenerationConfig`` is here; its defaults of the neutral keys are neutral). Keys only older
transformers wrote (``forced_decoder_ids``, ``return_legacy_cache``) stay, so files written then still load.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mindspeed_mm.config.validate import ConfigError, describe

__all__ = ["HONOURED", "INERT", "NEUTRAL", "unused_keys"]

HONOURED = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "num_beams", "use_cache",
    "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id",
    "bos_token_id", "pad_token_id",
})

_OUTPUTS = "what transformers returns besides the tokens"
_BEAM = "beam search only (num_beams is 1)"
_RUNTIME = "transformers' own caches, compilation and batching"
_ASSISTANT = "settings of an assistant model, and none is used"
INERT: Mapping[str, str] = {
    **dict.fromkeys(("output_attentions", "output_hidden_states", "output_scores", "output_logits",
                     "return_dict_in_generate", "return_legacy_cache"), _OUTPUTS),
    **dict.fromkeys(("early_stopping", "length_penalty", "low_memory"), _BEAM),
    **dict.fromkeys(("cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
                     "prefill_chunk_size", "continuous_batching_config"), _RUNTIME),
    **dict.fromkeys(("is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
                     "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
                     "max_matching_ngram_size"), _ASSISTANT),
    "decoder_start_token_id": "encoder-decoder models only",
    "transformers_version": "metadata", "_from_model_config": "metadata",
}

# Besides null. Each enables a logits processor or a decoding mode when set otherwise.
NEUTRAL: Mapping[str, tuple] = {
    "num_return_sequences": (1,), "num_beam_groups": (1,), "diversity_penalty": (0.0,),
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "min_p": (), "top_h": (),
    "encoder_repetition_penalty": (1.0,), "encoder_no_repeat_ngram_size": (0,),
    "bad_words_ids": (), "force_words_ids": (), "constraints": (), "sequence_bias": (),
    "suppress_tokens": ([],), "begin_suppress_tokens": ([],), "forced_bos_token_id": (),
    "forced_eos_token_id": (), "forced_decoder_ids": (), "exponential_decay_length_penalty": (),
    "renormalize_logits": (False,), "remove_invalid_values": (False,), "guidance_scale": (1.0,),
    "penalty_alpha": (), "dola_layers": (), "token_healing": (False,), "watermarking_config": (),
    "stop_strings": (), "max_time": (), "prompt_lookup_num_tokens": (), "assistant_early_exit": (),
    "assistant_ensemble_weight": (), "speculation_type": (), "use_mtp": (False,),
}


def _is_neutral(value: Any, allowed: tuple) -> bool:
    # bool is not a number here: `true` is not the 1 of num_return_sequences
    return value is None or any(type(value) is type(a) or (isinstance(a, float) and type(value) is int)
                                for a in allowed if value == a)


def unused_keys(raw: Mapping[str, Any], path: str) -> list[str]:
    """The keys of ``raw`` that are not honoured and have no effect (to report once). Raises a ConfigError naming
    the first key at a value that would change the tokens; unknown keys are left to the caller's Section."""
    out = []
    for key, value in raw.items():
        if key in INERT:
            out.append(key)
        elif key in NEUTRAL:
            allowed = NEUTRAL[key]
            if not _is_neutral(value, allowed):
                ok = " or ".join(["null", *(repr(a).lower() if isinstance(a, bool) else repr(a) for a in allowed)])
                raise ConfigError(f"{path}.{key}", f"{describe(value)} is not implemented by mindspeed_mm's "
                                  f"generation; use {ok} (no effect)")
            out.append(key)
    return out
