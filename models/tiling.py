"""Tiled inference: how a large image runs in pieces.

Exact tiling (Backbone.forward(x, tile=...)) tiles inside every transformer block: the blocks'
wide maps exist for one tile at a time, and the result equals whole-image inference up to float
summation order. Local tiling (tiled_apply) runs a whole network on overlapping tiles blended
with raised-cosine ramps: memory independent of the image size, but each tile sees only itself.

Exact tiling runs a block's parts itself, so adapter layers are seen in two places only: layers
on the blocks' 1x1 convolutions run per tile like the convolutions they wrap (with per-pixel
weights, each reads its tile's window of the map: pixel_window), and a layer on a block's `ffn`
exposes `adapter_delta(x)`, computed once on the whole map (AdaptIR's FFT is global).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

DEFAULT_OVERLAP = 32
# Exact tiles of this side (in first-level pixels) run fastest on CPU: a tile's wide maps stay in
# the cache instead of streaming through memory. On the tiny system (benchmarks/inference.py) a
# 512 x 512 image ran 1.7x faster in tiles of 96-128 px than whole, and tiles of 64 px lost to
# Python overhead. GPUs want the opposite (large launches), so they run whole.
CACHE_TILE = 128

# run_block(block, x): how Backbone.features runs each transformer block
BlockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Exact tiling


@dataclass(frozen=True)
class HaloTile:
    """One tile of a feature map, as index tuples for B x C x H x W tensors."""
    region: tuple   # the tile grown by the halo, clipped to the map
    inner: tuple    # the tile inside `region`
    out: tuple      # the tile inside the map


def halo_tiles(height: int, width: int, side: int, halo: int) -> list[HaloTile]:
    """Tiles of at most side x side covering the map, equal in size to within a pixel. Operations
    that reach `halo` pixels, run on `region` with their own zero padding, are exact on `inner`:
    inside the map the halo supplies the neighbours, at its border the padding is the same as
    for the whole map."""
    def cuts(size: int) -> list[tuple[int, int]]:
        count = math.ceil(size / side)
        edges = [round(i * size / count) for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:]))

    tiles = []
    for y0, y1 in cuts(height):
        for x0, x1 in cuts(width):
            ry0, rx0 = max(y0 - halo, 0), max(x0 - halo, 0)
            ry1, rx1 = min(y1 + halo, height), min(x1 + halo, width)
            tiles.append(HaloTile((..., slice(ry0, ry1), slice(rx0, rx1)),
                                  (..., slice(y0 - ry0, y1 - ry0), slice(x0 - rx0, x1 - rx0)),
                                  (..., slice(y0, y1), slice(x0, x1))))
    return tiles


def forward_tiled(block: nn.Module, x: torch.Tensor, side: int) -> torch.Tensor:
    """A TransformerBlock's forward() holding its wide maps (3C for attention, 2 x hidden in the
    FFN) for one side x side tile at a time; only x, V and the output are whole. Equal to forward()
    up to float summation order, at every pixel.

    MDTA's attention is global over the pixels, so it takes two passes over the tiles: the first
    sums Q K^T and the squared norms of Q and K and keeps each tile's V, the second applies the
    softmax to V. Everything else is per pixel or a 3x3 depthwise conv (one pixel of halo). Tiles
    small enough to stay in the CPU's cache make this faster than the whole map in one go.
    """
    for part in (block.norm1, block.attn, block.norm2):
        if getattr(part, "wraps_base_layer", False):   # tiling calls their insides, so it would skip it
            raise NotImplementedError(f"exact tiling cannot run an adapter layer on {type(part.base_layer).__name__}")
    attn = block.attn
    tiles = halo_tiles(x.shape[-2], x.shape[-1], side, halo=1)
    level = tuple(x.shape[-2:])

    gram = q_sq = k_sq = None
    values = []
    for tile in tiles:
        with pixel_window((attn.qkv,), level, tile.region):
            qkv = attn.qkv_dwconv(attn.qkv(block.norm1(x[tile.region])))[tile.inner]
        q, k, v = attn.pixel_rows(qkv.contiguous(memory_format=torch.channels_last))   # B x heads x pixels x c
        sums = [t.float() for t in attn.sums(q, k)]   # over many tiles: float32 even under bf16 autocast
        gram, q_sq, k_sq = sums if gram is None else (gram + sums[0], q_sq + sums[1], k_sq + sums[2])
        values.append(v.clone())   # V alone: the tile's Q and K go
    weights = attn.attention_from_sums(gram, q_sq, k_sq)                    # B x heads x c x c

    y = torch.empty_like(x)
    for tile, v in zip(tiles, values):
        h, w = y[tile.out].shape[-2:]
        with pixel_window((attn.project_out,), level, tile.out):
            y[tile.out] = x[tile.out] + attn.project_out(attn.apply_attention(weights, v, h, w))
    del values

    adapter_delta = getattr(block.ffn, "adapter_delta", None)
    delta = adapter_delta(block.norm2(y)) if adapter_delta is not None else None
    ffn = block.ffn.base_layer if adapter_delta is not None else block.ffn
    out = torch.empty_like(y)
    for tile in tiles:
        with pixel_window(ffn.modules(), level, tile.region):
            out[tile.out] = y[tile.out] + ffn(block.norm2(y[tile.region]))[tile.inner]
        if delta is not None:
            out[tile.out] += delta[tile.out].to(out.dtype)
    return out


def run_tile(height: int, width: int, side: int | None, device: torch.device) -> int | None:
    """The exact tile side one backbone run on a height x width image uses: `side` (the memory
    bound of exact tiling; None: no bound) where the image exceeds it, and on CPU at most
    CACHE_TILE where the image exceeds that (same result, faster); None: whole."""
    tile = side if side is not None and (height > side or width > side) else None
    if device.type == "cpu" and max(height, width) > CACHE_TILE:
        tile = CACHE_TILE if tile is None else min(tile, CACHE_TILE)
    return tile


@contextlib.contextmanager
def pixel_window(modules, level: tuple[int, int], where: tuple):
    """While a tile runs: adapter layers among `modules` read their per-pixel weights at `where`
    (an index into their level of size `level`), not at the whole level."""
    layers = [m for m in modules if hasattr(m, "window") and getattr(m, "wraps_base_layer", False)]
    for layer in layers:
        layer.window = (level, where)
    try:
        yield
    finally:
        for layer in layers:
            layer.window = None


def block_runner(tile: int, level1_width: int) -> BlockRunner:
    """run_block for Backbone.features: every block through forward_tiled, its tile side scaled
    from `tile` at the first level so that channels x pixels stay the same at every level."""
    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        width = block.norm1.weight.numel()
        return forward_tiled(block, x, max(16, round(tile * math.sqrt(level1_width / width))))

    return run


# ------------------------------------------------------------------------------------------------
# Local tiling


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with the fewest tiles whose overlaps are >= `overlap`,
    spread evenly (so every seam gets the same, widest possible, blending band)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_ramp(length: int, rise: int, fall: int, device=None) -> torch.Tensor:
    """1-D tile weight: a raised-cosine ramp up over the first `rise` px and down over the last
    `fall` px (the overlaps with the previous / next tile), 1 in between.

    Over an overlap the falling ramp of one tile and the rising ramp of the next sum to exactly 1
    (cos^2 + sin^2); the blend still divides by the summed weights, so any layout is safe.
    """
    def up(n: int) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * (torch.arange(n, device=device) + 0.5) / n) ** 2

    ramp = torch.ones(length, device=device)
    if rise > 0:
        ramp[:rise] = up(rise)
    if fall > 0:
        ramp[length - fall:] = torch.minimum(ramp[length - fall:], up(fall).flip(0))
    return ramp


def _ramps(size: int, tile: int, overlap: int, device) -> list[tuple[int, int, torch.Tensor]]:
    """(start, length, 1-D weight) of every tile along one axis."""
    starts = tile_starts(size, tile, overlap)
    out = []
    for i, start in enumerate(starts):
        length = min(tile, size - start)
        rise = starts[i - 1] + tile - start if i > 0 else 0
        fall = start + length - starts[i + 1] if i + 1 < len(starts) else 0
        out.append((start, length, blend_ramp(length, rise, fall, device)))
    return out


def tiled_apply(fn, images: torch.Tensor, tile: int, overlap: int = DEFAULT_OVERLAP,
                with_window: bool = False) -> torch.Tensor:
    """fn over overlapping tile x tile crops of B x C x H x W images, blended into one image;
    with_window: fn(crop, (rows, cols)) is told where the crop lies (slices), e.g. to crop a
    per-pixel weight map the same way.

    The tile weights are outer products of 1-D ramps on a grid of rows and columns, so their sum
    over the tiles is the outer product of the 1-D sums: the image-sized arrays are the output alone."""
    b, c, h, w = images.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float32, device=images.device)
    rows, cols = _ramps(h, tile, overlap, images.device), _ramps(w, tile, overlap, images.device)
    total_y, total_x = _ramp_sum(rows, h, images.device), _ramp_sum(cols, w, images.device)
    for y, th, wy in rows:
        for x, tw, wx in cols:
            window = wy[:, None] * wx[None, :]                                     # th x tw
            crop = images[:, :, y:y + th, x:x + tw]
            restored = fn(crop, (slice(y, y + th), slice(x, x + tw))) if with_window else fn(crop)
            out[:, :, y:y + th, x:x + tw] += restored.float() * window
    for top in range(0, h, tile):   # divide a band of rows at a time: no image-sized weight map
        band = slice(top, top + tile)
        out[:, :, band] /= total_y[band, None] * total_x[None, :]
    return out


def _ramp_sum(ramps: list[tuple[int, int, torch.Tensor]], size: int, device) -> torch.Tensor:
    total = torch.zeros(size, device=device)
    for start, length, ramp in ramps:
        total[start:start + length] += ramp
    return total


def bilinear_rows(out_size: int, in_size: int, rows: torch.Tensor) -> torch.Tensor:
    """len(rows) x in_size: the rows of the bilinear resize matrix (align_corners=False, as
    F.interpolate) from in_size to out_size samples, for output positions `rows`."""
    source = ((rows.double() + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = (source - low.double()).float()
    matrix = torch.zeros(len(rows), in_size)
    index = torch.arange(len(rows))
    matrix.index_put_((index, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((index, high), frac, accumulate=True)
    return matrix
