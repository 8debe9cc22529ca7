"""Classical baselines: what a user would reach for instead of ABAIR, one method per degradation.

The `baseline` evaluation mode restores each image with the methods registered here for the
set's `task` list. Every method is a pure function on float32 HxWx3 RGB in [0, 1] that returns
the same; the registry maps a degradation name (degradations/) to its method. A task with
several degradations applies the methods that exist in physical order (the degradation
modules' ORDER: haze, then low light, then noise), as in LIME, where the denoiser runs after
the enhancement that amplifies the noise; a degradation with no method (rain, snow, blur, jpeg,
bitdepth, ...) is left as it is, so a task with none returns the input unchanged.

The order was checked on the six tuning crops of `nlm_strength` (mean PSNR, dB): low light 0.5
+ noise 0.3: input 12.52, enhance then denoise 16.97, denoise then enhance 16.71; haze 0.5 +
noise 0.3 (no evaluation set has it): input 11.55, dehaze then denoise 16.51, denoise then
dehaze 18.45, since dehazing amplifies the noise by 1/t unevenly and one global h cannot follow
it. A haze+noise set would want the denoiser first.

Adding a classical method: write the function (docstring: the rule and its figures) and add one
line to REGISTRY.

    haze      dark channel prior (He, Sun, Tang 2009) with a guided-filter-refined transmission
    lowlight  gamma to a target mean luminance, then CLAHE on L of Lab
    noise     OpenCV non-local means with h set from the noise level estimated on the input
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import cv2
import numpy as np

from tasks.core.imageio import to_uint8

# BT.601 luma weights (RGB in [0, 1]).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MAD_TO_SIGMA = 0.6745    # median |x| of N(0, 1)


def _as_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    return np.clip(img.astype(np.float32, copy=False), 0.0, 1.0)


def _from_uint8(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / np.float32(255.0)


# ------------------------------------------------------------------------------------------------
# Noise


def estimate_noise_sigma(img: np.ndarray) -> float:
    """The standard deviation of additive white noise in `img` (image units, [0, 1] scale).

    Donoho's robust estimator on the finest diagonal detail band of an orthonormal Haar
    transform: for every 2x2 block (a b / c d), HH = (a - b - c + d) / 2, which cancels constant
    and linear image content and keeps sigma^2 of white noise; sigma = median(|HH|) / 0.6745,
    per channel, then the mean of the three channels. On smooth images it is within a few percent
    (tests/test_baselines.py); on photos texture leaks into HH (it reads high at weak noise) and
    clipping at 0 and 1 hides noise (it reads low at strong noise: 15.3 / 24.0 / 43.9 for true
    15 / 25 / 50 on the tuning crops of `nlm_strength`, which is tuned on these estimates)."""
    img = np.asarray(img, dtype=np.float32)
    height, width = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    if height < 2 or width < 2:
        return 0.0
    x = img[:height, :width]
    hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) * 0.5
    per_channel = np.median(np.abs(hh).reshape(-1, hh.shape[-1] if hh.ndim == 3 else 1), axis=0) / _MAD_TO_SIGMA
    return float(np.mean(per_channel))


# h = NLM_H_PER_SIGMA * sigma_est and hColor = NLM_HCOLOR_PER_SIGMA * sigma_est, sigma_est in
# 8-bit levels; see nlm_strength for how they were chosen.
NLM_H_PER_SIGMA = 0.6
NLM_HCOLOR_PER_SIGMA = 0.6
NLM_TEMPLATE = 7
NLM_SEARCH = 21


def nlm_strength(sigma_255: float) -> tuple[float, float]:
    """(h, hColor) of cv2.fastNlMeansDenoisingColored for an ESTIMATED noise level sigma_255
    (8-bit levels): h = hColor = 0.6 * sigma.

    Chosen on synthetic data that is not a benchmark: centre 256x256 crops of six scikit-image
    colour photos (astronaut, chelsea, coffee, rocket, immunohistochemistry, stereo_motorcycle),
    additive Gaussian noise sigma 15 / 25 / 50 (degradations.noise, seed [0, sigma, index], stored
    as 8-bit), sigma estimated by `estimate_noise_sigma` (means 15.3 / 24.0 / 43.9: clipping at
    0 and 1 hides some of the strongest noise), windows 7 / 21. Mean PSNR (dB) over the six crops
    for h = hColor = k * sigma_est (`python benchmarks/baselines.py --tune` prints the whole grid,
    hColor = 0.75 k and 1.25 k too, and the same with the true sigma):

        k         sigma 15   sigma 25   sigma 50   mean
        0.5       28.67      25.54      22.19      25.47
        0.6       28.74      26.00      23.13      25.96
        0.7       28.48      25.98      23.33      25.93
        0.8       28.12      25.86      23.07      25.68
        1.0       27.41      25.39      22.42      25.07
        1.2       26.73      24.70      21.95      24.46
        noisy     24.82      20.57      15.08      20.16

    k = 0.6 has the best mean and is within 0.2 dB of the best at every level; hColor = 0.75 k
    or 1.25 k is worse (means 25.31, 25.72). With the true sigma the best k is also 0.6 (mean
    26.12 dB). OpenCV's rule of thumb h = sigma is 0.9 dB lower on average here (1.3 dB at
    sigma 15): the function works in Lab, whose L channel carries less of the RGB noise."""
    sigma_255 = max(float(sigma_255), 0.0)
    return NLM_H_PER_SIGMA * sigma_255, NLM_HCOLOR_PER_SIGMA * sigma_255


def nlm_denoise(img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Non-local means (cv2.fastNlMeansDenoisingColored, on the 8-bit image, windows 7 / 21) with
    its strength from `nlm_strength` of the noise level: estimated on the input by
    `estimate_noise_sigma` unless `sigma` (image units) is given. A clean input (estimate under
    half an 8-bit level) is returned as it is."""
    img = _as_image(img)
    sigma_255 = (estimate_noise_sigma(img) if sigma is None else float(sigma)) * 255.0
    if sigma_255 < 0.5:
        return img.copy()
    h, h_color = nlm_strength(sigma_255)
    out = cv2.fastNlMeansDenoisingColored(to_uint8(img), None, h, h_color, NLM_TEMPLATE, NLM_SEARCH)
    return _from_uint8(out)


