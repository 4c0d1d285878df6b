"""The base of every error that bad user input raises.

A `UserError` is something a person can fix: a config field, a file, a layout. Its message names the field or
file and says what is wrong; the command-line tools print it on one line and exit with status 2 (a traceback
only with `--debug` or `MM_DEBUG=1`). Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "CheckpointFormatError"]


class UserError(ValueError):
    """Bad input a person can fix; the message names the field or file."""


class CheckpointFormatError(UserError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""
