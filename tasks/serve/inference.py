"""Inference: a system loaded from its component files restores float RGB images.

What the pyfunc runs at load and predict time, and what `abair restore` runs on each image. It
imports nothing from the registry, evaluation or image files, so the pyfunc model folder bundles
it with only the few core modules it needs (tasks/serve/pyfunc.py: SERVING_CODE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.components import load_system

# Per-tile pixel budget: 512 x 512 tiles keep the `large` backbone under a few GB of activations.
DEFAULT_MAX_PIXELS = 512 * 512


def load_restorer(backbone: str | Path, adapters: str | Path, estimator: str | Path, device: str = "auto"):
    """A Restorer, in eval mode on `device` (auto | cpu | cuda | cuda:N), from its component files."""
    # torch comes in here, not on import: `abair --help` imports this module (through the restore
    # command's defaults) and stays instant
    from tasks.core.device import pick_device

    return load_system(backbone, adapters, estimator, pick_device(device))


def restore_rgb(restorer, rgb: np.ndarray, mode: str = "sw", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                tiling: str = "exact") -> tuple[np.ndarray, dict[str, float]]:
    """float32 RGB HxWx3 in [0, 1] -> (restored float32 HxWx3, {adapter: weight, ..., "keep": keep})."""
    import torch  # not on import: see load_restorer

    device = next(restorer.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(device)
    restored, weights = restorer.restore(x, mode=mode, max_pixels=max_pixels, tiling=tiling)
    out = restored[0].permute(1, 2, 0).float().cpu().numpy()
    used = {} if weights is None else {n: float(w) for n, w in zip(restorer.weight_names, weights[0].cpu().tolist())}
    return out, used


def planar_float_rgb(raw: np.ndarray) -> np.ndarray:
    """imageio.to_float_rgb's image as an HxWx3 view of a 3xHxW array: the network's layout, so
    restore_rgb hands it to torch without a copy (a large image's one float copy is 12 bytes/px)."""
    height, width = raw.shape[:2]
    planes = np.empty((3, height, width), np.float32)
    scale = {np.dtype(np.uint8): 1.0 / 255.0, np.dtype(np.uint16): 1.0 / 65535.0}.get(raw.dtype)
    for c in range(3):
        channel = raw if raw.ndim == 2 else raw[:, :, c]
        np.copyto(planes[c], channel, casting="unsafe")
        if scale is not None:
            planes[c] *= scale
        elif raw.dtype != np.bool_:
            np.clip(planes[c], 0.0, 1.0, out=planes[c])
    return planes.transpose(1, 2, 0)


def to_stored(img: np.ndarray, dtype: np.dtype, rows: int = 256) -> np.ndarray:
    """float [0, 1] -> the input's sample type, rounded; `rows` at a time, so the float
    temporaries stay small beside a large image."""
    if dtype not in (np.uint8, np.uint16):
        return np.clip(img, 0.0, 1.0, dtype=np.float32)
    scale = 255.0 if dtype == np.uint8 else 65535.0
    out = np.empty(img.shape, dtype)
    for top in range(0, img.shape[0], rows):
        band = np.clip(img[top:top + rows], 0.0, 1.0)
        band *= scale
        band += 0.5
        out[top:top + rows] = band
    return out