# ------------------------------------------------------------------------------------------------
# Low light

LOWLIGHT_TARGET = 0.30        # mean BT.601 luminance after the gamma
LOWLIGHT_MIN_GAMMA = 0.1      # the strongest brightening allowed
CLAHE_CLIP = 1.0
CLAHE_TILES = 8


def mean_luminance(img: np.ndarray) -> float:
    return float(np.mean(np.asarray(img, dtype=np.float32) @ _LUMA))


def brightening_gamma(img: np.ndarray, target: float = LOWLIGHT_TARGET) -> float:
    """The gamma g in (LOWLIGHT_MIN_GAMMA, 1] with mean luminance of img ** g equal to `target`,
    by bisection on a thumbnail of at most 128 px a side (mean luminance is monotone in g). An
    image already at or above the target gets 1 (it is not darkened)."""
    img = _as_image(img)
    height, width = img.shape[:2]
    step = max(1, math.ceil(max(height, width) / 128))
    thumb = img[::step, ::step]
    if mean_luminance(thumb) >= target:
        return 1.0
    lo, hi = LOWLIGHT_MIN_GAMMA, 1.0             # luminance(lo) >= target > luminance(hi)
    if mean_luminance(np.power(thumb, lo)) <= target:
        return lo
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if mean_luminance(np.power(thumb, mid)) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def gamma_clahe(img: np.ndarray, target: float = LOWLIGHT_TARGET, clip: float | None = CLAHE_CLIP) -> np.ndarray:
    """Low-light enhancement: out = img ** g with g chosen (`brightening_gamma`) so that the
    mean BT.601 luminance reaches `target` = 0.30, then CLAHE (cv2.createCLAHE, clip limit 1.0,
    8x8 tiles) on the L channel of 8-bit Lab, which lifts the mean further; a and b are kept.
    `clip` None: the gamma alone.

    Target and clip limit were checked on the six scikit-image crops of `nlm_strength`
    (clean mean luminance 0.28-0.65, mean 0.44) darkened by degradations.lowlight at severity 0.6
    (the evaluation sets' level; seed [0, index]): 11.67 dB as darkened; mean PSNR (dB)

        target    gamma alone   clip 0.5   clip 1.0   clip 1.5   clip 2.0
        0.30      16.33         17.51      17.64      17.48      16.91
        0.35      16.97         17.73      17.38      17.07      16.45
        0.40      17.22         17.37      16.84      16.39      15.85
        0.45      16.79         16.30      15.87      15.57      15.13
        0.50      15.66         15.10      14.85      14.76      14.45

    (`python benchmarks/baselines.py --tune lowlight`). Brighter targets lose: the colour cast
    and the noise of a dark photo grow with its mean, and CLAHE adds its own lift. A clip
    under 1 hardly equalises (the clipped histogram is spread back towards the identity), so the
    rule is the best cell with clip >= 1: 0.30 / 1.0, 0.09 dB from the best of the grid."""
    img = _as_image(img)
    bright = np.power(img, np.float32(brightening_gamma(img, target)))
    if not clip:
        return _from_uint8(to_uint8(bright))
    lab = cv2.cvtColor(to_uint8(bright), cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return _from_uint8(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


# ------------------------------------------------------------------------------------------------
# Haze

DCP_PATCH = 15                 # min-filter window of the dark channel
DCP_TOP_SHARE = 0.001          # brightest 0.1% of the dark channel -> atmospheric light
DCP_OMEGA = 0.95               # keeps a little haze for depth perception (He et al.)
DCP_T_MIN = 0.1
GUIDED_RADIUS = 8              # about the dark channel's patch radius (7); see dark_channel_dehaze
GUIDED_EPS = 1e-3


def dark_channel(img: np.ndarray, patch: int = DCP_PATCH) -> np.ndarray:
    """min over the channels, then a patch x patch minimum filter (an erosion), HxW."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (patch, patch))
    return cv2.erode(np.ascontiguousarray(img.min(axis=2)), kernel, borderType=cv2.BORDER_REPLICATE)


def atmospheric_light(img: np.ndarray, dark: np.ndarray, share: float = DCP_TOP_SHARE) -> np.ndarray:
    """A: per channel, the mean input colour over the brightest `share` of the dark channel's
    pixels (at least one). The mean rather than He et al.'s single brightest input pixel among
    them, so one white or noisy pixel does not set A."""
    flat = dark.reshape(-1)
    count = max(1, int(round(flat.size * share)))
    top = np.argpartition(flat, flat.size - count)[flat.size - count:]
    return img.reshape(-1, 3)[top].mean(axis=0).astype(np.float32)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (grey guide), from box filters of side 2 * radius + 1:
    a = cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I), q = mean(a) I + mean(b)."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, size, normalize=True, borderType=cv2.BORDER_REFLECT)

    guide = guide.astype(np.float32)
    src = src.astype(np.float32)
    mean_i, mean_p = box(guide), box(src)
    cov_ip = box(guide * src) - mean_i * mean_p
    var_i = box(guide * guide) - mean_i * mean_i
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def dark_channel_dehaze(img: np.ndarray, radius: int = GUIDED_RADIUS, eps: float = GUIDED_EPS) -> np.ndarray:
    """Dehazing by the dark channel prior (He, Sun, Tang, CVPR 2009):
    dark channel with a 15x15 minimum filter; atmospheric light A from its brightest 0.1%
    (`atmospheric_light`); transmission t = 1 - 0.95 * dark(I / A), refined by a guided filter
    (`guided_filter`, grey input as the guide, radius 8, eps 1e-3), clamped at 0.1;
    J = (I - A) / t + A, clipped to [0, 1].

    The radius was checked on the six scikit-image crops of `nlm_strength` hazed by
    degradations.haze at severity 0.6 (seed [0, index]): 10.80 dB hazy; mean PSNR after
    dehazing 20.64 / 20.74 / 20.78 / 20.76 / 20.61 / 19.56 / 19.01 dB for radius
    2 / 4 / 6 / 8 / 12 / 32 / 60 at eps 1e-3 (eps 1e-4 / 1e-2: within 0.05 dB up to radius 8;
    `python benchmarks/baselines.py --tune haze`).
    A radius near the patch's removes the dark channel's blocks; larger ones (He et al.'s 60
    at 600x400) blur the transmission across depth edges."""
    img = _as_image(img)
    airlight = np.maximum(atmospheric_light(img, dark_channel(img)), np.float32(1e-3))
    t = 1.0 - DCP_OMEGA * dark_channel(img / airlight)
    t = guided_filter(img @ _LUMA, t, int(radius), float(eps))
    t = np.maximum(t, np.float32(DCP_T_MIN))[..., None]
    return np.clip((img - airlight) / t + airlight, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Method:
    label: str                                        # shown in the reports
    restore: Callable[[np.ndarray], np.ndarray]       # float32 HxWx3 [0, 1] -> the same


REGISTRY: dict[str, Method] = {
    "haze": Method("dark channel prior", dark_channel_dehaze),
    "lowlight": Method("gamma + CLAHE", gamma_clahe),
    "noise": Method("NLM (estimated sigma)", nlm_denoise),
}


def methods_for(task: Iterable[str]) -> list[str]:
    """The task's degradations that have a method, in the order they are applied (physical:
    the degradation modules' ORDER, then name)."""
    import degradations

    names = {name for name in task if name in REGISTRY}
    return sorted(names, key=lambda name: (degradations.get(name).ORDER, name))


def describe(task: Iterable[str]) -> str:
    """The methods a task runs, for the reports ('none (the input)' when there are none)."""
    names = methods_for(task)
    return " + ".join(REGISTRY[n].label for n in names) if names else "none (the input)"


def restore(img: np.ndarray, task: Iterable[str]) -> np.ndarray:
    """The classical baseline for a set whose degradations are `task`: the registered methods in
    physical order; the input (a float32 copy) when none applies."""
    out = _as_image(img).copy()
    for name in methods_for(task):
        out = REGISTRY[name].restore(out)
    return out
