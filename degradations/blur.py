"""Optical and motion blur: gaussian, motion (curved random trajectory) or defocus (disc).

The kind is drawn uniformly by the rng unless `kind=` is given. Severity mapping, in pixels:
    gaussian   sigma  = 3.0 * severity                (OpenCV's kernel: 8 sigma + 1, at most 25 x 25)
    motion     length = 21 * severity along the path  (kernel about length + 3 pixels square)
    defocus    radius = 5 * severity                  (anti-aliased disc, at most 11 x 11)

The motion trajectory is a random walk of 16 segments: a uniform start angle and a heading that
turns by N(0, 0.12) rad per segment, so paths range from nearly straight to gently curved (GoPro
blur kernels look like this). The kernel is the path rasterised with bilinear splats, normalised,
and centred on its centroid so that blur never shifts the image. The path shape is drawn before
the severity is applied, so for a fixed seed a higher severity is the same path, longer.
Borders are reflected.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ._common import check_image, check_severity, clip01, identity

NAME = "blur"
ORDER = 30  # the optics blur the scene (after haze, low light) and before the sensor adds noise

KINDS = ("gaussian", "motion", "defocus")
MAX_GAUSSIAN_SIGMA = 3.0
MAX_MOTION_LENGTH = 21.0
MAX_DEFOCUS_RADIUS = 5.0
MOTION_SEGMENTS = 16
MOTION_TURN_STD = 0.12  # radians per segment
SPLATS_PER_PIXEL = 4  # path samples per pixel of length
DIRECT_MAX_TAPS = 121  # OpenCV filters kernels up to about 11x11 directly, larger ones by DFT


def motion_path(angle: float, turns: np.ndarray, length: float) -> np.ndarray:
    """Vertices (x, y) of a random-walk path of total arc length `length` starting at the origin."""
    headings = angle + np.concatenate([[0.0], np.cumsum(turns)])
    step = length / len(headings)
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def resample_path(vertices: np.ndarray, count: int) -> np.ndarray:
    """`count` points evenly spaced (by segment index) along the polyline."""
    position = np.linspace(0.0, len(vertices) - 1, count)
    index = np.minimum(position.astype(int), len(vertices) - 2)
    frac = (position - index)[:, None]
    return vertices[index] * (1.0 - frac) + vertices[index + 1] * frac


def splat(points: np.ndarray) -> np.ndarray:
    """Rasterise points (x, y) around the origin into a normalised, odd-sized square kernel."""
    half = int(math.ceil(np.abs(points).max())) + 1
    size = 2 * half + 1
    x, y = points[:, 0] + half, points[:, 1] + half
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    flat = np.concatenate([y0 * size + x0, y0 * size + x0 + 1, (y0 + 1) * size + x0, (y0 + 1) * size + x0 + 1])
    weights = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    kernel = np.bincount(flat, weights=weights, minlength=size * size).reshape(size, size)
    return (kernel / kernel.sum()).astype(np.float32)


def motion_kernel(angle: float, turns: np.ndarray, length: float) -> np.ndarray:
    points = resample_path(motion_path(angle, turns, length), max(2, int(math.ceil(length * SPLATS_PER_PIXEL))))
    return splat(points - points.mean(axis=0))  # centred on the centroid: blur without a shift


def defocus_kernel(radius: float) -> np.ndarray:
    """A uniform disc with a one-pixel anti-aliased rim, normalised."""
    half = int(math.ceil(radius))
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = np.clip(radius + 0.5 - np.hypot(x, y), 0.0, 1.0)
    return (kernel / kernel.sum()).astype(np.float32)


def filter_with(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate with `kernel` (centre at its middle), reflecting the borders.

    filter2D's cost grows with the kernel's area, and above about 11x11 taps it switches to a DFT
    that is 3-10x slower than direct filtering of a thin motion path. So the kernel is trimmed to
    its non-zero box, and a box still too large is cut into bands of rows filtered directly.
    """
    rows = np.flatnonzero(kernel.any(axis=1))
    cols = np.flatnonzero(kernel.any(axis=0))
    if (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) > DIRECT_MAX_TAPS and len(rows) > 1:
        return filter_in_bands(img, kernel)
    centre = kernel.shape[0] // 2
    trimmed = np.ascontiguousarray(kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    anchor = (centre - int(cols[0]), centre - int(rows[0]))
    return cv2.filter2D(img, -1, trimmed, anchor=anchor, borderType=cv2.BORDER_REFLECT)


def row_bands(kernel: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row ranges [r0, r1) of the kernel whose non-zero boxes hold at most
    DIRECT_MAX_TAPS taps each (a band has at least one row)."""
    nonzero = kernel != 0
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), kernel.shape[1])
    last = np.where(nonzero.any(axis=1), kernel.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1), -1)
    bands, start = [], 0
    while start < kernel.shape[0]:
        end, left, right = start + 1, first[start], last[start]
        while end < kernel.shape[0]:
            new_left, new_right = min(left, first[end]), max(right, last[end])
            if (end + 1 - start) * (new_right - new_left + 1) > DIRECT_MAX_TAPS:
                break
            left, right, end = new_left, new_right, end + 1
        bands.append((start, end))
        start = end
    return bands


def filter_in_bands(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The correlation as a sum over row bands, each filtered directly on a reflect-padded copy
    with its top-left tap as anchor, then read back at the band's offset in the kernel."""
    half = kernel.shape[0] // 2
    height, width = img.shape[:2]
    padded = cv2.copyMakeBorder(img, half, half, half, half, cv2.BORDER_REFLECT)
    band_out = np.empty_like(padded)
    out = None
    for start, end in row_bands(kernel):
        band = kernel[start:end]
        rows = np.flatnonzero(band.any(axis=1))
        if len(rows) == 0:
            continue
        cols = np.flatnonzero(band.any(axis=0))
        taps = np.ascontiguousarray(band[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        cv2.filter2D(padded, -1, taps, dst=band_out, anchor=(0, 0), borderType=cv2.BORDER_REFLECT)
        y, x = start + int(rows[0]), int(cols[0])
        shifted = band_out[y:y + height, x:x + width]
        out = shifted.copy() if out is None else np.add(out, shifted, out=out)
    return out


def apply(img: np.ndarray, rng: np.random.Generator, severity: float, kind: str | None = None
          ) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown blur kind {kind!r}; known: {list(KINDS)}")
    if severity == 0.0:
        return identity(img)

    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind == "gaussian":
        sigma = MAX_GAUSSIAN_SIGMA * severity
        blurred = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        params = {"kind": kind, "sigma": sigma}
    elif kind == "motion":
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        turns = rng.normal(0.0, MOTION_TURN_STD, MOTION_SEGMENTS - 1)
        length = MAX_MOTION_LENGTH * severity
        kernel = motion_kernel(angle, turns, length)
        blurred = filter_with(img, kernel)
        params = {"kind": kind, "length": length, "angle_deg": math.degrees(angle),
                  "turns_rad": [float(t) for t in turns], "kernel_size": int(kernel.shape[0])}
    else:
        radius = MAX_DEFOCUS_RADIUS * severity
        kernel = defocus_kernel(radius)
        blurred = filter_with(img, kernel)
        params = {"kind": kind, "radius": radius, "kernel_size": int(kernel.shape[0])}
    return clip01(blurred), params  # the DFT path of filter2D can round a hair below 0
