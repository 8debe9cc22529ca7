"""Low light, synthesised LOL-style in linear light.

    linear = srgb ** 2.2
    dark   = exposure * gains * linear ** gamma
    noisy  = dark + sqrt(shot_gain * dark + read_sigma ** 2) * n      (Poisson-Gaussian, n ~ N(0, 1))
    out    = clip(noisy, 0, 1) ** (1 / 2.2)

Severity mapping (per image, `floor`/`max` values drawn by the rng first, then scaled):
    exposure   = exposure_floor ** severity, exposure_floor ~ U(0.01, 0.05)  -> 1.0 .. 0.01-0.05 x
    gamma      = 1 + (gamma_max - 1) * severity, gamma_max ~ U(1.1, 1.4)     (crushes the shadows)
    shot_gain  = severity * U(0.0005, 0.002)  (linear units; 1/shot_gain photons at white)
    read_sigma = severity * U(0.001, 0.003)   (linear units)
    gains      = 1 + severity * U(-0.06, 0.06) per channel                   (a slight colour cast)
At severity 1 a mid-grey pixel (0.5 sRGB) comes out at about 0.04-0.12 sRGB (0.08 on average), at
0.5 at about 0.2, with visible chroma noise in the shadows. LOL's low-light inputs are a tenth as
bright as their targets (benchmarks/degradation_match.py), so the floor reaches that far.
"""

from __future__ import annotations

import numpy as np

from ._common import (SRGB_GAMMA, add_signal_dependent_noise, check_image, check_severity, clip01, identity, power,
                      scale_channels, standard_normal)

NAME = "lowlight"
ORDER = 20  # the exposure is set before the optics blur and long before the sensor noise stage

EXPOSURE_FLOOR_RANGE = (0.01, 0.05)
GAMMA_MAX_RANGE = (1.1, 1.4)
SHOT_GAIN_RANGE = (0.0005, 0.002)
READ_SIGMA_RANGE = (0.001, 0.003)
COLOUR_CAST = 0.06


def apply(img: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        return identity(img)

    exposure_floor = rng.uniform(*EXPOSURE_FLOOR_RANGE)
    gamma_max = rng.uniform(*GAMMA_MAX_RANGE)
    shot_gain_max = rng.uniform(*SHOT_GAIN_RANGE)
    read_sigma_max = rng.uniform(*READ_SIGMA_RANGE)
    cast = rng.uniform(-COLOUR_CAST, COLOUR_CAST, 3)
    unit_noise = standard_normal(rng, img.shape)

    exposure = float(exposure_floor**severity)
    gamma = float(1.0 + (gamma_max - 1.0) * severity)
    shot_gain = float(shot_gain_max * severity)
    read_sigma = float(read_sigma_max * severity)
    gains = [float(exposure * (1.0 + severity * c)) for c in cast]

    # (srgb ** 2.2) ** gamma in one power: one pass over the image instead of two.
    linear = power(img, SRGB_GAMMA * gamma)
    dark = scale_channels(linear, gains, out=linear)
    noisy = add_signal_dependent_noise(dark, unit_noise, shot_gain, read_sigma**2)
    params = {"exposure": exposure, "gamma": gamma, "shot_gain": shot_gain, "read_sigma": read_sigma,
              "channel_gains": [g / exposure for g in gains]}
    return clip01(power(clip01(noisy), 1.0 / SRGB_GAMMA, out=noisy)), params
