"""The whole ABAIR system behind one call: estimator -> adapter weights -> backbone + adapters.

    restorer = Restorer(backbone, bank, estimator)
    restored, weights = restorer.restore(images, mode="sw")

Modes: "none" (backbone alone), "oracle" (the caller's weights), "sw" (estimator soft weights),
"oh" (estimator one-hot). Weights follow the modes contract (../shared/DESIGN.md): K adapter
weights (summing to at most one; the rest is the backbone alone) and one `keep` in [0, 1] that
blends the network's output back towards the input, `out = keep * input + (1 - keep) * network`,
so the system can leave an image as it came (do no harm). In the estimator's modes keep comes from
the estimator once the network has run (it looks at the input and the output); callers passing
weights give keep themselves (K columns: keep 0). With a mergeable adapter kind (LoRA) and the same weights for every
image of the batch (always so for a single image), the blend is merged into the backbone for the
call: zero overhead. Large images run tiled (models/tiling.py). `tiling="exact"` (the default)
tiles inside every transformer block (Backbone.forward(tile=...)): the same result as the whole
image, to float rounding, with the blocks' wide maps held one tile at a time. `tiling="local"`
runs the network on overlapping tiles blended with raised-cosine ramps: memory independent of
the image size, but each tile's channel attention sees only that tile, so results differ slightly
(no seams). Either way the estimator sees the whole image once, so every tile uses the same
adapter weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn

from models.adapters import AdapterBank
from models.backbone import SIZE_MULTIPLE, Backbone
from models.estimator import Estimator
from models.identity import restoration_state_dict
from models.tiling import DEFAULT_OVERLAP, tiled_apply

MODES = ("sw", "oh", "oracle", "none")
TILINGS = ("exact", "local")


class Restorer(nn.Module):
    def __init__(self, backbone: Backbone, bank: AdapterBank | None = None, estimator: Estimator | None = None,
                 names: Sequence[str] | None = None):
        """`names`: the adapter each weight column stands for (the estimator's output order);
        defaults to the estimator's class names, else the bank's order."""
        super().__init__()
        if bank is not None and bank.backbone is not backbone:
            raise ValueError("the adapter bank belongs to another backbone")
        self.backbone = backbone
        self.estimator = estimator
        self.bank = bank
        if names is None:
            names = (estimator.class_names if estimator is not None and estimator.class_names else None) \
                or (bank.names if bank is not None else [])
        self.names = list(names)
        if bank is not None:
            unknown = [n for n in self.names if n not in bank]
            if unknown:
                raise ValueError(f"no adapter in the bank for {unknown} (bank has {bank.names})")
        if estimator is not None and estimator.num_outputs != len(self.names):
            raise ValueError(f"the estimator has {estimator.num_outputs} outputs for {len(self.names)} adapters")

    # -- weights -----------------------------------------------------------------------------

    def _to_bank_columns(self, weights: torch.Tensor) -> torch.Tensor:
        """B x len(names) -> B x len(bank.names) (bank order; adapters not in `names` get 0)."""
        if self.names == self.bank.names:
            return weights
        out = weights.new_zeros(weights.shape[0], len(self.bank))
        out[:, [self.bank.names.index(n) for n in self.names]] = weights
        return out

    @property
    def weight_names(self) -> list[str]:
        """The columns of the weights `restore` takes and returns: the adapters, then `keep`."""
        return [*self.names, "keep"]

    def _weights_for(self, images: torch.Tensor, mode: str, weights, temperature: float) -> torch.Tensor | None:
        """B x (K+1) weights (adapters, keep) for the call, or None for the backbone alone."""
        if mode == "none":
            return None
        if self.bank is None or not self.names:
            raise ValueError(f"mode {mode!r} needs an adapter bank with adapters")
        if weights is None:
            if mode == "oracle":
                raise ValueError("mode 'oracle' needs the true adapter weights (weights=...)")
            if self.estimator is None:
                raise ValueError(f"mode {mode!r} needs an estimator or explicit weights")
            return self.estimator.weights(images, mode, temperature).float()
        weights = torch.as_tensor(weights, dtype=torch.float32, device=images.device)
        if weights.dim() == 1:
            weights = weights[None].expand(images.shape[0], -1)
        k = len(self.names)
        if weights.dim() != 2 or weights.shape[0] != images.shape[0] or weights.shape[1] not in (k, k + 1):
            raise ValueError(f"weights must be ({images.shape[0]}, {k}) or ({images.shape[0]}, {k + 1}) for "
                             f"{self.weight_names}, got {tuple(weights.shape)}")
        if weights.shape[1] == k:
            weights = torch.cat([weights, weights.new_zeros(weights.shape[0], 1)], dim=1)
        keep = weights[:, k:]
        if not bool(((keep >= 0) & (keep <= 1)).all()):
            raise ValueError(f"keep must be in [0, 1], got {keep.flatten().tolist()}")
        if mode == "oh":
            one_hot = torch.nn.functional.one_hot(weights[:, :k].argmax(dim=1), k).float()
            weights = torch.cat([one_hot, keep], dim=1)
        return weights

    @contextlib.contextmanager
    def _adapters(self, weights: torch.Tensor | None, mode: str):
        """Apply the adapter weights for the duration of the block (whole image or all tiles)."""
        if self.bank is None:
            yield
            return
        if weights is None:
            with self.bank.weights(None):
                yield
            return
        columns = self._to_bank_columns(weights[:, :len(self.names)]).cpu()
        if self.bank.kind.mergeable and bool((columns == columns[:1]).all()):
            # the whole batch (always so for one image) uses the same weights: fold them into the
            # base weights once, so the adapters cost nothing per pixel
            row = columns[0]
            one_hot = bool(((row == 0) | (row == 1)).all()) and float(row.sum()) == 1.0
            if one_hot:
                self.bank.merge(self.bank.names[int(row.argmax())])
            else:
                self.bank.merge_mix(row)
            try:
                yield
            finally:
                self.bank.unmerge()
            return
        with self.bank.weights(columns):
            yield

    # -- the one call ----------------------------------------------------------------------------

    def restore(self, images: torch.Tensor, mode: str = "sw", weights=None, temperature: float = 1.0,
                tile: int | None = None, max_pixels: int | None = None, overlap: int = DEFAULT_OVERLAP,
                tiling: str = "exact") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Restore B x 3 x H x W images in [0, 1]; returns (restored in [0, 1], weights used
        B x (K+1) in `weight_names` order, or None for mode "none").

        tile: tile side in pixels; max_pixels: a per-tile pixel budget the tile side is derived
        from (ignored when `tile` is given). Images that fit in one tile run whole. tiling:
        "exact" (equal to whole-image inference) or "local" (independent overlapping tiles, blended
        over `overlap` pixels; see the module docstring).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tiling not in TILINGS:
            raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                images = images.float()
                used = self._weights_for(images, mode, weights, temperature)
                side = tile_side(tile, max_pixels, overlap if tiling == "local" else 0)
                h, w = images.shape[-2:]
                with self._adapters(used, mode):
                    if side is None or (h <= side and w <= side):
                        out = self.backbone(images)
                    elif tiling == "exact":
                        out = self.backbone(images, tile=side)
                    else:
                        out = tiled_apply(self.backbone, images, side, overlap)
                out = out.clamp_(0.0, 1.0)
                if used is not None and weights is None and self.estimator is not None \
                        and self.estimator.keep_head is not None:
                    # the estimator's keep looks at the input and at what the network made of it
                    used = used.clone()
                    used[:, -1] = self.estimator.keep(images, out)[:, 0]
                if used is not None and bool((used[:, -1] > 0).any()):
                    keep = used[:, -1].view(-1, 1, 1, 1).to(out.dtype)
                    out = out.lerp_(images, keep)   # in place: a large image has no second output copy
        finally:
            for module, training in modes.items():
                module.training = training
        return out, used


def tile_side(tile: int | None, max_pixels: int | None, overlap: int = DEFAULT_OVERLAP) -> int | None:
    """The tile side: `tile` as given, or the largest multiple of 8 with side^2 <= max_pixels."""
    if tile is None and max_pixels is None:
        return None
    side = int(tile) if tile is not None else int(math.isqrt(int(max_pixels))) // SIZE_MULTIPLE * SIZE_MULTIPLE
    if side <= max(2 * overlap, SIZE_MULTIPLE - 1):
        raise ValueError(f"tile side {side} must exceed twice the overlap ({overlap} px) and be at least {SIZE_MULTIPLE}")
    return side


# ------------------------------------------------------------------------------------------------
# Reporting


def param_counts(backbone: nn.Module | None = None, bank: AdapterBank | None = None,
                 estimator: nn.Module | None = None) -> dict:
    """Parameter counts for reports: backbone (restoration weights only), seg_head, per_adapter
    {name: n}, adapters (all of them), estimator, total (= the sum of those four)."""
    if backbone is None and bank is not None:
        backbone = bank.backbone
    restoration = sum(t.numel() for t in restoration_state_dict(backbone).values()) if backbone is not None else 0
    seg = num_parameters(getattr(backbone, "seg_head", None)) if backbone is not None else 0
    per_adapter = {name: bank.num_parameters(name) for name in bank.names} if bank is not None else {}
    adapters = sum(per_adapter.values())
    est = num_parameters(estimator)
    return {"backbone": restoration, "seg_head": seg, "per_adapter": per_adapter, "adapters": adapters,
            "estimator": est, "total": restoration + seg + adapters + est}


def num_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
