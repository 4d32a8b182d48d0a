"""Image grids: tile a batch of NHWC images in [-1, 1] and write it as a PNG."""
from __future__ import annotations

import os

import numpy as np


def make_grid(images, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tiles images (N, H, W, C), C in {1, 3}, values in [-1, 1], into a uint8 array of
    shape (rows (H + p) + p, nrow (W + p) + p, C) with `nrow` images per row."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1 or 3), got shape {images.shape}")
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c),
                    np.uint8)
    pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for i, img in enumerate(pixels):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = img
    return grid


def save_grid(path: str, images, nrow: int = 8, scale: int | None = None) -> None:
    """Writes `make_grid(images, nrow)` to `path` as a PNG (parent directories are created).

    `scale` enlarges the grid by pixel repetition; by default small images (the 16x16
    digits) are enlarged to about 64 pixels a side so that a person can see them.
    """
    from PIL import Image

    grid = make_grid(images, nrow)
    scale = scale or max(1, 64 // np.shape(images)[1])
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
