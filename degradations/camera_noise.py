"""Camera-pipeline noise: Brooks et al., "Unprocessing Images for Learned Raw Denoising", CVPR 2019.

The sRGB image is unprocessed into a plausible raw sensor image, noised there with the physical
shot + read model, and processed back, so the noise ends up as a real camera's: signal-dependent,
spatially correlated (demosaicing interpolates each noisy sample into its neighbours) and coloured
(white balance and the colour correction matrix mix and amplify the channels' noise).

    unprocess   x = inverse_smoothstep(srgb)                  0.5 - sin(asin(1 - 2y) / 3)
                x = x ** 2.2                                   gamma expansion, the paper's 2.2 power
                                                               (not the exact piecewise sRGB curve)
                x = rgb2cam @ x                                rgb2cam = (xyz2cam @ srgb2xyz), rows
                                                               normalised to sum 1; xyz2cam a random
                                                               convex combination of the paper's 4
                                                               cameras' matrices (weights U(1e-8, 1e8),
                                                               normalised, as the paper)
                x = safe_invert_gains(x)                       x * [1/red, 1, 1/blue] / brightness,
                                                               eased back to gain 1 where the mean of
                                                               the pixel passes 0.9 (highlights stay
                                                               saturated instead of dimming)
                x = clip(x, 0, 1)
    mosaic      bayer = RGGB(x)                                H x W, R at (0, 0), B at (1, 1)
    noise       bayer += sqrt(shot * bayer + read) * n         n ~ N(0, 1) i.i.d. per photosite
    process     bayer = clip(bayer * [red, 1, 1, blue] * brightness, 0, 1)
                x = bilinear_demosaic(bayer)                   3x3 bilinear, in float
                x = clip(cam2rgb @ x, 0, 1)                    cam2rgb = inverse(rgb2cam)
                srgb = smoothstep(x ** (1 / 2.2))              3t^2 - 2t^3
    (jpeg)      optional JPEG round trip of the result

Random camera (per call, whatever the severity): red_gain ~ U(1.9, 2.4), blue_gain ~ U(1.5, 1.9),
brightness = 1 / N(0.8, 0.1) (the paper's draw; the normal is clipped to [0.5, 1.1] so the gain
stays finite); CCM weights as above.

Severity mapping (shot and read are variances in linear raw units, full well = 1; the paper's own
training range is log(shot) ~ U(log 1e-4, log 1.2e-2)):
    shot_max   = SHOT_CEIL * severity ** 2                 SHOT_CEIL = 1.6e-2
    log(shot)  ~ U(log(shot_max / 3), log(shot_max))       a band of 3x (1.7x in noise std) below it
    log(read)  = 2.18 * log(shot) + 1.2 + N(0, 0.26)       the paper's fit over real cameras
The noise std grows about linearly with severity (std ~ sqrt(shot) ~ severity), from nothing at 0:
    severity 0.2 -> shot 2.1e-4 .. 6.4e-4    faint fine-grained noise (ISO 800-like), about
                                             5-8/255 std on a mid-grey patch
    severity 0.5 -> shot 1.3e-3 .. 4.0e-3    about 11-19/255 on mid-grey
    severity 1.0 -> shot 5.3e-3 .. 1.6e-2    a high-ISO phone photo: about 25-45/255 on mid-grey
                                             (the Gaussian sigma 25-50/255 range), the upper end of
                                             the paper's range
(the red and blue channels are noisier than green: their raw signal is divided by the white
balance gain before the shot noise, and multiplied back after). Severity 0 is the identity.

jpeg_quality: None (default, no compression), an int in [1, 100], or "random" for a quality drawn
uniformly from the integers in JPEG_RANDOM_RANGE = [60, 95] (what camera firmware and photo
sharing apply). The quality is drawn last, after the camera, the noise levels and the noise field,
so a seed gives the same noisy image before compression whatever jpeg_quality is.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ._common import (add_signal_dependent_noise, check_image, check_severity, clip01, identity, power, scale_channels,
                      standard_normal)
from .jpeg import encode_decode, to_uint8

NAME = "camera_noise"
ORDER = 50  # sensor noise: after the optics (blur) and the scene (rain, haze), before storage (jpeg)

GAMMA = 2.2  # the paper's power law; the exact piecewise sRGB curve is not used

# XYZ -> camera matrices of the four cameras used by Brooks et al. (unprocess.py, random_ccm).
XYZ2CAMS = np.array([
    [[1.0234, -0.2969, -0.2266],
     [-0.5625, 1.6328, -0.0469],
     [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202],
     [-0.6130, 1.3513, 0.2906],
     [-0.1564, 0.2151, 0.7183]],
    [[0.8380, -0.2630, -0.0639],
     [-0.2887, 1.0725, 0.2496],
     [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562],
     [-0.4782, 1.3016, 0.1933],
     [-0.0970, 0.1581, 0.5181]],
], dtype=np.float64)

# Linear sRGB -> XYZ (D65), as in the paper.
RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]], dtype=np.float64)

RED_GAIN_RANGE = (1.9, 2.4)
BLUE_GAIN_RANGE = (1.5, 1.9)
BRIGHTNESS_MEAN, BRIGHTNESS_STD = 0.8, 0.1  # the inverse of the brightness gain ~ N(0.8, 0.1)
BRIGHTNESS_CLIP = (0.5, 1.1)                # keeps 1 / N(0.8, 0.1) finite (a 3-sigma band)
HIGHLIGHT_INFLECTION = 0.9                  # safe_invert_gains eases the gains out above this mean

SHOT_CEIL = 1.6e-2                           # shot_max at severity 1
SHOT_EXPONENT = 2.0                          # shot_max = SHOT_CEIL * severity ** 2: noise std ~ severity
SHOT_BAND = 3.0                              # log(shot) uniform over [log(shot_max / 3), log(shot_max)]
READ_SLOPE, READ_INTERCEPT, READ_LOG_STD = 2.18, 1.2, 0.26

JPEG_RANDOM_RANGE = (60, 95)

# 3x3 bilinear demosaicing kernels for a channel sampled on a quarter (R, B) or half (G) of the sites.
_KERNEL_RB = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], np.float32)
_KERNEL_G = np.array([[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]], np.float32)


# ---------------------------------------------------------------- random camera


def random_ccm(rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """(rgb2cam 3x3 float64, the 4 convex weights): a random convex combination of the cameras'
    XYZ -> camera matrices, times sRGB -> XYZ, each row normalised to sum 1 (so grey stays grey)."""
    weights = rng.uniform(1e-8, 1e8, len(XYZ2CAMS))
    weights = weights / weights.sum()
    xyz2cam = (weights[:, None, None] * XYZ2CAMS).sum(axis=0)
    rgb2cam = matmul3(xyz2cam, RGB2XYZ)
    rgb2cam = rgb2cam / rgb2cam.sum(axis=1, keepdims=True)
    return rgb2cam, [float(w) for w in weights]


# The 3x3 products and inverse below avoid BLAS and LAPACK on purpose: their kernels differ per CPU
# (OpenBLAS picks one at load time) and round the last bit differently, and these matrices are written
# into every sample's JSON and shape its pixels, so the shards would differ from machine to machine.
# An elementwise product summed over one axis adds the same terms in the same order everywhere.


def matmul3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 3x3 float64 matrices, the same bits on every CPU."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def inverse3(m: np.ndarray) -> np.ndarray:
    """The inverse of a 3x3 float64 matrix from its adjugate, the same bits on every CPU."""
    m = np.asarray(m, dtype=np.float64)
    adjugate = np.array([
        [m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1], m[0, 2] * m[2, 1] - m[0, 1] * m[2, 2], m[0, 1] * m[1, 2] - m[0, 2] * m[1, 1]],
        [m[1, 2] * m[2, 0] - m[1, 0] * m[2, 2], m[0, 0] * m[2, 2] - m[0, 2] * m[2, 0], m[0, 2] * m[1, 0] - m[0, 0] * m[1, 2]],
        [m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0], m[0, 1] * m[2, 0] - m[0, 0] * m[2, 1], m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]],
    ])
    determinant = m[0, 0] * adjugate[0, 0] + m[0, 1] * adjugate[1, 0] + m[0, 2] * adjugate[2, 0]
    if determinant == 0.0:
        raise ValueError("singular colour matrix")
    return adjugate / determinant


def random_gains(rng: np.random.Generator) -> tuple[float, float, float]:
    """(brightness, red, blue) gains: brightness = 1 / N(0.8, 0.1), red U(1.9, 2.4), blue U(1.5, 1.9)."""
    inverse_brightness = float(np.clip(rng.normal(BRIGHTNESS_MEAN, BRIGHTNESS_STD), *BRIGHTNESS_CLIP))
    red = float(rng.uniform(*RED_GAIN_RANGE))
    blue = float(rng.uniform(*BLUE_GAIN_RANGE))
    return 1.0 / inverse_brightness, red, blue


def shot_range(severity: float) -> tuple[float, float]:
    """(lowest, highest) shot-noise variance per unit signal drawn at this severity."""
    shot_max = SHOT_CEIL * severity**SHOT_EXPONENT
    return shot_max / SHOT_BAND, shot_max


def random_noise_levels(rng: np.random.Generator, severity: float) -> tuple[float, float]:
    """(shot, read) variances: log-uniform shot noise in shot_range(severity), read noise from the
    paper's log-linear fit log(read) = 2.18 log(shot) + 1.2 + N(0, 0.26)."""
    low, high = shot_range(severity)
    log_shot = rng.uniform(math.log(low), math.log(high))
    log_read = READ_SLOPE * log_shot + READ_INTERCEPT + rng.normal(0.0, READ_LOG_STD)
    return float(math.exp(log_shot)), float(math.exp(log_read))


