"""Ways to move the same bytes from one file into another, timed against `sendfile` (what `cp` and
`shutil.copyfile` use) in the same process: why mm-convert writes its rank files in 8 MiB chunks copied
from the mapped source into an aligned buffer and written with O_DIRECT (`streaming_save`), rather than
buffered or by the kernel (`copy_file_range`), and what the 64-byte alignment of torch.save records costs
when the kernel copies a source range to an output offset in a different place within its page.

    python benchmarks/copy_paths_bench.py [--src DIR] [--reps 2]

Without --src it synthesizes the 3.89 GiB InternVL3-2B-shaped checkpoint of convert_bench.py. Each path copies
every *.safetensors file of DIR and is timed between two os.sync() calls, the sync after it reported apart;
the ratio is of the totals (a direct write leaves nothing to sync).
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 64 << 20


def sendfile(src: int, dst: int, n: int) -> None:
    off = 0
    while off < n:
        off += os.sendfile(dst, src, off, n - off)


def copy_range(shift: int):
    def run(src: int, dst: int, n: int) -> None:
        off = 0
        while off < n:
            off += os.copy_file_range(src, dst, min(CHUNK, n - off), off, off + shift)
    run.__name__ = f"copy_file_range, output {shift} bytes further"
    return run


def mmap_pwrite(src: int, dst: int, n: int) -> None:
    with mmap.mmap(src, 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
        for off in range(0, n, CHUNK):
            os.pwrite(dst, view[off:off + CHUNK], off + 24)


def pread_pwrite(src: int, dst: int, n: int, buf=memoryview(bytearray(4 << 20))) -> None:
    off = 0
    while off < n:
        k = os.preadv(src, [buf], off)
        os.pwrite(dst, buf[:k], off + 24)
        off += k


def mmap_chunks(direct: bool):
    """What streaming_save does: the mapping copied into a page-aligned 8 MiB buffer, written a chunk at a
    time, the last one rounded up to whole blocks and the file cut back."""
    def run(src: int, dst: int, n: int) -> None:
        if direct:
            import fcntl
            fcntl.fcntl(dst, fcntl.F_SETFL, fcntl.fcntl(dst, fcntl.F_GETFL) | os.O_DIRECT)
        chunk = 8 << 20
        buf = mmap.mmap(-1, chunk)
        with mmap.mmap(src, 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view, memoryview(buf) as out:
            for off in range(0, n, chunk):
                k = min(chunk, n - off)
                out[:k] = view[off:off + k]
                w = -(-k // 4096) * 4096 if direct else k
                out[k:w] = bytes(w - k)
                os.pwrite(dst, out[:w], off)
        os.ftruncate(dst, n)
        buf.close()
    run.__name__ = f"mmap -> 8 MiB chunks, {'O_DIRECT' if direct else 'buffered'}"
    return run


PATHS = [sendfile, copy_range(0), copy_range(4096), copy_range(24), mmap_pwrite, pread_pwrite, mmap_chunks(True),
         mmap_chunks(False)]
NAMES = {mmap_pwrite: "mmap + pwrite (24 bytes further)", pread_pwrite: "pread + pwrite, 4 MiB buffer"}


def time_path(fn, files: list[Path], out: Path) -> tuple[float, float]:
    os.sync()
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        with open(f, "rb") as s, open(out / f"{i}", "wb") as d:
            fn(s.fileno(), d.fileno(), os.fstat(s.fileno()).st_size)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    for i in range(len(files)):
        (out / f"{i}").unlink()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="copy_paths_bench-"))
    try:
        src = Path(a.src) if a.src else work / "hf"
        if not a.src:
            sys.path.insert(0, str(Path(__file__).parent))
            from convert_bench import synthesize
            synthesize(src)
        files = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        print(f"{len(files)} files, {total / 2**30:.2f} GiB")
        for rep in range(a.reps):
            base = None
            for fn in PATHS:
                dt, sync = time_path(fn, files, work)
                base = base or dt + sync
                print(f"  round {rep + 1}: {NAMES.get(fn, fn.__name__):45s} {dt:6.2f}s, then sync {sync:.2f}s "
                      f"({(dt + sync) / base:.2f}x sendfile's total)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
