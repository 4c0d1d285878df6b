"""The Megatron flags that repeat the model JSON (``--vocab-size``, ``--rotary-base``, ``--swiglu``, ...), checked
against the spec: one check for ``pretrain_vlm.py`` and ``inference_vlm.py``. The JSON is the one source of the
model's shape, so a contradiction is an error naming both, not a silent winner."""
from __future__ import annotations

from typing import Any, Optional

from mindspeed_mm.errors import UserError

__all__ = ["ArgumentError", "REPEATED_FLAGS", "check_model_flags", "flag_name"]


class ArgumentError(UserError):
    """A flag's value is invalid or contradicts another flag or the model spec."""


# flag dest -> its type; each must equal text_decoder.<dest>
REPEATED_FLAGS = {"vocab_size": int, "rotary_base": float, "normalization": str, "max_position_embeddings": int,
                  "position_embedding_type": str}


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_model_flags(spec, source: Any, flags: dict[str, Optional[Any]], swiglu: bool = False) -> None:
    """``flags``: values of REPEATED_FLAGS (None: not given); ``swiglu``: --swiglu was given. ``source`` names
    the JSON in the message."""
    t = spec.text
    for name, flag in flags.items():
        if flag is not None and flag != getattr(t, name):
            raise ArgumentError(f"{flag_name(name)} {flag!r} contradicts text_decoder.{name} {getattr(t, name)!r} "
                                f"of {source}")
    if swiglu and not (t.gated_linear_unit and t.activation_func == "silu"):
        raise ArgumentError(f"--swiglu contradicts text_decoder (gated_linear_unit={t.gated_linear_unit}, "
                            f"activation_func={t.activation_func!r}) of {source}")