def channel_gains(brightness: float, red: float, blue: float) -> list[float]:
    """Per RGB channel gains applied by the camera's processing (white balance x brightness)."""
    return [red * brightness, brightness, blue * brightness]


# ---------------------------------------------------------------- tone and gamma


def smoothstep(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The paper's global tone curve 3x^2 - 2x^3 (x in [0, 1]), into `out` (which may be x)."""
    square = np.multiply(x, x, dtype=np.float32)
    out = np.multiply(x, np.float32(-2.0), out=out, dtype=np.float32)
    np.add(out, np.float32(3.0), out=out)
    return np.multiply(out, square, out=out)


def inverse_smoothstep(y: np.ndarray) -> np.ndarray:
    """0.5 - sin(asin(1 - 2y) / 3), the inverse of smoothstep on [0, 1], as a new float32 array.

    The arcsine in float64: numpy's float32 arcsin takes another code path on AVX-512 CPUs than on
    AVX2 ones and differs in the last bits, enough to move a pixel across an 8-bit rounding edge;
    the float64 ones differ by an ulp that the cast back to float32 absorbs. (float32 sin gives the
    same bits on both, and float64 sin is 20x slower.)"""
    t = np.multiply(y, -2.0, dtype=np.float64)
    np.add(t, 1.0, out=t)
    np.clip(t, -1.0, 1.0, out=t)  # y clipped to [0, 1]
    np.arcsin(t, out=t)
    np.multiply(t, 1.0 / 3.0, out=t)
    angle = t.astype(np.float32)
    np.sin(angle, out=angle)
    return np.subtract(np.float32(0.5), angle, out=angle)


def gamma_expansion(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(x, 1e-8) ** 2.2 (into `out`, which may be x)."""
    return power(x, GAMMA, out=out)


def gamma_compression(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(x, 1e-8) ** (1 / 2.2) (into `out`, which may be x)."""
    return power(x, 1.0 / GAMMA, out=out)


def apply_ccm(img: np.ndarray, ccm: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ccm @ pixel for every pixel of an HxWx3 image, into `out` (which may be img)."""
    return cv2.transform(img, np.asarray(ccm, np.float32), dst=out)


# ---------------------------------------------------------------- white balance and gains


def safe_invert_gains(img: np.ndarray, gains: list[float]) -> np.ndarray:
    """img / gains per channel, in place, with the paper's highlight-preserving easing: where the
    pixel's channel mean m passes 0.9 the applied factor moves from 1/g towards 1 with weight
    ((m - 0.9) / 0.1)^2 (and never below 1/g), so saturated pixels stay saturated after the
    camera re-applies the gains instead of turning grey or coloured.

    As in the paper: safe = max(mask + (1 - mask) / g, 1 / g) = 1/g + mask * max(1 - 1/g, 0).
    Computed as img / g everywhere, then, on the band of rows holding highlights only, times
    1 + mask * max(g - 1, 0)."""
    inverse = [1.0 / g for g in gains]
    grey = cv2.transform(img, np.full((1, 3), 1.0 / 3.0, np.float32))
    scale_channels(img, inverse, out=img)
    rows = np.flatnonzero(grey.max(axis=1) > HIGHLIGHT_INFLECTION)
    if rows.size == 0:
        return img
    band = slice(int(rows[0]), int(rows[-1]) + 1)
    mask = np.subtract(grey[band], np.float32(HIGHLIGHT_INFLECTION))
    np.maximum(mask, np.float32(0.0), out=mask)
    mask *= np.float32(1.0 / (1.0 - HIGHLIGHT_INFLECTION))
    np.multiply(mask, mask, out=mask)
    factor = cv2.cvtColor(mask, cv2.COLOR_GRAY2RGB)
    scale_channels(factor, [max(g - 1.0, 0.0) for g in gains], out=factor)
    np.add(factor, np.float32(1.0), out=factor)
    np.multiply(img[band], factor, out=img[band])
    return img


# ---------------------------------------------------------------- Bayer


def mosaic(img: np.ndarray) -> np.ndarray:
    """RGGB Bayer plane (H x W, H and W even) of an HxWx3 image: R at (0, 0), G at (0, 1) and
    (1, 0), B at (1, 1)."""
    height, width = img.shape[:2]
    bayer = np.empty((height, width), np.float32)
    bayer[0::2, 0::2] = img[0::2, 0::2, 0]
    bayer[0::2, 1::2] = img[0::2, 1::2, 1]
    bayer[1::2, 0::2] = img[1::2, 0::2, 1]
    bayer[1::2, 1::2] = img[1::2, 1::2, 2]
    return bayer


def apply_bayer_gains(bayer: np.ndarray, gains: list[float]) -> np.ndarray:
    """Per-channel (R, G, B) gains on an RGGB plane, in place."""
    bayer *= np.float32(gains[1])
    bayer[0::2, 0::2] *= np.float32(gains[0] / gains[1])
    bayer[1::2, 1::2] *= np.float32(gains[2] / gains[1])
    return bayer


def demosaic(bayer: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear demosaicing of an RGGB plane (H, W even, >= 2) into HxWx3 float32 (into `out`, an
    HxWx3 float32 buffer, when given; `bayer` is overwritten).

    Each channel's samples are spread onto a zero plane and filtered with the bilinear kernel
    (sampled sites keep their value, the others get the mean of their 2 or 4 nearest samples).
    Borders reflect without repeating the edge (BORDER_REFLECT_101), which keeps the Bayer parity,
    so every border pixel is interpolated from real samples. The same as OpenCV's bilinear
    cv2.COLOR_BayerRGGB2RGB (alias COLOR_BayerBG2RGB in OpenCV's older naming) in the interior,
    but in float (no 8/16-bit quantisation) and defined down to 2x2.
    """
    height, width = bayer.shape
    sparse = np.zeros((height, width, 3), np.float32) if out is None else out
    if out is not None:
        sparse.fill(0.0)
    sparse[0::2, 0::2, 0] = bayer[0::2, 0::2]
    sparse[1::2, 1::2, 2] = bayer[1::2, 1::2]
    green = bayer
    green[0::2, 0::2] = 0.0
    green[1::2, 1::2] = 0.0
    rgb = cv2.filter2D(sparse, -1, _KERNEL_RB, dst=sparse, borderType=cv2.BORDER_REFLECT_101)
    rgb[:, :, 1] = cv2.filter2D(green, -1, _KERNEL_G, dst=green, borderType=cv2.BORDER_REFLECT_101)
    return rgb


# ---------------------------------------------------------------- noise


def add_read_shot_noise(bayer: np.ndarray, unit_noise: np.ndarray, shot: float, read: float) -> np.ndarray:
    """bayer + unit_noise * sqrt(shot * bayer + read) (variance = shot * x + read), shot > 0.
    Written into unit_noise and returned; bayer is overwritten (see _common)."""
    return add_signal_dependent_noise(bayer, unit_noise, shot, read)


# ---------------------------------------------------------------- the two halves of the pipeline


def unprocess(img: np.ndarray, rgb2cam: np.ndarray, gains: list[float]) -> np.ndarray:
    """sRGB HxWx3 -> linear camera RGB HxWx3 in [0, 1] (before mosaicing), as a new array:
    inverse tone curve, inverse gamma, rgb2cam, safe inverse of the white balance and brightness
    gains, clip."""
    raw = inverse_smoothstep(img)
    gamma_expansion(raw, out=raw)
    apply_ccm(raw, rgb2cam, out=raw)
    safe_invert_gains(raw, gains)
    return clip01(raw)


def process(rgb: np.ndarray, cam2rgb: np.ndarray) -> np.ndarray:
    """Linear camera RGB HxWx3 (white-balanced and gained) -> sRGB in [0, 1], in place: colour
    correction, clip, gamma, tone curve."""
    out = clip01(apply_ccm(rgb, cam2rgb, out=rgb))
    gamma_compression(out, out=out)
    return clip01(smoothstep(out, out=out))


def round_trip(img: np.ndarray, rgb2cam: np.ndarray, gains: list[float]) -> np.ndarray:
    """process(unprocess(img)) with no mosaic and no noise: the identity away from highlights and
    from colours outside the camera's gamut (what the tests check)."""
    raw = unprocess(img, rgb2cam, gains)
    raw = clip01(scale_channels(raw, gains, out=raw))
    return process(raw, inverse3(rgb2cam))


def resolve_jpeg_quality(rng: np.random.Generator, jpeg_quality) -> int | None:
    """None, the given quality, or one drawn from JPEG_RANDOM_RANGE for "random" (one rng draw)."""
    if jpeg_quality is None:
        return None
    if jpeg_quality == "random":
        return int(rng.integers(JPEG_RANDOM_RANGE[0], JPEG_RANDOM_RANGE[1] + 1))
    valid_int = isinstance(jpeg_quality, (int, np.integer)) and not isinstance(jpeg_quality, bool)
    if not valid_int or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be None, an int in [1, 100] or 'random', got {jpeg_quality!r}")
    return int(jpeg_quality)


def pad_to_even(img: np.ndarray) -> np.ndarray:
    """Replicate the last row / column where H / W is odd, so the mosaic has whole 2x2 cells and
    every channel is sampled (a 1-pixel-wide image would otherwise have no blue photosite)."""
    height, width = img.shape[:2]
    bottom, right = height % 2, width % 2
    if not (bottom or right):
        return img
    return cv2.copyMakeBorder(img, 0, bottom, 0, right, cv2.BORDER_REPLICATE)


def apply(img: np.ndarray, rng: np.random.Generator, severity: float, jpeg_quality=None
          ) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        resolve_jpeg_quality(np.random.default_rng(0), jpeg_quality)  # a bad option is an error at any severity
        return identity(img)

    # The camera and the noise levels first, in a fixed order, then the noise field.
    rgb2cam, ccm_weights = random_ccm(rng)
    brightness, red, blue = random_gains(rng)
    shot, read = random_noise_levels(rng, severity)
    height, width = img.shape[:2]
    padded = pad_to_even(img)
    unit_noise = standard_normal(rng, padded.shape[:2])
    quality = resolve_jpeg_quality(rng, jpeg_quality)  # last: the noise is the same with or without JPEG

    gains = channel_gains(brightness, red, blue)
    raw = unprocess(padded, rgb2cam, gains)
    bayer = mosaic(raw)
    noisy = add_read_shot_noise(bayer, unit_noise, shot, read)
    noisy = clip01(apply_bayer_gains(noisy, gains))
    out = process(demosaic(noisy, out=raw), inverse3(rgb2cam))
    if out.shape[:2] != (height, width):
        out = np.ascontiguousarray(out[:height, :width])
    if quality is not None:
        out = np.divide(encode_decode(to_uint8(out), quality), np.float32(255.0), dtype=np.float32)

    params = {
        "shot_noise": shot, "read_noise": read, "read_sigma": math.sqrt(read),
        "brightness_gain": brightness, "red_gain": red, "blue_gain": blue,
        "ccm_weights": ccm_weights, "rgb2cam": [[float(v) for v in row] for row in rgb2cam],
        "bayer": "RGGB", "gamma": GAMMA, "jpeg_quality": quality,
    }
    return out, params
