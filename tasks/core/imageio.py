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


# Larger images are refused before decoding (a few hundred bytes of PNG header can declare
# 60000 x 60000 pixels). Huge legitimate photos still restore in tiles: the limit is on what one
# decoded image may hold in memory, not on the tile budget (`max_pixels`).
MAX_IMAGE_PIXELS = 100_000_000
LIMIT_HINT = "raise the limit with --max-image-pixels (abair restore) or synthesize.max_image_pixels"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                      # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA:                      # scan data before any frame header
            return None
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(data[:4])
    if order is None:
        return None
    at = int.from_bytes(data[4:8], order)
    if at + 2 > len(data):
        return None
    size = {}
    for k in range(int.from_bytes(data[at:at + 2], order)):
        entry = data[at + 2 + 12 * k:at + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):
            size[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (size[256], size[257]) if len(size) == 2 else None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if data[:2] != b"BM" or len(data) < 26:
        return None
    return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the file's header declares it, read without decoding (PNG, JPEG, WebP,
    TIFF, BMP); None when the header does not say or the format is another."""
    for reader in (_png_size, _jpeg_size, _webp_size, _tiff_size, _bmp_size):
        size = reader(data)
        if size is not None:
            return size
    return None


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise AbairError(name, f"is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over the limit of "
                               f"{max_pixels / 1e6:g} megapixels ({LIMIT_HINT})")


def decode(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Bytes from outside -> the stored array in RGB(A) channel order, dtype as stored (uint8,
    uint16 or float). The one decoding boundary: whatever goes wrong (an empty, truncated, corrupt
    or hostile file, an over-large declared size, NaN or infinite samples) ends in an AbairError
    naming `name`, never in another exception."""
    if not data:
        raise AbairError(name, "empty file")
    size = declared_size(data)
    if size is not None:
        check_pixels(name, *size, max_pixels)
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem, said once
        detail = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise AbairError(name, f"not a readable image ({detail})") from None
    if raw is None or raw.size == 0:
        raise AbairError(name, "not a readable image (corrupt or unsupported format)")
    check_pixels(name, raw.shape[1], raw.shape[0], max_pixels)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise AbairError(name, "holds NaN or infinite sample values")
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


def to_grey_rgb(img: np.ndarray) -> np.ndarray:
    """A grey copy of a float32 HxWx3 RGB image: three equal channels of its BT.601 luma.

    Weighted sum by elementwise ufuncs, not `img @ weights`: BLAS kernels (picked per CPU) round
    differently, and a grey training crop must have the same bytes on every machine."""
    img = np.asarray(img, dtype=np.float32)
    luma = img[..., 0] * np.float32(0.299)
    luma += img[..., 1] * np.float32(0.587)
    luma += img[..., 2] * np.float32(0.114)
    return np.repeat(luma, 3).reshape(img.shape)


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
