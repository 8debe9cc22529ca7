"""JPEG quality estimation: which IJG quality a JPEG file was written at, read from its
quantisation tables, so a restored JPEG is written back at the quality it came in.
"""

from __future__ import annotations

import cv2
import numpy as np


def jpeg_quant_tables(data: bytes) -> dict[int, tuple[int, ...]]:
    """Quantisation tables (id -> 64 values, file order) from a JPEG's DQT segments."""
    tables: dict[int, tuple[int, ...]] = {}
    if data[:2] != b"\xff\xd8":
        return tables
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: no tables after this
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xDB:
            i = 0
            while i < len(segment):
                precision, table_id = segment[i] >> 4, segment[i] & 0x0F
                size = 128 if precision else 64
                raw = segment[i + 1:i + 1 + size]
                if len(raw) < size:
                    break
                values = raw if not precision else [int.from_bytes(raw[k:k + 2], "big") for k in range(0, 128, 2)]
                tables[table_id] = tuple(values)
                i += 1 + size
        pos += 2 + length
    return tables


_REFERENCE_TABLES: dict[int, tuple[int, ...]] = {}


def _reference_table(quality: int) -> tuple[int, ...]:
    """The luminance table OpenCV's libjpeg writes at `quality`."""
    if quality not in _REFERENCE_TABLES:
        ok, buf = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        _REFERENCE_TABLES[quality] = jpeg_quant_tables(buf.tobytes()).get(0, ())
    return _REFERENCE_TABLES[quality]


def estimate_jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) whose luminance table is nearest the file's; None without tables.

    Exact for files written by libjpeg-based encoders (OpenCV, Pillow, most cameras' software);
    for custom tables it is the closest standard quality, which keeps the file size about the same.
    """
    table = jpeg_quant_tables(data).get(0)
    if not table:
        return None
    ours = np.asarray(table, np.int64)
    best, best_err = None, None
    for quality in range(1, 101):
        reference = np.asarray(_reference_table(quality), np.int64)
        if reference.shape != ours.shape:
            continue
        err = int(np.abs(reference - ours).sum())
        if best_err is None or err < best_err:
            best, best_err = quality, err
        if err == 0:
            break
    return best
