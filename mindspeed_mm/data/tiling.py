"""InternVL dynamic-resolution tiling and pixel normalisation (pure functions).

An image is resized to a grid of ``cols x rows`` square tiles whose aspect ratio is closest to the image's
(InternVL's ``dynamic_preprocess``), cropped row-major, and — when there is more than one tile — followed by a
thumbnail of the whole image. Tiles become ``[n, 3, size, size]`` float32 tensors with torchvision ``ToTensor``
semantics (uint8 / 255) and ImageNet mean/std normalisation. Bit-for-bit equal to transformers'
``GotOcr2ImageProcessorPil`` configured like InternVL (tested).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mindspeed_mm.errors import UserError

if TYPE_CHECKING:  # imported where used: the data spec's checks import this module and run before torch
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "candidate_grids",
    "choose_grid",
    "dynamic_tiles",
    "to_pixel_values",
    "load_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=32)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with ``min_tiles <= cols*rows <= max_tiles``, stably sorted by tile count."""
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = [
        (c, r)
        for c in range(1, max_tiles + 1)
        for r in range(1, max_tiles + 1)
        if min_tiles <= c * r <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """The (cols, rows) grid for an image of ``width x height``: closest aspect ratio; on an exact tie the later
    (larger) grid wins only if the image area exceeds half the grid's pixel area."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image,
    image_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split ``image`` into ``image_size``² tiles (row-major) plus a thumbnail when there is more than one."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"empty image of size {image.size}")
    cols, rows = choose_grid(width, height, image_size, min_tiles, max_tiles)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def to_pixel_values(
    tiles: list[Image.Image], mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Stack RGB tiles into ``[n, 3, H, W]`` float32: ``uint8 / 255`` then ``(x - mean) / std`` per channel."""
    import torch

    if not tiles:
        raise ValueError("no tiles to convert")
    arrays = []
    for i, tile in enumerate(tiles):
        if tile.mode != "RGB":
            raise ValueError(f"tile {i} has mode {tile.mode!r}, expected 'RGB' (use load_image / convert('RGB'))")
        arrays.append(np.asarray(tile, dtype=np.uint8))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"tiles differ in size: {sorted({a.shape for a in arrays})}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub(m).div(s).contiguous()


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully and convert it to RGB; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise UserError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
