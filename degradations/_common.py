"""Helpers shared by the degradation modules. Not a degradation itself, so not in the registry.

Speed notes that shape the code of every module:
  * float32 throughout; OpenCV for per-channel scalars and exp/log (numpy broadcasting a scalar
    per channel or an HxW map over HxWx3 is 5-10x slower than an OpenCV call or a same-shape op);
  * few full-size temporaries, updated in place (`dst=`, `out=`): every fresh image-sized array
    costs page faults, and glibc hands freed memory back to the OS eagerly, so a function that
    allocates a lot pays those faults again on every call (several ms at 512x512).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


def check_image(img: np.ndarray) -> np.ndarray:
    """The image as a float32 HxWx3 array (no copy when it already is one)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    return img


def check_severity(severity: float) -> float:
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    return severity


def identity(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """What every degradation returns at severity 0."""
    return img.copy(), {"identity": True}


def lerp(start: float, end: float, t: float) -> float:
    return start + (end - start) * t


def ramp(severity: float, start: float, end: float) -> float:
    """0 below `start`, 1 above `end`, linear between: fades a component in as severity rises."""
    return min(max((severity - start) / (end - start), 0.0), 1.0)


@functools.cache
def _normal_quantiles() -> np.ndarray:
    from scipy.special import ndtri

    # Mid-point quantiles of N(0, 1), rescaled to unit variance (the tails are cut at 4.3 sigma).
    table = ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)
    return table / table.std()


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) samples, about 2.5x faster than rng.standard_normal.

    Inverse-CDF sampling from a 65536-entry quantile table indexed by 16-bit random integers:
    the distribution is a normal truncated at 4.3 sigma and discretised in steps of 4e-5 sigma,
    far below anything visible after 8-bit quantisation.
    """
    index = rng.integers(0, 65536, size=int(np.prod(shape)), dtype=np.uint16)
    return np.take(_normal_quantiles(), index).reshape(shape)


COARSE_SIDE = 64  # smooth maps live at most this large; bilinear upsampling from here is invisible


def coarse_shape(height: int, width: int) -> tuple[int, int]:
    return min(height, COARSE_SIDE), min(width, COARSE_SIDE)


def coarse_field(rng: np.random.Generator, height: int, width: int, grid: int = 8) -> np.ndarray:
    """A smooth random field in [0, 1] at coarse_shape(height, width): a grid x grid lattice of
    uniform values, normalised to span [0, 1], upsampled bicubically (correlation length ~ size/grid)."""
    lattice = rng.random((grid, grid), dtype=np.float32)
    lattice -= lattice.min()
    lattice /= max(float(lattice.max()), 1e-6)
    coarse_h, coarse_w = coarse_shape(height, width)
    field = cv2.resize(lattice, (coarse_w, coarse_h), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0, out=field)


def upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize to HxW (any channel count); the array itself if it already has that size."""
    if coarse.shape[:2] == (height, width):
        return coarse
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def gray_to_rgb(plane: np.ndarray) -> np.ndarray:
    """Repeat an HxW float32 plane over 3 channels (to combine with images without broadcasting)."""
    return cv2.cvtColor(np.ascontiguousarray(plane, dtype=np.float32), cv2.COLOR_GRAY2RGB)


def scale_channels(img: np.ndarray, gains, out: np.ndarray | None = None) -> np.ndarray:
    """img * gains per channel, into `out` (which may be img itself)."""
    g = [float(v) for v in gains]
    return cv2.multiply(img, (g[0], g[1], g[2], 0.0), dst=out)


def screen(base: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Screen blend 1 - (1 - base)(1 - layer) = base + layer * (1 - base): light added on top.
    Both in [0, 1] and the same shape; one new array."""
    out = np.subtract(np.float32(1.0), base, dtype=np.float32)
    np.multiply(out, layer, out=out)
    return np.add(out, base, out=out)


def add_light(img: np.ndarray, light_rgb: np.ndarray) -> np.ndarray:
    """screen(img, light_rgb) as one new array, with no (1 - img) temporary: computed as
    img - (-light) * img - (-light) with OpenCV's fused multiply-accumulate. Overwrites light_rgb."""
    out = img.copy()
    negative_light = np.negative(light_rgb, out=light_rgb)
    cv2.accumulateProduct(negative_light, img, out)
    return np.subtract(out, negative_light, out=out)


SRGB_GAMMA = 2.2  # a pure power law approximates the sRGB curve to within about 1% of full scale


def power(x: np.ndarray, exponent: float, out: np.ndarray | None = None) -> np.ndarray:
    """x ** exponent for x >= 0 as exp(exponent * log x), about 4x faster than np.power on float32.
    Into `out` (which may be x itself)."""
    out = np.maximum(x, np.float32(1e-8), out=out)
    cv2.log(out, dst=out)
    np.multiply(out, np.float32(exponent), out=out)
    return cv2.exp(out, dst=out)


def add_signal_dependent_noise(signal: np.ndarray, unit_noise: np.ndarray, shot_gain: float,
                               read_variance: float) -> np.ndarray:
    """signal + unit_noise * sqrt(shot_gain * signal + read_variance): Poisson-Gaussian noise in
    its normal approximation. Needs shot_gain > 0.

    Computed with no third image-sized array: with s = sqrt(shot_gain * signal + read_variance),
    signal = (s**2 - read_variance) / shot_gain, so the result is s * (s / shot_gain + n) -
    read_variance / shot_gain. `signal` is overwritten with s; the result is written into
    `unit_noise` and returned.
    """
    std = np.multiply(signal, np.float32(shot_gain), out=signal)
    np.add(std, np.float32(read_variance), out=std)
    cv2.sqrt(std, dst=std)
    noisy = cv2.scaleAdd(std, 1.0 / shot_gain, unit_noise, dst=unit_noise)
    np.multiply(noisy, std, out=noisy)
    return np.subtract(noisy, np.float32(read_variance / shot_gain), out=noisy)


def clip01(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place and return the same float32 array."""
    return np.clip(img, 0.0, 1.0, out=img)
