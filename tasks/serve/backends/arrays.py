"""What the torch Restorer does around the network, in numpy, for a runtime without torch: the
weight map's window (models.restorer.map_window), local tiling's layout and blend
(models.tiling.tiled_apply), the padding of small images (models.backbone.pad_to_multiple), the
tone lock (models/tone.py) and the keep blend (torch.lerp). The same arithmetic in float32; tests/test_onnx.py checks each against
its torch original.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SIZE_MULTIPLE = 8   # models.backbone.SIZE_MULTIPLE
DEFAULT_OVERLAP = 32   # models.tiling.DEFAULT_OVERLAP
TONE_CELL, TONE_BAND_ROWS = 32, 256   # models.tone.CELL, BAND_ROWS
TONE_FREE_KINDS = frozenset({"noise", "camera_noise", "blur", "jpeg", "bitdepth"})   # models.tone
TONE_EPS = 1e-4   # models.estimator.TONE_EPS (ToneCalibration's clamp)


def bilinear_rows(out_size: int, in_size: int, rows: np.ndarray) -> np.ndarray:
    """len(rows) x in_size: rows of the bilinear resize matrix (align_corners=False, as
    F.interpolate) from in_size to out_size samples (models.restorer.bilinear_rows)."""
    source = np.maximum((rows.astype(np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (source - low).astype(np.float32)
    matrix = np.zeros((len(rows), in_size), np.float32)
    index = np.arange(len(rows))
    np.add.at(matrix, (index, low), 1.0 - frac)
    np.add.at(matrix, (index, high), frac)
    return matrix


def map_window(weight_map: np.ndarray, size: tuple[int, int], rows: slice, cols: slice,
               multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """B x C x h x w map -> its bilinear resize to the image `size`, cut to rows x cols and padded
    at the bottom/right to a multiple of `multiple` by repeating the last row and column."""
    height, width = size
    span_y, span_x = rows.stop - rows.start, cols.stop - cols.start
    ys = np.minimum(np.arange(rows.start, rows.start + span_y + (-span_y % multiple)), rows.stop - 1)
    xs = np.minimum(np.arange(cols.start, cols.start + span_x + (-span_x % multiple)), cols.stop - 1)
    row_matrix = bilinear_rows(height, weight_map.shape[-2], ys)
    col_matrix = bilinear_rows(width, weight_map.shape[-1], xs)
    return np.ascontiguousarray(row_matrix @ weight_map.astype(np.float32) @ col_matrix.T)


def reflect_fits(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> bool:
    """Whether the backbone pads an image of this size by reflection (pad_to_multiple: the padding
    is smaller than the image on both sides), else by repeating the edge."""
    pad_h, pad_w = -height % multiple, -width % multiple
    return (pad_h == 0 and pad_w == 0) or (pad_h < height and pad_w < width)


def pad_edge(x: np.ndarray, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """... x H x W -> bottom/right padded to a multiple by repeating the edge (replicate)."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_h), (0, pad_w)], mode="edge")


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp's formula (the Restorer's keep blend): start + w (end - start), from the end
    for w >= 0.5."""
    weight = np.float32(weight)
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (np.float32(1.0) - weight)


# ------------------------------------------------------------------------------------------------
# The tone lock (models/tone.py)


def tone_free_share(used: np.ndarray, names: list[str]) -> np.ndarray:
    """B x (K+1) [x h x w] weights -> B x 1 [x h x w]: 1 - the tone-changing adapters' weights."""
    columns = [i for i, name in enumerate(names) if name not in TONE_FREE_KINDS]
    if not columns:
        return np.ones_like(used[:, :1])
    return np.clip(np.float32(1.0) - used[:, columns].sum(axis=1, keepdims=True, dtype=np.float32), 0.0, 1.0)


def calibrated_tone_share(share: np.ndarray, calibration: list[float] | None) -> np.ndarray:
    """The estimator's ToneCalibration: sigmoid(scale * logit(clamped share) + bias); `share` as it
    is without a calibration (None)."""
    if calibration is None:
        return share
    scale, bias = (np.float32(v) for v in calibration)
    clamped = np.clip(share, np.float32(TONE_EPS), np.float32(1 - TONE_EPS)).astype(np.float32)
    logit = np.log(clamped) - np.log1p(-clamped)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-(scale * logit + bias)))).astype(np.float32)


