"""The base of every error that bad user input raises, and the runner the command-line tools share.

A `UserError` is something a person can fix: a config field, a file, a layout. Its message names the field or
file and says what is wrong; the command-line tools print it on one line and exit with status 2 (a traceback
only with `--debug` or `MM_DEBUG=1`). Anything else that escapes is a bug and keeps its traceback.

This module imports nothing of the package: every other module may import it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

__all__ = ["UserError", "CheckpointFormatError", "USER_OS_ERRORS", "one_line", "run_main"]


class UserError(ValueError):
    """Bad input a person can fix; the message names the field or file."""


class CheckpointFormatError(UserError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""


# Raised for paths a person gave (their messages name the path), so they are reported like a UserError.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

_TRACEBACK = "Traceback (most recent call last)"


def one_line(e: BaseException) -> str:
    """`e` as one line: its class (when it says more than UserError) and its message, newlines collapsed."""
    text = str(e)
    if _TRACEBACK in text:  # torch's DataLoader re-raises a worker's error with the worker's traceback as message
        text = text.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(e, UserError) and type(e) is not UserError:
        text = f"{type(e).__name__}: {text}"
    return text


def run_main(prog: str, main: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """`main(argv)` (argv without `--debug`); a UserError or one of USER_OS_ERRORS becomes one line
    `{prog}: error: ...` on stderr and status 2. With `--debug` in argv or MM_DEBUG set (not 0), it propagates
    with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MM_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return main(argv) or 0
    try:
        return main(argv) or 0
    except (UserError, *USER_OS_ERRORS) as e:
        # Every rank of a launch reports: a rank may fail on a file only it reads (its own shard).
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f"(rank {rank}) "
        print(f"{prog}: error: {where}{one_line(e)}", file=sys.stderr, flush=True)
        return 2
