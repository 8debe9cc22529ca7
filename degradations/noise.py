"""Sensor noise: additive white Gaussian (the CBSD68 setting), signal-dependent Poisson-Gaussian, or
a simulated camera pipeline.

Severity mapping (values in [0, 1] image units; x255 for the usual 8-bit figures):
    sigma = 50/255 * severity        severity 0.3 -> 15/255, 0.5 -> 25/255, 1.0 -> 50/255

model="gaussian" (default): out = clip(x + sigma * n), n ~ N(0, 1) i.i.d. per pixel and channel.
model="poisson_gaussian" (or poisson=True): out = clip(x + sqrt(a * x + b) * n), the heteroscedastic
    normal approximation of shot (Poisson) plus read (Gaussian) noise. It is matched to the Gaussian
    model at mid-grey: the variance at x = 0.5 is sigma**2, 80% of it shot noise, so
    a = 1.6 * sigma**2 (variance per unit of signal; 1/a photons at white) and b = 0.2 * sigma**2.
model="camera": delegates to degradations.camera_noise at the same severity (Brooks et al. 2019:
    shot + read noise on an unprocessed raw Bayer image, then demosaicing, white balance, colour
    correction and tone mapping, so the noise is signal-dependent, spatially correlated and
    coloured). Its severity mapping is in that module's docstring (severity 1 is about 25-45/255
    std on mid-grey, comparable to the Gaussian 50/255 * severity). params = {"model": "camera",
    **camera_noise's params}.
model may also be a list or tuple of these names: one entry is drawn uniformly from the rng on each
call (one integer draw before anything else, made only when the list has two or more entries and
the severity is not 0) and params["model"] says which ran.
The default stays the single "gaussian", whose draws (and so bytes) are unchanged.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from . import camera_noise
from ._common import add_signal_dependent_noise, check_image, check_severity, clip01, identity, standard_normal

NAME = "noise"
ORDER = 50  # sensor noise is added after the optics (blur) and the scene (rain, haze)

MAX_SIGMA = 50.0 / 255.0
MODELS = ("gaussian", "poisson_gaussian", "camera")
SHOT_SHARE_AT_MID_GREY = 0.8
MID_GREY = 0.5


def poisson_gaussian_coefficients(sigma: float) -> tuple[float, float]:
    """(shot_gain a, read variance b) with a * 0.5 + b = sigma**2 and 80% of it shot noise."""
    shot_gain = SHOT_SHARE_AT_MID_GREY * sigma**2 / MID_GREY
    read_variance = (1.0 - SHOT_SHARE_AT_MID_GREY) * sigma**2
    return shot_gain, read_variance


def check_models(model) -> tuple[str, ...]:
    """The model option as a non-empty tuple of known model names (a string is one name)."""
    models = (model,) if isinstance(model, str) else tuple(model) if isinstance(model, (list, tuple)) else None
    if not models:
        raise ValueError(f"noise model must be a name or a non-empty list of names from {list(MODELS)}, got {model!r}")
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown noise model {name!r}; known: {list(MODELS)}")
    return models


def apply(img: np.ndarray, rng: np.random.Generator, severity: float, model: str | list[str] = "gaussian",
          poisson: bool = False) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    models = check_models("poisson_gaussian" if poisson else model)
    if severity == 0.0:
        return identity(img)

    model = models[0] if len(models) == 1 else models[int(rng.integers(len(models)))]
    if model == "camera":
        noisy, camera_params = camera_noise.apply(img, rng, severity)
        return noisy, {"model": model, **camera_params}

    noise = standard_normal(rng, img.shape)
    sigma = MAX_SIGMA * severity
    if model == "gaussian":
        noisy = cv2.scaleAdd(noise, sigma, img, dst=noise)
        params = {"model": model, "sigma": sigma, "sigma_255": sigma * 255.0}
    else:
        shot_gain, read_variance = poisson_gaussian_coefficients(sigma)
        noisy = add_signal_dependent_noise(img.copy(), noise, shot_gain, read_variance)
        params = {"model": model, "sigma_at_mid_grey": sigma, "shot_gain": shot_gain,
                  "photons_at_white": 1.0 / shot_gain, "read_sigma": math.sqrt(read_variance)}
    return clip01(noisy), params