def cell_means(x: np.ndarray, cell: int = TONE_CELL) -> np.ndarray:
    """B x C x H x W -> means over cell x cell squares, partial at the bottom/right edges
    (F.avg_pool2d with ceil_mode and count_include_pad=False)."""
    height, width = x.shape[-2:]
    starts_y, starts_x = np.arange(0, height, cell), np.arange(0, width, cell)
    sums = np.add.reduceat(np.add.reduceat(x, starts_y, axis=-2, dtype=np.float32), starts_x, axis=-1, dtype=np.float32)
    counts = np.minimum(cell, height - starts_y)[:, None] * np.minimum(cell, width - starts_x)[None, :]
    return sums / counts.astype(np.float32)


def lock_tone(network: np.ndarray, image: np.ndarray, share: np.ndarray, cell: int = TONE_CELL,
              band_rows: int = TONE_BAND_ROWS) -> np.ndarray:
    """In place: network += share * upsample(cells(image) - cells(network)), clipped
    (models.tone.lock_tone). Returns `network`."""
    if not (share > 0).any():
        return network
    height, width = network.shape[-2:]
    difference = cell_means(image, cell) - cell_means(network, cell)
    col_matrix = bilinear_rows(width, difference.shape[-1], np.arange(width))
    share_cols = bilinear_rows(width, share.shape[-1], np.arange(width)) if share.ndim == 4 else None
    if share_cols is None:
        difference = difference * share.reshape(-1, 1, 1, 1).astype(np.float32)
    for start in range(0, height, band_rows):
        rows = np.arange(start, min(start + band_rows, height))
        correction = bilinear_rows(height, difference.shape[-2], rows) @ difference @ col_matrix.T
        if share_cols is not None:
            correction *= bilinear_rows(height, share.shape[-2], rows) @ share.astype(np.float32) @ share_cols.T
        network[..., start:start + len(rows), :] += correction
    return np.clip(network, 0.0, 1.0, out=network)


# ------------------------------------------------------------------------------------------------
# Local tiling (models/tiling.py)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_ramp(length: int, rise: int, fall: int) -> np.ndarray:
    def up(n: int) -> np.ndarray:
        return (np.sin(np.float32(0.5 * math.pi) * (np.arange(n, dtype=np.float32) + np.float32(0.5)) / np.float32(n))
                ** 2).astype(np.float32)

    ramp = np.ones(length, np.float32)
    if rise > 0:
        ramp[:rise] = up(rise)
    if fall > 0:
        ramp[length - fall:] = np.minimum(ramp[length - fall:], up(fall)[::-1])
    return ramp


def ramps(size: int, tile: int, overlap: int) -> list[tuple[int, int, np.ndarray]]:
    starts = tile_starts(size, tile, overlap)
    out = []
    for i, start in enumerate(starts):
        length = min(tile, size - start)
        rise = starts[i - 1] + tile - start if i > 0 else 0
        fall = start + length - starts[i + 1] if i + 1 < len(starts) else 0
        out.append((start, length, blend_ramp(length, rise, fall)))
    return out


def tiled_apply(fn: Callable[[np.ndarray, tuple[slice, slice]], np.ndarray], images: np.ndarray, tile: int,
                overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """fn(crop, (rows, cols)) over overlapping tile x tile crops of B x C x H x W images, blended
    with raised-cosine ramps into one image (float32)."""
    b, c, h, w = images.shape
    out = np.zeros((b, c, h, w), np.float32)
    rows, cols = ramps(h, tile, overlap), ramps(w, tile, overlap)
    total_y, total_x = _ramp_sum(rows, h), _ramp_sum(cols, w)
    for y, th, wy in rows:
        for x, tw, wx in cols:
            where = (slice(y, y + th), slice(x, x + tw))
            out[:, :, where[0], where[1]] += fn(images[:, :, where[0], where[1]], where) * (wy[:, None] * wx[None, :])
    for top in range(0, h, tile):   # a band of rows at a time: no image-sized weight array
        band = slice(top, top + tile)
        out[:, :, band] /= total_y[band, None] * total_x[None, :]
    return out


def _ramp_sum(ramps_: list[tuple[int, int, np.ndarray]], size: int) -> np.ndarray:
    total = np.zeros(size, np.float32)
    for start, length, ramp in ramps_:
        total[start:start + length] += ramp
    return total
