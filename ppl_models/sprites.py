"""A procedurally generated sprites set with known generative factors (in the spirit of dSprites, Matthey et al. 2017).

Every image is 32 x 32 binary: one white shape on black, drawn by testing
each pixel centre against the shape in its own frame. The factors and their
grid (every combination appears exactly once, :data:`FACTOR_SIZES`):

==========  =======  ===============================================================
factor      values   meaning
==========  =======  ===============================================================
shape       3        square, ellipse (axes 1 : 0.55), triangle (equilateral)
scale       4        half-size 4.0, 5.0, 6.0, 7.0 pixels
rotation    8        0, 11.25, ..., 78.75 degrees (below the square's 90-degree symmetry)
x           8        centre column 8.5 .. 23.5 pixels, evenly spaced
y           8        centre row 8.5 .. 23.5 pixels, evenly spaced
==========  =======  ===============================================================

3 * 4 * 8 * 8 * 8 = 6,144 images. The seed only shuffles them and draws the
test split, so the same seed gives the same arrays everywhere; no download.
"""
import math
from typing import Any

import numpy as np
import torch

FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y")
SHAPES = ("square", "ellipse", "triangle")
SCALES = (4.0, 5.0, 6.0, 7.0)
ROTATIONS_DEG = tuple(11.25 * i for i in range(8))
POSITIONS = tuple(np.linspace(8.5, 23.5, 8).tolist())
FACTOR_SIZES = (len(SHAPES), len(SCALES), len(ROTATIONS_DEG), len(POSITIONS), len(POSITIONS))
SIZE = 32


def factor_grid() -> np.ndarray:
    """Every combination of factor indices, (6144, 5) int64, in C order (shape slowest, y fastest)."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in FACTOR_SIZES], indexing="ij"), -1).reshape(-1, 5)


def render(factors: Any) -> torch.Tensor:
    """Binary images (N, 32*32) float32 of factor-index rows (N, 5) (columns as :data:`FACTOR_NAMES`)."""
    factors = np.asarray(factors)
    shape = factors[:, 0]
    scale = np.asarray(SCALES)[factors[:, 1]][:, None, None]
    theta = np.deg2rad(np.asarray(ROTATIONS_DEG)[factors[:, 2]])[:, None, None]
    cx = np.asarray(POSITIONS)[factors[:, 3]][:, None, None]
    cy = np.asarray(POSITIONS)[factors[:, 4]][:, None, None]
    rows, cols = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5, indexing="ij")
    dx, dy = cols[None] - cx, rows[None] - cy
    # the pixel in the shape's frame (rotate by -theta), in units of the half-size
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / scale
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / scale
    square = np.maximum(np.abs(u), np.abs(v)) <= 1.0
    ellipse = u**2 + (v / 0.55) ** 2 <= 1.0
    # equilateral triangle with circumradius 1.15, one side parallel to the x axis at rotation 0
    r = 1.15
    tri = (v <= r * 0.5) & (math.sqrt(3) * u - v <= r) & (-math.sqrt(3) * u - v <= r)
    img = np.where(shape[:, None, None] == 0, square, np.where(shape[:, None, None] == 1, ellipse, tri))
    return img.reshape(len(factors), SIZE * SIZE).astype(np.float32)


def make_sprites(seed: int = 0) -> tuple[Any, ...]:
    """All 6,144 sprites in an order drawn from ``seed``: ``(x (N, 1024) float32 in {0, 1}, factors (N, 5) int64)``."""
    factors = factor_grid()
    order = np.random.default_rng(seed).permutation(len(factors))
    factors = factors[order]
    return render(factors), factors


def load_sprites_arrays(split_seed: int = 0, test_fraction: float = 0.1) -> tuple[Any, ...]:
    """(x_train, y_train, x_test, y_test, f_train, f_test): y is the shape index, f all five factor indices."""
    x, f = make_sprites(split_seed)
    n_test = int(round(test_fraction * len(x)))
    return x[n_test:], f[n_test:, 0], x[:n_test], f[:n_test, 0], f[n_test:], f[:n_test]
