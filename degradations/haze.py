"""Haze by the atmospheric scattering model I = J * t + A * (1 - t), t = exp(-beta * d).

Severity mapping:
    beta (scattering coefficient per unit of pseudo-depth) = 2.8 * severity
    -> transmission at the farthest point t = exp(-beta): 1.0 at severity 0, 0.57 at 0.2,
       0.25 at 0.5, 0.06 at 1.0 (SOTS-like dense haze).

Pseudo-depth d in [0, 1] (no depth maps for arbitrary photos): a mix, weight w ~ U(0.3, 0.7), of a
smooth random field (8x8 lattice, upsampled) and a scene-like vertical gradient (far at the top,
near at the bottom). Airlight A: grey level ~ U(0.7, 1.0) with per-channel offsets
~ U(-0.04, 0.04) (slightly blue or warm skies), clipped to [0, 1]. The random draws come before
severity is applied, so for a fixed seed a higher severity is the same scene, denser.

Depth and transmission are smooth, so they are computed on at most 64x64 and the transmission is
upsampled bilinearly: haze costs about one pass over the image (RandomFog draws fog discs and is
~100x slower).

Options: `beta`, `airlight` (scalar or 3 values) and `depth` (a 2-D map in [0, 1], HxW or coarser:
it is upsampled) override the sampled values. The formula is exposed as `transmission` and
`scatter` for reuse and tests.
"""

from __future__ import annotations

import cv2
import numpy as np

from ._common import check_image, check_severity, clip01, coarse_field, gray_to_rgb, identity, upsample

NAME = "haze"
ORDER = 10  # haze belongs to the scene: it comes first, before light, optics and sensor

MAX_BETA = 2.8
FIELD_WEIGHT_RANGE = (0.3, 0.7)
AIRLIGHT_RANGE = (0.7, 1.0)
AIRLIGHT_TINT = 0.04
DEPTH_GRID = 8


def pseudo_depth(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, float]:
    """(depth in [0, 1], the weight of the random field in it) for an HxW image.

    The map is smooth, so it is returned at coarse_shape(height, width) (at most 64x64); the
    transmission computed from it is upsampled once, at the end (see `scatter`).
    """
    depth = coarse_field(rng, height, width, DEPTH_GRID)
    weight = float(rng.uniform(*FIELD_WEIGHT_RANGE))
    far_at_top = np.linspace(1.0 - weight, 0.0, depth.shape[0], dtype=np.float32)[:, None]
    np.multiply(depth, np.float32(weight), out=depth)
    return np.add(depth, far_at_top, out=depth), weight


def sample_airlight(rng: np.random.Generator) -> list[float]:
    grey = rng.uniform(*AIRLIGHT_RANGE)
    tint = rng.uniform(-AIRLIGHT_TINT, AIRLIGHT_TINT, 3)
    return [float(v) for v in np.clip(grey + tint, 0.0, 1.0)]


def transmission(depth: np.ndarray, beta: float) -> np.ndarray:
    """t = exp(-beta * d), HxW float32."""
    return cv2.exp(np.multiply(depth, np.float32(-beta), dtype=np.float32))


def scatter(img: np.ndarray, transmission_map: np.ndarray, airlight) -> np.ndarray:
    """I = J * t + A * (1 - t), computed as A + (J - A) * t. The transmission map may be coarser
    than the image (it is upsampled bilinearly); A is a scalar or 3 values."""
    height, width = img.shape[:2]
    airlight = [float(v) for v in np.broadcast_to(np.asarray(airlight, dtype=np.float64), (3,))]
    airlight_cv = (*airlight, 0.0)
    t_rgb = upsample(gray_to_rgb(transmission_map), height, width)
    hazy = cv2.subtract(img, airlight_cv)
    np.multiply(hazy, t_rgb, out=hazy)
    return cv2.add(hazy, airlight_cv, dst=hazy)


def apply(img: np.ndarray, rng: np.random.Generator, severity: float, beta: float | None = None,
          airlight=None, depth: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        return identity(img)

    height, width = img.shape[:2]
    sampled_depth, field_weight = pseudo_depth(rng, height, width)
    sampled_airlight = sample_airlight(rng)
    if depth is None:
        depth = sampled_depth
    else:
        depth = np.asarray(depth, dtype=np.float32)
        if depth.ndim != 2:
            raise ValueError(f"depth must be a 2-D map, got shape {depth.shape}")
        field_weight = None
    airlight = sampled_airlight if airlight is None else [float(v) for v in np.broadcast_to(airlight, (3,))]
    beta = MAX_BETA * severity if beta is None else float(beta)

    t = transmission(depth, beta)
    hazy = clip01(scatter(img, t, airlight))
    params = {"beta": beta, "airlight": airlight, "depth_field_weight": field_weight,
              "transmission_min": float(t.min()), "transmission_mean": float(t.mean())}
    return hazy, params
