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
