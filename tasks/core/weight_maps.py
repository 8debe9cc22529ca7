"""Pictures of pixel-wise adapter weights: which expert restored which region.

A weight map is (K+1) x h x w: K adapter weights per pixel (summing to at most one; the rest is
the backbone alone) and `keep` (the share of the input blended back). The picture paints each
pixel with the weight-averaged colour of its adapters over a faded grey copy of the input, so a
region left to the backbone alone (or kept) shows the photo, faded; a legend names the colours.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# one colour per adapter column (RGB, 0-1), cycled beyond ten adapters
PALETTE = np.array([
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.50, 0.50, 0.50),
], np.float32)
FADE = 0.35       # how much of the photo shows through under the colours
LEGEND_ROW = 14   # legend row height, pixels


def colour_of(column: int) -> np.ndarray:
    return PALETTE[column % len(PALETTE)]


def resize_map(weight_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """C x h x w -> C x height x width, bilinear (maps are smooth by construction)."""
    import cv2

    if weight_map.shape[1:] == (height, width):
        return weight_map.astype(np.float32)
    return np.stack([cv2.resize(np.ascontiguousarray(c, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                     for c in weight_map])


def render_weight_map(image: np.ndarray, weight_map: np.ndarray, names: Sequence[str], legend: bool = True) -> np.ndarray:
    """H x W x 3 float image in [0, 1] and its (K+1) x h x w (or K x h x w) weight map ->
    uint8 picture (H (+ legend) x W x 3): adapter colours weighted per pixel over a faded grey input."""
    height, width = image.shape[:2]
    k = len(names)
    if weight_map.ndim != 3 or weight_map.shape[0] not in (k, k + 1):
        raise ValueError(f"weight map must be ({k} or {k + 1}) x h x w for {list(names)}, got {weight_map.shape}")
    weights = np.clip(resize_map(weight_map[:k], height, width), 0.0, 1.0)           # K x H x W
    grey = image[..., :3].astype(np.float32).mean(axis=2, keepdims=True)              # H x W x 1
    faded = 1.0 - FADE + FADE * grey                                                  # light grey photo
    colours = np.stack([colour_of(i) for i in range(k)])                              # K x 3
    painted = np.einsum("khw,kc->hwc", weights, colours)                              # H x W x 3
    total = weights.sum(axis=0)[..., None]                                            # H x W x 1
    out = painted * grey.clip(0.25, 1.0) ** 0.5 + faded * (1.0 - np.minimum(total, 1.0))
    picture = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.concatenate([picture, legend_strip(names, width)], axis=0) if legend else picture


def legend_strip(names: Sequence[str], width: int) -> np.ndarray:
    """A white strip naming each adapter's colour, as wide as the picture (names drawn with OpenCV)."""
    import cv2

    strip = np.full((LEGEND_ROW, width, 3), 255, np.uint8)
    x = 2
    for i, name in enumerate(names):
        colour = tuple(int(round(c * 255)) for c in colour_of(i))
        cv2.rectangle(strip, (x, 3), (x + 8, LEGEND_ROW - 4), colour, thickness=-1)
        cv2.putText(strip, name, (x + 11, LEGEND_ROW - 4), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1, cv2.LINE_AA)
        x += 16 + 7 * len(name)
        if x >= width:
            break
    return strip
