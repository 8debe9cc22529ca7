"""JPEG compression artefacts (blocking, ringing, chroma bleeding) through OpenCV's libjpeg.

Severity mapping:
    quality = round(60 - 50 * severity)    just above 0 -> 60, 0.5 -> 35, 0.8 -> 20, 1.0 -> 10
Severity 0 is the identity (no encode at all). The image is rounded to 8 bits, encoded as a
baseline JPEG with OpenCV's defaults (4:2:0 chroma subsampling) and decoded; the output is
therefore on the 8-bit grid. Deterministic: the rng is not used.
"""

from __future__ import annotations

import cv2
import numpy as np

from ._common import check_image, check_severity, identity

NAME = "jpeg"
ORDER = 60  # compression is the last thing that happens to a photo (camera or upload)

BEST_QUALITY = 60
WORST_QUALITY = 10


def quality_for(severity: float) -> int:
    return int(np.floor(BEST_QUALITY - (BEST_QUALITY - WORST_QUALITY) * severity + 0.5))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round to the 8-bit grid (saturating)."""
    return cv2.convertScaleAbs(img, alpha=255.0)


def encode_decode(rgb8: np.ndarray, quality: int) -> np.ndarray:
    """One JPEG round trip of an 8-bit RGB image; OpenCV works in BGR."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode a {rgb8.shape} image")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def apply(img: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, dict]:
    img = check_image(img)
    severity = check_severity(severity)
    if severity == 0.0:
        return identity(img)
    quality = quality_for(severity)
    decoded = encode_decode(to_uint8(img), quality)
    # Divide (not multiply by 1/255): the same floats as any 8-bit image loaded as x / 255.
    return np.divide(decoded, np.float32(255.0), dtype=np.float32), {"quality": quality}
