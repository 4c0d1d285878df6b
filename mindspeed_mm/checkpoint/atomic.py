"""Outputs that appear whole or not at all: a directory is written beside its target and renamed into
place once complete, a small file through a temporary one; an interrupted writer leaves nothing
half-written at the target."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["check_output_dir", "replace_dir", "atomic_output_dir", "replace_file"]


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True, --cfg.overwrite True on the command line, to replace it)")


def replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `out_dir`; an empty `out_dir` is replaced, a non-empty one only if `overwrite`."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif overwrite:
            trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
            return
        else:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True, --cfg.overwrite True on the command line, to replace it)")
    os.replace(tmp, out_dir)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it is renamed to `out_dir`, on any error
    (or interruption) it is removed, so no half-written checkpoint is ever left at `out_dir`."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, synced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
