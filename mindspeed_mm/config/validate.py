"""The one validator of the JSON files a user hands us (model, data and inference): one error type, one JSON
reader, one typed reader of a JSON object, one annotation-driven check of dataclass fields.

Rules, the same for every file: ``bool`` is not an ``int``; an ``int`` is accepted where a number is wanted (and
becomes a ``float``); a key nobody knows is an error naming its path and the keys known there; a malformed file
is an error naming the file, line and column; a key written twice in one object is an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from mindspeed_mm.errors import UserError

__all__ = ["ConfigError", "Section", "check_fields", "check_value", "describe", "join", "parse_json",
           "read_json"]

REQUIRED = dataclasses.MISSING  # Section.get's default: the key must be there


class ConfigError(UserError):
    """A config file or value is wrong. ``key_path`` names the key (``text_decoder.num_layers``; "" for the
    file as a whole), ``detail`` says what is wrong, ``source`` is the file (None: not read from a file).

    The message is ``"key_path: detail (in source)"``, or ``"source: detail"`` without a key path."""

    def __init__(self, key_path: str, message: str, source: Optional[str] = None):
        self.key_path, self.detail, self.source = key_path, message, source
        if key_path:
            text = f"{key_path}: {message}" + (f" (in {source})" if source else "")
        else:
            text = f"{source}: {message}" if source else message
        super().__init__(text)

    def __reduce__(self):  # picklable across processes despite the three arguments
        return type(self), (self.key_path, self.detail, self.source)

    def in_file(self, source: Any) -> ConfigError:
        """This error naming the file ``source`` (unchanged if it names one already)."""
        return self if self.source else ConfigError(self.key_path, self.detail, str(source))


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def describe(value: Any) -> str:
    """A value for a message: its type and (shortened) repr; ``null`` for None."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# ------------------------------------------------------------------------------------------------ JSON files

def parse_json(text: str, source: Optional[str] = None, key_path: str = "") -> Any:
    """JSON text -> value, rejecting a key written twice in one object."""
    def unique(pairs: list) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise ConfigError(key_path, f"duplicate key {k!r}", source)
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ConfigError(key_path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source) from None


def read_json(path: Any) -> Any:
    """The parsed JSON file ``path``; a missing or unreadable file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read the file: {e.strerror or e}", str(path)) from None
    return parse_json(text, str(path))


# ------------------------------------------------------------------------------------------------ values

_NAMES = {bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "object"}


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(path: str, hint: Any, value: Any, *, choices: Iterable[Any] = (),
                minimum: Optional[float] = None) -> Any:
    """``value`` checked against a simple annotation (bool, int, float, str, list, dict, a dataclass, Any, or
    ``Optional`` of one) and, unless null, against ``choices`` and ``minimum``; returned normalised
    (int -> float where a float is wanted)."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        assert len(inner) == 1, hint  # only Optional[X]
        if value is None:
            if len(inner) < len(get_args(hint)):
                return None
            raise ConfigError(path, f"expected {_type_name(hint)}, got null")
        hint = inner[0]
    if hint is Any or hint is object:
        ok = True
    elif hint is float or hint is int:
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    elif hint is dict:
        ok = isinstance(value, Mapping)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        raise TypeError(f"unsupported annotation {hint!r} for {path}")  # a programming error
    if not ok:
        raise ConfigError(path, f"expected {_type_name(hint)}, got {describe(value)}")
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
    choices = tuple(choices)
    if choices and value not in choices:
        raise ConfigError(path, f"{json.dumps(value)} is not supported; expected "
                          f"{' or '.join(json.dumps(c) for c in choices)}")
    if minimum is not None and value < minimum:
        raise ConfigError(path, f"must be >= {minimum}, got {value!r}")
    return value


def check_fields(obj: Any, path: str, choices: Mapping[str, Iterable[Any]], skip: Iterable[str] = ()) -> None:
    """Check every field of the (frozen) dataclass ``obj`` against its annotation and ``choices[name]``, and
    store the normalised value. ``path`` is the object's key path; fields in ``skip`` are left to the caller."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            value = check_value(join(path, f.name), hints[f.name], getattr(obj, f.name),
                                choices=choices.get(f.name, ()))
            object.__setattr__(obj, f.name, value)


class Section:
    """One JSON object at key path ``path``, read key by key: :meth:`get` each key (typed), :meth:`accept` keys
    that have no effect, then :meth:`done` rejects every other key. ``known``: the keys allowed, when they are
    known up front; the others are rejected at once."""

    def __init__(self, raw: Any, path: str = "", known: Optional[Iterable[str]] = None):
        if not isinstance(raw, Mapping):
            raise ConfigError(path or "<root>", f"expected an object, got {describe(raw)}")
        self.raw, self.path, self.known = raw, path, set(known or ())
        if known is not None:
            self.done()

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def key(self, name: str) -> str:
        return join(self.path, name)

    def get(self, name: str, kind: Any = Any, default: Any = REQUIRED, *, choices: Iterable[Any] = (),
            nullable: bool = False, minimum: Optional[float] = None) -> Any:
        """The value of key ``name`` checked as :func:`check_value` does; ``default`` when absent (absent with
        no default: an error). ``nullable``: null is accepted too."""
        self.known.add(name)
        if name not in self.raw:
            if default is REQUIRED:
                raise ConfigError(self.key(name), "missing required key")
            return default
        return check_value(self.key(name), Optional[kind] if nullable else kind, self.raw[name],
                           choices=choices, minimum=minimum)

    def accept(self, *names: str) -> None:
        """Keys allowed here that have no effect."""
        self.known.update(names)

    def done(self) -> None:
        unknown = [k for k in self.raw if k not in self.known]
        if unknown:
            first = unknown[0]
            close = difflib.get_close_matches(str(first), sorted(self.known), n=1)
            raise ConfigError(self.key(first), f"unknown key (value {describe(self.raw[first])})"
                              + (f"; also unknown: {', '.join(unknown[1:])}" if unknown[1:] else "")
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f"; known keys here: {', '.join(sorted(self.known))}")
