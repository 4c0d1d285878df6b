"""Video frames for training: which frames (``frame_indices``) and reading them (``read_video_frames``).

Sampling follows InternVL's ``get_frame_indices``: the video (or the ``clip`` of it) is cut into ``T`` equal
intervals; ``rand`` takes one uniformly random frame in each, ``middle`` the middle one; a video shorter than
``T`` frames yields one frame per frame and is padded with its last frame, so every sample of a given ``T``
has ``T`` frames. ``fps<r>`` takes frames at ``r`` frames per second (at the middle of each ``1/r`` span) and,
as InternVL's training reader does (``read_frames_decord`` calls ``get_frame_indices`` without
``max_num_frames``), is not capped by ``max_num_frame``: a 10 s clip with ``fps2`` gives 20 frames. A cap applies
only when asked for (``num_frames`` not None; the dataset's halving of a too-long sample). Deliberate
differences: upstream's ``rand`` draws from ``range(start, end - 1)`` and so never picks an interval's last
frame (and falls back to a random permutation when an interval holds a single frame); here every frame of the
interval is a candidate. A clip too short for the ``fps<r>`` grid gives its middle frame (upstream: none).

Decoding uses decord when it imports and PyAV otherwise; both go through FFmpeg's decoders and give the same
RGB frames (tested).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from PIL import Image

from mindspeed_mm.errors import UserError

__all__ = ["frame_indices", "read_video_frames", "video_backend"]


def frame_indices(num_frames: int | None, vlen: int, sampling: str = "rand", fps: float | None = None,
                  rng: np.random.Generator | None = None) -> list[int]:
    """Indices (into a video of ``vlen`` frames) of the frames to use. ``fps`` (the video's frame rate) is
    needed for ``fps<r>`` sampling; ``rng`` for ``rand`` (a fresh unseeded one if None). ``num_frames`` is the
    frame count for ``rand``/``middle``; for ``fps<r>`` it is a cap, None for none (InternVL's default)."""
    if vlen < 1:
        raise ValueError(f"a video needs at least one frame, got vlen={vlen}")
    if num_frames is None and not sampling.startswith("fps"):
        raise ValueError(f"{sampling!r} sampling needs num_frames")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sampling in ("rand", "middle"):
        n = min(num_frames, vlen)
        bounds = np.linspace(0, vlen, n + 1).astype(int)
        if sampling == "rand":
            rng = rng if rng is not None else np.random.default_rng()
            idx = [int(rng.integers(lo, hi)) for lo, hi in pairwise(bounds)]
        else:
            idx = [int(lo + hi - 1) // 2 for lo, hi in pairwise(bounds)]
        return idx + [idx[-1]] * (num_frames - n)
    if sampling.startswith("fps"):
        rate = float(sampling[3:])
        if rate <= 0 or fps is None or fps <= 0:
            raise ValueError(f"fps sampling needs a positive rate and the video's frame rate, got "
                             f"sampling={sampling!r}, fps={fps!r}")
        step = 1.0 / rate
        seconds = np.arange(step / 2, vlen / fps + step / 2, step)
        idx = [int(i) for i in np.around(seconds * fps).astype(int) if i < vlen]
        if num_frames is not None:
            idx = idx[:num_frames]  # the first ones, as get_frame_indices(max_num_frames=...) keeps them
        # A clip shorter than half a sampling step has no frame on the grid: take its middle frame.
        return idx or [(vlen - 1) // 2]
    raise ValueError(f"unknown sampling {sampling!r}: expected 'rand', 'middle' or 'fps<rate>'")


def video_backend() -> str:
    try:
        import decord  # noqa: F401
        return "decord"
    except ImportError:
        return "av"


class _DecordVideo:
    def __init__(self, path: str):
        import decord

        self._reader = decord.VideoReader(path, num_threads=1)
        self.vlen, self.fps = len(self._reader), float(self._reader.get_avg_fps())

    def frames(self, idx: Sequence[int]) -> np.ndarray:
        return self._reader.get_batch(list(idx)).asnumpy()


class _AVVideo:
    """PyAV fallback: decodes the whole stream once (fine for the short clips of training data)."""

    def __init__(self, path: str):
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self._all = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        self.vlen, self.fps = len(self._all), float(rate) if rate else 0.0

    def frames(self, idx: Sequence[int]) -> np.ndarray:
        return np.stack([self._all[i] for i in idx])


def read_video_frames(path: str | os.PathLike, num_frames: int | None, sampling: str = "rand",
                      clip: Sequence[float] | None = None, rng: np.random.Generator | None = None
                      ) -> list[Image.Image]:
    """``num_frames`` RGB frames of the video at ``path`` (for ``fps<r>`` sampling: at most that many, every
    frame of the rate's grid when None), taken
    from the ``clip = [start, end]`` seconds if given. Errors name the file: FileNotFoundError if it does not
    exist, UserError (a ValueError) if it cannot be decoded or the clip is empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        video = _DecordVideo(path) if video_backend() == "decord" else _AVVideo(path)
    except Exception as e:  # decord raises DECORDError, PyAV av.error.*; both mean "not a readable video"
        raise UserError(f"cannot read video file {path}: {type(e).__name__}: {e}") from e
    if video.vlen < 1:
        raise UserError(f"video file {path} has no frames")
    start, vlen = 0, video.vlen
    if clip is not None:
        if len(clip) != 2 or video.fps <= 0 or not 0 <= clip[0] < clip[1]:
            raise UserError(f"video file {path}: bad clip {list(clip)!r} (want [start, end] seconds, "
                            f"0 <= start < end; frame rate {video.fps})")
        start = int(clip[0] * video.fps)
        vlen = min(int((clip[1] - clip[0]) * video.fps), video.vlen - start)
        if vlen < 1:
            raise UserError(f"video file {path}: clip {list(clip)!r} holds no frame of the {video.vlen}-frame, "
                            f"{video.fps:g} fps video")
    idx = [start + i for i in frame_indices(num_frames, vlen, sampling, video.fps, rng)]
    try:
        arrays = video.frames(idx)
    except Exception as e:
        raise UserError(f"cannot decode frames {idx} of video file {path}: {type(e).__name__}: {e}") from e
    return [Image.fromarray(a).convert("RGB") for a in arrays]
