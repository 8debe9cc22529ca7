"""Rain: layers of streaks at one fall angle, screen-blended, plus an accumulation veil.

Severity mapping (lengths and widths in pixels, density per 1x4-pixel grid cell):
    fall angle                      ~ U(-25, 25) degrees from vertical, drawn per image
    layer 1 (thin, far)             always on:          density 0.004 -> 0.012, length 20 -> 40,
                                                        width 2, brightness 0.40 -> 0.65
    layer 2 (medium)                fades in 0.35-0.60: density 0.001 -> 0.008, length 20 -> 45,
                                                        width 3, brightness 0.20 -> 0.50
    layer 3 (wide, near the lens)   fades in 0.60-0.85: density 0.0005 -> 0.004, length 30 -> 60,
                                                        width 4, brightness 0.15 -> 0.35
    veil (rain accumulation)        fades in 0.50-1.00: screen amount up to 0.30, varying smoothly
Widths are those of the tent across a streak (_particles.cross_profile: width 2 is 1/3, 1, 1/3):
a drop falling during the exposure is a soft streak a few pixels wide, not a one-pixel line (a
layer of width 1 and length 12 -> 30 gave residuals correlated 0.25 between horizontal neighbours
and 0.30 between pixels 8 rows apart where Rain100L's are 0.65 and 0.41: "across corr" and "along
corr" in benchmarks/degradation_match.py). So severity ~0.3-0.4 looks like Rain100L (PSNR ~24.5-26 dB, 10-14%
of the pixels brightened by more than 10/255, one layer) and 0.8-1.0 like Rain100H (dense long
streaks of several widths, a milky veil). Streaks are white light added with a screen blend, as rain
streaks are light scattered by drops (and as in Rain100L/H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _particles as particles
from ._common import check_image, check_severity, coarse_field, identity, lerp, ramp, screen, upsample

NAME = "rain"
ORDER = 40  # rain is in front of the (hazy, dark) scene, blurred by the optics with it

MAX_ANGLE_DEG = 25.0
CELL_H, CELL_W = 4.0, 1.0  # streaks are long: a 4-pixel grid step along the fall direction suffices
VEIL_MAX = 0.30
VEIL_FADE = (0.5, 1.0)


@dataclass(frozen=True)
class StreakLayer:
    fade: tuple[float, float]  # severity range over which the layer fades in (start == end: always on)
    density: tuple[float, float]
    length: tuple[float, float]
    width: float  # of the tent across the streak, in pixels (_particles.cross_profile)
    brightness: tuple[float, float]

    def opacity(self, severity: float) -> float:
        return particles.fade_in(severity, self.fade)


LAYERS = (
    StreakLayer(fade=(0.0, 0.0), density=(0.004, 0.012), length=(20, 40), width=2.0, brightness=(0.40, 0.65)),
    StreakLayer(fade=(0.35, 0.6), density=(0.001, 0.008), length=(20, 45), width=3.0, brightness=(0.20, 0.50)),
    StreakLayer(fade=(0.6, 0.85), density=(0.0005, 0.004), length=(30, 60), width=4.0, brightness=(0.15, 0.35)),
)


def rain_layer(intensities: np.ndarray, layer: StreakLayer, severity: float) -> tuple[np.ndarray, dict]:
    """One layer's streaks on the grid, and its parameters."""
    density = lerp(*layer.density, severity)
    length = lerp(*layer.length, severity)
    length_cells = max(1, int(round(length / CELL_H)))
    brightness = lerp(*layer.brightness, severity) * layer.opacity(severity)
    grid = particles.streaks(particles.seeds(intensities, density, layer.density[1]), length_cells, layer.width)
    params = {"density": density, "length": length_cells * CELL_H, "width": layer.width, "brightness": brightness}
    return np.multiply(grid, np.float32(brightness), out=grid), params


def apply(img: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        return identity(img)

    height, width = img.shape[:2]
    angle = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)
    veil_field = coarse_field(rng, height, width, grid=4)
    grid_shape = particles.grid_shape(height, width, CELL_H, CELL_W)

    rain_grid = np.zeros(grid_shape, np.float32)
    layer_params = []
    for layer in LAYERS:
        if layer.opacity(severity) == 0.0:
            break  # layers fade in in order, so skipping the rest never shifts an earlier draw
        intensities = particles.seed_intensities(rng.random(grid_shape, dtype=np.float32), layer.density[1])
        layer_grid, params = rain_layer(intensities, layer, severity)
        rain_grid = screen(rain_grid, layer_grid)
        layer_params.append(params)
    veil_strength = VEIL_MAX * ramp(severity, *VEIL_FADE)
    if veil_strength > 0.0:
        # The veil is smooth, so it can ride along on the grid: the warp's shear cannot be seen in it.
        veil = particles.veil(veil_field, veil_strength, floor=0.5)
        rain_grid = screen(rain_grid, upsample(veil, *grid_shape))
    light = particles.render(rain_grid, height, width, CELL_H, CELL_W, math.radians(angle))
    params = {"angle_deg": float(angle), "layers": layer_params, "veil": veil_strength}
    return particles.add_to_image(img, light), params
