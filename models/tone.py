"""Tone lock: a restoration keeps the input's low frequencies unless the estimator names a
degradation that changes them.

Noise, blur, JPEG and bit-depth loss leave a photo's low frequencies (its brightness and colour
over tens of pixels) as they were: zero-mean noise, a kernel that sums to one, a quantiser. Low
light, haze, rain (its veil and the light of its streaks) and snow change them. So restoring the
first kind should leave them as well, whatever the network does. It does not always: a small
backbone trained on composites, where noise mostly comes with darkness (low light is noisy), can
learn to brighten every noisy photo, and soft adapter weights spread over five experts add a
little of the low-light and haze adapters' tone to photos that are neither dark nor hazy.

The lock moves the network output's cell means (CELL x CELL pixel squares, interpolated
bilinearly between cell centres, so the correction is smooth) towards the input's, by the share
of the weights that goes to no tone-changing expert:

    network += share * upsample(cells(input) - cells(network)),
    share    = 1 - (sum of the weights of the adapters whose kind changes tone)

per image (modes sw, oh, oracle) or per pixel (pw's map). The backbone-alone share counts as
tone-free: the estimator puts an image's weight there when it is clean or barely degraded, and
then nothing should move. An adapter kind not listed in TONE_FREE_KINDS is taken to change tone
(its share is never locked). The keep head still judges the unlocked output (as it sees it in
training, where its loss counts the locked, served result with estimator.keep_sees_lock, the
unlocked one without); the keep blend comes after the lock.
Mode "none" (the backbone alone) is not locked.

With an estimator tone calibration (`estimator.tone_calibration`), the share is mapped by
sigmoid(scale * logit(share) + bias), two numbers trained with keep on the served result: the
weights are shares of experts, not the chance that a photo needs no tone change, so a dark photo
with some noise weight should still be brightened in full, a noisy one with some low-light weight
locked in full.

CELL = 32 px is larger than what the tone-free experts act on (noise is per pixel; blur kernels
reach 21 px) and small enough that the lock follows a photo's own lighting. The correction is
computed in bands of rows from the cells, so it needs no image-sized temporary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from models.tiling import bilinear_rows

CELL = 32
BAND_ROWS = 256
TONE_FREE_KINDS = frozenset({"noise", "camera_noise", "blur", "jpeg", "bitdepth"})


def tone_columns(names: Sequence[str]) -> list[int]:
    """Indices of the weight columns whose adapter kind changes tone (not in TONE_FREE_KINDS)."""
    return [i for i, name in enumerate(names) if name not in TONE_FREE_KINDS]


def tone_free_share(used: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """B x (K+1) weights (adapters in `names` order, then keep) -> B x 1 share to lock; a
    B x (K+1) x h x w map -> B x 1 x h x w."""
    columns = tone_columns(names)
    if not columns:
        return torch.ones_like(used[:, :1])
    return (1.0 - used[:, columns].sum(1, keepdim=True)).clamp_(0.0, 1.0)


def cell_means(x: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """B x C x H x W -> the means over cell x cell squares (the last row and column of cells
    partial), B x C x ceil(H / cell) x ceil(W / cell)."""
    return F.avg_pool2d(x, cell, cell, ceil_mode=True, count_include_pad=False)


def lock_tone(network: torch.Tensor, images: torch.Tensor, share: torch.Tensor, cell: int = CELL,
              band_rows: int = BAND_ROWS) -> torch.Tensor:
    """In place: network += share * upsample(cells(images) - cells(network)), clamped to [0, 1].
    share: B x 1 (one per image) or B x 1 x h x w (a map at its own resolution, resized
    bilinearly like the correction). Returns `network`."""
    if not bool((share > 0).any()):
        return network
    height, width = network.shape[-2:]
    difference = cell_means(images.to(network.dtype), cell) - cell_means(network, cell)
    col_matrix = bilinear_rows(width, difference.shape[-1], torch.arange(width)).to(network.device, network.dtype)
    share_cols = None
    if share.dim() == 4:
        share_cols = bilinear_rows(width, share.shape[-1], torch.arange(width)).to(network.device, network.dtype)
    else:
        difference = difference * share.view(-1, 1, 1, 1).to(network.dtype)
    for start in range(0, height, band_rows):
        rows = torch.arange(start, min(start + band_rows, height))
        row_matrix = bilinear_rows(height, difference.shape[-2], rows).to(network.device, network.dtype)
        correction = row_matrix @ difference @ col_matrix.T                       # B x 3 x rows x W
        if share_cols is not None:
            share_rows = bilinear_rows(height, share.shape[-2], rows).to(network.device, network.dtype)
            correction.mul_(share_rows @ share.to(network.dtype) @ share_cols.T)  # B x 1 x rows x W
        network[..., start:start + len(rows), :].add_(correction)
    return network.clamp_(0.0, 1.0)
