"""Snow: flakes in three size classes, smeared along a fall direction, plus a snow-haze veil.

Severity mapping (sizes in pixels, density per flake-sized grid cell):
    fall angle                 ~ U(-30, 30) degrees from vertical, drawn per image
    small flakes (2 px)        always on:          density 0.006 -> 0.03,  brightness 0.55 -> 0.85
    medium flakes (4 px)       fades in 0.25-0.55: density 0.004 -> 0.02,  brightness 0.50 -> 0.80
    large blobs (8 px)         fades in 0.55-0.85: density 0.002 -> 0.008, brightness 0.35 -> 0.60
                               (out of focus, near the lens: soft and translucent)
    fall streak                1 -> 3 flake sizes long (motion during the exposure)
    veil                       screen amount 0.30 * severity, varying smoothly over the image
The light is white and added with a screen blend. Like rain, the draws come first, so for a
fixed seed a higher severity is the same flakes, more of them, longer and brighter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from . import _particles as particles
from ._common import check_image, check_severity, coarse_field, identity, lerp, screen, upsample

NAME = "snow"
ORDER = 40  # like rain: particles in front of the scene, before optics and sensor

MAX_ANGLE_DEG = 30.0
FINE_CELL = 2.0  # every layer is resampled to this grid, then rendered with one warp
MAX_STREAK_CELLS = 3
FLAKE_SOFTNESS = 0.6  # gaussian sigma on the fine grid, cells
FLAKE_SOFTNESS_GAIN = float(1.0 / cv2.getGaussianKernel(5, FLAKE_SOFTNESS).max() ** 2)
VEIL_MAX = 0.30


@dataclass(frozen=True)
class FlakeLayer:
    cell: float  # flake size, pixels
    fade: tuple[float, float]  # severity range over which the layer fades in (end 0: always on)
    density: tuple[float, float]
    brightness: tuple[float, float]

    def opacity(self, severity: float) -> float:
        return particles.fade_in(severity, self.fade)


LAYERS = (
    FlakeLayer(cell=2.0, fade=(0.0, 0.0), density=(0.006, 0.03), brightness=(0.55, 0.85)),
    FlakeLayer(cell=4.0, fade=(0.25, 0.55), density=(0.004, 0.02), brightness=(0.50, 0.80)),
    FlakeLayer(cell=8.0, fade=(0.55, 0.85), density=(0.002, 0.008), brightness=(0.35, 0.60)),
)


def flake_layer(intensities: np.ndarray, layer: FlakeLayer, severity: float, fine_shape: tuple[int, int]
                ) -> tuple[np.ndarray, dict]:
    """One layer's flakes on the fine grid, and its parameters."""
    density = lerp(*layer.density, severity)
    brightness = lerp(*layer.brightness, severity) * layer.opacity(severity)
    streak_cells = 1 + int(round((MAX_STREAK_CELLS - 1) * severity))
    grid = particles.streaks(particles.seeds(intensities, density, layer.density[1]), streak_cells)
    if grid.shape != fine_shape:
        # Bilinear upsampling turns each coarse cell into a soft blob of the flake's size.
        grid = cv2.resize(grid, fine_shape[::-1], interpolation=cv2.INTER_LINEAR)
    params = {"size": layer.cell, "density": density, "brightness": brightness,
              "streak_length": streak_cells * layer.cell}
    return np.multiply(grid, np.float32(brightness), out=grid), params


def apply(img: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        return identity(img)

    height, width = img.shape[:2]
    angle = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)
    veil_field = coarse_field(rng, height, width, grid=4)
    fine_shape = particles.grid_shape(height, width, FINE_CELL, FINE_CELL)

    snow_grid = np.zeros(fine_shape, np.float32)
    layer_params = []
    for layer in LAYERS:
        if layer.opacity(severity) == 0.0:
            break  # layers fade in in order, so skipping the rest never shifts an earlier draw
        uniform = rng.random(particles.grid_shape(height, width, layer.cell, layer.cell), dtype=np.float32)
        layer_grid, params = flake_layer(particles.seed_intensities(uniform, layer.density[1]), layer, severity,
                                         fine_shape)
        snow_grid = screen(snow_grid, layer_grid)
        layer_params.append(params)
    # Round the flakes off (a grid cell is a square); the gain keeps an isolated flake's peak.
    snow_grid = cv2.GaussianBlur(snow_grid, (5, 5), FLAKE_SOFTNESS)
    np.multiply(snow_grid, np.float32(FLAKE_SOFTNESS_GAIN), out=snow_grid)
    np.minimum(snow_grid, np.float32(1.0), out=snow_grid)
    veil_strength = VEIL_MAX * severity
    # The veil is smooth, so it can ride along on the grid: the warp's shear cannot be seen in it.
    snow_grid = screen(snow_grid, upsample(particles.veil(veil_field, veil_strength, floor=0.6), *fine_shape))
    light = particles.render(snow_grid, height, width, FINE_CELL, FINE_CELL, math.radians(angle))
    params = {"angle_deg": float(angle), "layers": layer_params, "veil": veil_strength}
    return particles.add_to_image(img, light), params
