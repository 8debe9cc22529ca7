"""Falling particles (rain streaks, snow flakes), shared by `rain` and `snow`. Not a degradation.

Particles are drawn on a coarse grid and rendered to the image in one affine warp:

    seeds   sparse random points: a cell is seeded where its uniform draw u < density; its
            intensity (1 - u / (2 * max_density)) lies in [0.5, 1] and does not depend on the density,
            so a higher density keeps every seed of a lower one, unchanged,
    streaks an unnormalised box filter along the grid's columns (the fall direction) smears every
            seed into a streak of `length` cells of constant intensity (and a tent across it),
    warp    one cv2.warpAffine maps grid cells to cell_w x cell_h pixels and shears the columns to
            the fall angle, with bilinear interpolation for anti-aliased edges.

Cost is one warp per image, whatever the number of particles, layers or their length (the
filters run on the small grid), which is what keeps rain and snow cheap. Every step
is monotone: more density, length or brightness only ever adds light, so for a fixed seed a
higher severity is the same particles, more of them and brighter.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ._common import add_light, gray_to_rgb, ramp


def fade_in(severity: float, fade: tuple[float, float]) -> float:
    """A layer's opacity: 1 for fade (0, 0) (always on), else ramping from 0 to 1 over the range."""
    start, end = fade
    return 1.0 if end <= 0.0 else ramp(severity, start, end)


def grid_shape(height: int, width: int, cell_h: float, cell_w: float) -> tuple[int, int]:
    return int(math.ceil(height / cell_h)) + 1, int(math.ceil(width / cell_w)) + 1


def seed_intensities(uniform: np.ndarray, max_density: float) -> np.ndarray:
    """Map uniform draws u to intensities 1 - u / (2 * max_density), in place: a cell is seeded at
    density d when u < d, and then its intensity lies in [0.5, 1] whatever d is."""
    np.multiply(uniform, np.float32(-0.5 / max_density), out=uniform)
    return np.add(uniform, np.float32(1.0), out=uniform)


def seeds(intensities: np.ndarray, density: float, max_density: float) -> np.ndarray:
    """Seed intensities at `density`: u < d is intensity > 1 - d / (2 * max_density); 0 elsewhere."""
    return cv2.threshold(intensities, 1.0 - 0.5 * density / max_density, 0.0, cv2.THRESH_TOZERO)[1]


def cross_profile(width: float) -> np.ndarray:
    """A streak's brightness across its width: a tent of peak 1 (1 pixel wide: a single tap).
    Soft shoulders rather than a box, as wide streaks are drops near the lens, out of focus."""
    half = int(math.ceil(width))
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    profile = np.maximum(np.float32(1.0) - np.abs(offsets) / np.float32(0.5 * width + 0.5), np.float32(0.0))
    return profile[profile > 0]


def streaks(seed_grid: np.ndarray, length_cells: int, width_cells: float = 1.0) -> np.ndarray:
    """Every seed smeared `length_cells` down its column (constant intensity) and across with the
    cross profile, capped at 1.

    The centred windows along the column are nested (a longer one contains every shorter one), so
    a longer streak is a superset of the shorter one.
    """
    along = np.ones(length_cells, dtype=np.float32)
    smeared = cv2.sepFilter2D(seed_grid, -1, cross_profile(width_cells), along, borderType=cv2.BORDER_REFLECT)
    return np.minimum(smeared, np.float32(1.0), out=smeared)


def render(grid: np.ndarray, height: int, width: int, cell_h: float, cell_w: float, angle: float) -> np.ndarray:
    """Warp the grid to an HxW image: each cell becomes cell_w x cell_h pixels and the columns tilt
    by `angle` radians from vertical (a shear, so streak lengths grow by 1/cos(angle))."""
    shear = math.tan(angle)
    # Inverse map, pixel centres to grid coordinates: gx = (x + 0.5 - shear * (y - h/2)) / cell_w - 0.5.
    to_grid = np.array([
        [1.0 / cell_w, -shear / cell_w, (0.5 + shear * height / 2.0) / cell_w - 0.5],
        [0.0, 1.0 / cell_h, 0.5 / cell_h - 0.5],
    ], dtype=np.float64)
    return cv2.warpAffine(grid, to_grid, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_WRAP)


def veil(field: np.ndarray, strength: float, floor: float) -> np.ndarray:
    """A whitening veil (screen-blend amount), varying smoothly from `floor` * strength to
    `strength` with the field in [0, 1]. Overwrites and returns `field`."""
    np.multiply(field, np.float32(strength * (1.0 - floor)), out=field)
    return np.add(field, np.float32(strength * floor), out=field)


def add_to_image(img: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Screen-blend an HxW map of white light onto the image (a new array)."""
    return add_light(img, gray_to_rgb(light))
