"""Bit-depth reduction ("4-to-8 bit"): banding from quantising to 2**bits levels per channel.

Severity mapping:
    bits = round(8 - 4 * severity)   0.125..0.375 -> 7 bits (128 levels), 0.5 -> 6, 0.75 -> 5,
                                     1.0 -> 4 bits (16 levels); severity 0 is the identity
Levels are evenly spaced over [0, 1] (k / (2**bits - 1)); each value goes to the nearest level.

Option `dither`: False (default; deterministic, the rng is not used), "ordered" (an 8x8 Bayer
threshold matrix: deterministic, a fixed cross-hatch texture) or "random" (a uniform threshold
per pixel and channel from the rng: noise instead of bands).
"""

from __future__ import annotations

import numpy as np

from ._common import check_image, check_severity, identity

NAME = "bitdepth"
ORDER = 60  # quantisation happens when the image is stored, with compression

DITHERS = (False, "ordered", "random")


def bits_for(severity: float) -> int:
    return int(np.floor(8.0 - 4.0 * severity + 0.5))


def bayer_matrix(order: int = 3) -> np.ndarray:
    """The 2**order square Bayer index matrix as thresholds in (0, 1)."""
    matrix = np.zeros((1, 1), dtype=np.float32)
    for _ in range(order):
        matrix = np.block([[4 * matrix, 4 * matrix + 2], [4 * matrix + 3, 4 * matrix + 1]])
    return (matrix + 0.5) / matrix.size


def quantise(img: np.ndarray, bits: int, threshold: np.ndarray | float = 0.5) -> np.ndarray:
    """floor(x * (L - 1) + threshold) / (L - 1) with L = 2**bits; threshold 0.5 rounds to nearest."""
    steps = np.float32(2**bits - 1)
    quantised = np.multiply(img, steps, dtype=np.float32)
    np.add(quantised, threshold, out=quantised)
    np.floor(quantised, out=quantised)
    np.divide(quantised, steps, out=quantised)
    return np.clip(quantised, 0.0, 1.0, out=quantised)


def apply(img: np.ndarray, rng: np.random.Generator, severity: float, dither=False) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if dither not in DITHERS:
        raise ValueError(f"unknown dither {dither!r}; known: {list(DITHERS)}")
    if severity == 0.0:
        return identity(img)

    bits = bits_for(severity)
    height, width = img.shape[:2]
    if dither == "ordered":
        tile = bayer_matrix()
        reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]))
        threshold = np.tile(tile, reps)[:height, :width, None]
    elif dither == "random":
        threshold = rng.random(img.shape, dtype=np.float32)
    else:
        threshold = np.float32(0.5)
    return quantise(img, bits, threshold), {"bits": bits, "levels": 2**bits, "dither": dither or "none"}
