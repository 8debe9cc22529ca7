"""Inference: a system loaded from its component files restores float RGB images.

What the pyfunc runs at load and predict time, and what `abair restore` runs on each image. It
imports nothing from the registry, evaluation or image files, so the pyfunc model folder bundles
it with only the few core modules it needs (tasks/serve/pyfunc.py: SERVING_CODE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.components import load_system

# Per-tile pixel budget: 512 x 512 tiles keep the `large` backbone under a few GB of activations.
DEFAULT_MAX_PIXELS = 512 * 512
# The modes a served image can ask for: every models.restorer.MODES but "oracle", which needs the
# true weights (known for evaluation sets only). Spelled out rather than imported so that the
# CLI's parser does not import torch (tests/test_restore_pw.py checks that they agree).
SERVED_MODES = ("sw", "oh", "pw", "none")
# Where the pixel-wise mode's weight map comes from: the estimator's dense head, or the backbone's
# Phase I segmentation head (one extra backbone pass). None: what the system has (dense first).
PW_SOURCES = ("dense", "seg")


def mode_problem(mode: str, pw_source: str | None) -> tuple[str, str] | None:
    """(knob, problem) when a mode and weight-map source cannot go together, else None."""
    if mode not in SERVED_MODES:
        return "mode", f"must be one of {', '.join(SERVED_MODES)}, got {mode!r}"
    if pw_source is not None and pw_source not in PW_SOURCES:
        return "pw_source", f"must be one of {', '.join(PW_SOURCES)}, got {pw_source!r}"
    if pw_source is not None and mode != "pw":
        return "pw_source", f"chooses the weight map of mode pw; mode {mode} has none"
    return None


def needs_seg_head(mode: str, pw_source: str | None) -> bool:
    """Whether a system loaded for this mode must keep the Phase I segmentation head: when the
    seg source is asked for, or may be the default (a system without a dense estimator)."""
    return mode == "pw" and pw_source != "dense"


def load_restorer(backbone: str | Path, adapters: str | Path, estimator: str | Path, device: str = "auto",
                  keep_seg_head: bool = False):
    """A Restorer, in eval mode on `device` (auto | cpu | cuda | cuda:N), from its component files;
    keep_seg_head: keep the segmentation head the pw mode's seg source reads."""
    # torch comes in here, not on import: `abair --help` imports this module (through the restore
    # command's defaults) and stays instant
    from tasks.core.device import pick_device

    return load_system(backbone, adapters, estimator, pick_device(device), keep_seg_head=keep_seg_head)


@dataclass
class Restoration:
    rgb: np.ndarray                  # restored float32 H x W x 3 in [0, 1]
    weights: dict[str, float]        # {adapter: weight, ..., "keep": keep}; in pw the map's mean over the image
    weight_map: np.ndarray | None    # pw: the (K+1) x h x w map applied (columns: weight_names); else None


def restore_image(restorer, rgb: np.ndarray, mode: str = "sw", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  tiling: str = "exact", pw_source: str | None = None) -> Restoration:
    """float32 RGB HxWx3 in [0, 1] -> its Restoration: the restored image, the per-image weights
    (models.restorer.weights_summary: a pw map's mean per column) and, in pw, the map itself."""
    import torch  # not on import: see load_restorer

    from models.restorer import weights_summary

    device = next(restorer.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(device)
    restored, used = restorer.restore(x, mode=mode, max_pixels=max_pixels, tiling=tiling, pw_source=pw_source)
    out = restored[0].permute(1, 2, 0).float().cpu().numpy()
    weight_map = used[0].float().cpu().numpy() if used is not None and used.dim() == 4 else None
    weights = {} if used is None else \
        {n: float(w) for n, w in zip(restorer.weight_names, weights_summary(used)[0].cpu().tolist())}
    return Restoration(out, weights, weight_map)


def restore_rgb(restorer, rgb: np.ndarray, mode: str = "sw", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                tiling: str = "exact", pw_source: str | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """float32 RGB HxWx3 in [0, 1] -> (restored float32 HxWx3, {adapter: weight, ..., "keep": keep});
    in pw the weights are the map's per-image means (restore_image also returns the map)."""
    restoration = restore_image(restorer, rgb, mode, max_pixels, tiling, pw_source)
    return restoration.rgb, restoration.weights


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
