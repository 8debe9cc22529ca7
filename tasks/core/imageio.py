"""Image decoding and encoding at the pipeline's edges (OpenCV), with one clear error per bad file.

In memory every image is float32 RGB, HxWx3, in [0, 1]; on disk and in shards it is 8-bit PNG.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tasks.core import storage
from tasks.core.errors import AbairError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def decode(data: bytes, name: str) -> np.ndarray:
    """Bytes -> the stored array in RGB(A) channel order, dtype as stored (uint8 or uint16)."""
    if not data:
        raise AbairError(name, "empty file")
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise AbairError(name, "not a readable image (corrupt or unsupported format)")
    if raw.ndim == 3:
        if raw.shape[2] == 3:
            raw = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
        elif raw.shape[2] == 4:
            raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA)
        elif raw.shape[2] == 1:
            raw = raw[:, :, 0]
    return raw


def is_grayscale(raw: np.ndarray) -> bool:
    """True for single-channel images and for colour images whose three channels are equal."""
    if raw.ndim == 2:
        return True
    rgb = raw[:, :, :3]
    return bool(np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]))


def to_float_rgb(raw: np.ndarray) -> np.ndarray:
    """uint8/uint16/float array (gray, RGB or RGBA) -> float32 RGB in [0, 1]; alpha is dropped."""
    if raw.dtype == np.uint8:
        img = raw.astype(np.float32) * (1.0 / 255.0)
    elif raw.dtype == np.uint16:
        img = raw.astype(np.float32) * (1.0 / 65535.0)
    elif raw.dtype == np.bool_:
        img = raw.astype(np.float32)
    else:
        img = np.clip(raw.astype(np.float32), 0.0, 1.0)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def to_uint8(img: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 with rounding (clipped); uint8 passes through."""
    if img.dtype == np.uint8:
        return img
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    """float RGB or uint8 RGB/gray -> PNG bytes. Low compression: shards favour speed over size."""
    pixels = to_uint8(img)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise AbairError("<png>", "could not encode image")
    return buf.tobytes()


def read_image(uri: str | Path, endpoint_url: str | None = None) -> np.ndarray:
    """Read one image file (local or s3://) as float32 RGB in [0, 1]."""
    return to_float_rgb(decode(storage.read_bytes(uri, endpoint_url), str(uri)))


def write_image(uri: str | Path, img: np.ndarray, endpoint_url: str | None = None) -> None:
    """Write float RGB (or uint8) as PNG, atomically."""
    storage.write_bytes(uri, encode_png(img, compression=3), endpoint_url)
