"""The whole ABAIR system behind one call: estimator -> adapter weights -> backbone + adapters.

    restorer = Restorer(backbone, bank, estimator)
    restored, weights = restorer.restore(images, mode="sw")

Modes: "none" (backbone alone), "oracle" (the caller's weights), "sw" (estimator soft weights),
"oh" (estimator one-hot). Weights follow the modes contract (../shared/DESIGN.md): K adapter
weights (summing to at most one; the rest is the backbone alone) and one `keep` in [0, 1] that
blends the network's output back towards the input, `out = keep * input + (1 - keep) * network`,
so the system can leave an image as it came (do no harm). Before the keep blend, the tone lock
(models/tone.py) moves the network output's low frequencies back to the input's by the share of the
weights that names no tone-changing degradation (calibrated by the estimator's tone calibration in
its modes, when it has one) (all modes but "none"; on for systems whose estimator was trained with
`tone_lock`). In the estimator's modes keep comes from
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

Mode "pw" (pixel-wise) gives every pixel its own weights: a B x (K+1) x h x w map, from the
estimator's dense head (source "dense") or from the Phase I segmentation head's per-pixel
probabilities (source "seg": one more backbone pass), or the caller's map (the pixel-wise oracle).
LoRA's delta is linear in the weights, so the per-pixel blend is exact:
`W x + sum_k w_k(p) scale_k B_k A_k x(p)` at every pixel p, with the map resized (bilinear) to the
image and area-averaged to each level (models.adapters.base.PixelWeights). It cannot be merged, so
it runs the per-sample path. The map is kept at its own (low) resolution and resized only for the
pixels that run: a tile of local tiling resizes its own window, so no image-sized map is held.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.adapters import AdapterBank
from models.backbone import SIZE_MULTIPLE, Backbone
from models.estimator import Estimator
from models.identity import restoration_state_dict
from models.tiling import DEFAULT_OVERLAP, bilinear_rows, run_tile, tiled_apply
from models.tone import lock_tone, tone_free_share

MODES = ("sw", "oh", "oracle", "none", "pw")
TILINGS = ("exact", "local")
PW_SOURCES = ("dense", "seg")
SEG_MAP_FACTOR = 8   # the seg source's map is area-averaged over 8x8 pixels: smooth, so regions meet without seams


class Restorer(nn.Module):
    def __init__(self, backbone: Backbone, bank: AdapterBank | None = None, estimator: Estimator | None = None,
                 names: Sequence[str] | None = None, pw_source: str | None = None, tone_lock: bool | None = None):
        """`names`: the adapter each weight column stands for (the estimator's output order);
        defaults to the estimator's class names, else the bank's order. `pw_source`: where mode
        "pw" takes its map by default ("dense" or "seg"; None: dense when the estimator has a dense
        head, else seg when the backbone kept its segmentation head). `tone_lock`: keep the
        input's low frequencies by the weights' tone-free share (models/tone.py); None: as the
        estimator was trained to be served (its config's tone_lock; off without an estimator), so a
        saved system restores the same whatever code serves it."""
        super().__init__()
        self.tone_lock = bool(estimator is not None and estimator.config.tone_lock) if tone_lock is None else tone_lock
        if pw_source is not None and pw_source not in PW_SOURCES:
            raise ValueError(f"pw_source must be one of {PW_SOURCES}, got {pw_source!r}")
        self.pw_source = pw_source
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
        """B x len(names) [x H x W] -> B x len(bank.names) [x H x W] (bank order; adapters not in
        `names` get 0)."""
        if self.names == self.bank.names:
            return weights
        out = weights.new_zeros(weights.shape[0], len(self.bank), *weights.shape[2:])
        out[:, [self.bank.names.index(n) for n in self.names]] = weights
        return out

    @property
    def weight_names(self) -> list[str]:
        """The columns of the weights `restore` takes and returns: the adapters, then `keep`."""
        return [*self.names, "keep"]

    def _weights_for(self, images: torch.Tensor, mode: str, weights, temperature: float | None,
                     pw_source: str | None = None, tile: int | None = None) -> torch.Tensor | None:
        """B x (K+1) weights (adapters, keep) for the call, B x (K+1) x h x w for "pw", or None
        for the backbone alone."""
        if mode == "none":
            return None
        if self.bank is None or not self.names:
            raise ValueError(f"mode {mode!r} needs an adapter bank with adapters")
        if mode == "pw":
            return self._map_for(images, weights, temperature, pw_source, tile)
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

    # -- pixel-wise weights -----------------------------------------------------------------------

    def resolve_pw_source(self, pw_source: str | None = None) -> str:
        """The map source a "pw" call uses: the one asked for, else the Restorer's, else what the
        system has (the estimator's dense head, then the backbone's segmentation head)."""
        source = pw_source or self.pw_source
        if source is None:
            if self.estimator is not None and getattr(self.estimator, "has_dense", False):
                source = "dense"
            elif getattr(self.backbone, "seg_head", None) is not None:
                source = "seg"
            else:
                raise ValueError("mode 'pw' needs a weight map: this system has neither an estimator with a dense "
                                 "head nor a backbone that kept its segmentation head (or pass weights=...)")
        if source not in PW_SOURCES:
            raise ValueError(f"pw_source must be one of {PW_SOURCES}, got {source!r}")
        # what the source reads must be there: a call fails here, before any image runs
        if source == "dense" and not (self.estimator is not None and getattr(self.estimator, "has_dense", False)):
            raise ValueError("the system's estimator has no dense head (trained with estimator.dense: false): the dense "
                             "weight-map source needs one (the seg source reads the backbone's segmentation head)")
        if source == "seg" and getattr(self.backbone, "seg_head", None) is None:
            raise ValueError("the system's backbone has no segmentation head (dropped, or seg_classes 0; "
                             "load_system(keep_seg_head=True) keeps it): the seg weight-map source needs one "
                             "(the dense source reads the estimator's dense head)")
        if source == "seg" and not self.seg_class_names:
            raise ValueError("the system's backbone does not say which classes its segmentation head predicts "
                             "(no `classes` in its metadata): the seg weight-map source needs them")
        return source

    def _map_for(self, images: torch.Tensor, weights, temperature: float | None, pw_source: str | None,
                 tile: int | None = None) -> torch.Tensor:
        """B x (K+1) x h x w: the caller's map (K or K+1 columns, any h x w; B x (K+1) weights are a
        constant map) or the map of the pixel-wise source; keep 0 where not given."""
        b, k = images.shape[0], len(self.names)
        if weights is None:
            if self.resolve_pw_source(pw_source) == "dense":
                return self.estimator.weight_map(images, temperature).float()
            return self._seg_map(images, temperature, tile)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=images.device)
        if weights.dim() in (1, 2):
            weights = weights.reshape(-1, weights.shape[-1]).expand(b, -1)[:, :, None, None]
        if weights.dim() != 4 or weights.shape[0] not in (1, b) or weights.shape[1] not in (k, k + 1):
            raise ValueError(f"pixel-wise weights must be ({b}, {k} or {k + 1}, h, w) for {self.weight_names}, "
                             f"got {tuple(weights.shape)}")
        weights = weights.expand(b, -1, -1, -1)
        if weights.shape[1] == k:
            weights = torch.cat([weights, weights.new_zeros(b, 1, *weights.shape[2:])], dim=1)
        if not bool(((weights >= 0) & (weights <= 1)).all()):
            raise ValueError("pixel-wise weights must lie in [0, 1]")
        if bool((weights[:, :k].sum(1) > 1 + 1e-4).any()):
            raise ValueError("pixel-wise adapter weights must sum to at most one at every pixel")
        return weights

    @property
    def seg_class_names(self) -> list[str]:
        return list(getattr(self.backbone, "seg_class_names", None) or [])

    def _seg_map(self, images: torch.Tensor, temperature: float | None, tile: int | None = None) -> torch.Tensor:
        """B x (K+1) x h/8 x w/8 from the Phase I segmentation head (an extra backbone pass,
        without adapters): its per-pixel multi-label probabilities in the adapter columns of the
        classes it knows, the estimator's image-level weight in the others (degradations added
        after Phase I), scaled down where they sum above one; area-averaged over 8x8 pixels.
        resolve_pw_source has checked that the head and its class names are there."""
        classes = self.seg_class_names
        k = len(self.names)
        with self.bank.weights(None):   # exact tiling (`tile`) holds the blocks' wide maps one tile at a time
            _, seg_logits = self.backbone(images, with_seg=True, tile=tile)
        probs = F.avg_pool2d(torch.sigmoid(seg_logits.float()), SEG_MAP_FACTOR, ceil_mode=True)   # B x S x h x w
        columns = probs.new_zeros(images.shape[0], k, *probs.shape[2:])
        unseen = [i for i, n in enumerate(self.names) if n not in classes]
        for i, name in enumerate(self.names):
            if name in classes:
                columns[:, i] = probs[:, classes.index(name)]
        if unseen:
            if self.estimator is None:
                raise ValueError(f"adapters {[self.names[i] for i in unseen]} have no segmentation class and no estimator")
            image_level = self.estimator.weights(images, "sw", temperature).float()[:, :k]
            columns[:, unseen] = image_level[:, unseen, None, None]
        columns = columns / columns.sum(1, keepdim=True).clamp_min(1.0)
        return torch.cat([columns, columns.new_zeros(columns.shape[0], 1, *columns.shape[2:])], dim=1)

    def _run_pixelwise(self, images: torch.Tensor, weight_map: torch.Tensor, side: int | None,
                       tiling: str, overlap: int) -> torch.Tensor:
        """The network with per-pixel adapter weights; each run (the image, or a tile of local
        tiling) resizes its own window of the map, padded as the backbone pads the image."""
        adapter_map = self._to_bank_columns(weight_map[:, :len(self.names)])
        h, w = images.shape[-2:]

        def run(x: torch.Tensor, rows: slice, cols: slice, tile: int | None = None) -> torch.Tensor:
            window = map_window(adapter_map, (h, w), rows, cols, SIZE_MULTIPLE)
            with self.bank.weights(window):
                return self.backbone(x, tile=tile)

        everything = (slice(0, h), slice(0, w))
        if tiling == "exact" or side is None or (h <= side and w <= side):
            return run(images, *everything, tile=run_tile(h, w, side, images.device))
        return tiled_apply(lambda crop, where: run(crop, *where, tile=run_tile(*crop.shape[-2:], None, crop.device)),
                           images, side, overlap, with_window=True)

    @contextlib.contextmanager
    def without_tone_lock(self):
        """The restorer as the ONNX graphs compute it, for the duration: the network and the
        caller's keep blend, without the tone lock (a runtime applies it after the graphs)."""
        saved, self.tone_lock = self.tone_lock, False
        try:
            yield self
        finally:
            self.tone_lock = saved

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

    def restore(self, images: torch.Tensor, mode: str = "sw", weights=None, temperature: float | None = None,
                tile: int | None = None, max_pixels: int | None = None, overlap: int = DEFAULT_OVERLAP,
                tiling: str = "exact", pw_source: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Restore B x 3 x H x W images in [0, 1]; returns (restored in [0, 1], weights used
        B x (K+1) in `weight_names` order, or None for mode "none"; for mode "pw" the B x (K+1) x
        h x w map used, at its own resolution: weights_summary() gives per-image means).

        temperature: the SW softmax temperature; None, the estimator's own (the one its keep head
        was trained with: Estimator.config.temperature).

        Mode "pw": weights=None takes the map from `pw_source` (see resolve_pw_source); weights may
        be a B x K or B x (K+1) x h x w map (the pixel-wise oracle), resized to the image.

        tile: tile side in pixels; max_pixels: a per-tile pixel budget the tile side is derived
        from (ignored when `tile` is given). Images that fit in one tile run whole. tiling:
        "exact" (equal to whole-image inference) or "local" (independent overlapping tiles, blended
        over `overlap` pixels; see the module docstring).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if pw_source is not None and pw_source not in PW_SOURCES:
            raise ValueError(f"pw_source must be one of {PW_SOURCES}, got {pw_source!r}")
        if tiling not in TILINGS:
            raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                images = images.float()
                side = tile_side(tile, max_pixels, overlap if tiling == "local" else 0)
                h, w = images.shape[-2:]
                # exact tiles where the image exceeds the memory tile, and (on CPU) cache-sized ones
                # for speed: models.tiling.run_tile; local tiling's tiles each run the same way
                exact_side = run_tile(h, w, side, images.device)
                used = self._weights_for(images, mode, weights, temperature, pw_source, exact_side)
                if mode == "pw":
                    out = self._run_pixelwise(images, used, side, tiling, overlap)
                else:
                    with self._adapters(used, mode):
                        if tiling == "exact" or side is None or (h <= side and w <= side):
                            out = self.backbone(images, tile=exact_side)
                        else:
                            out = tiled_apply(lambda crop: self.backbone(crop, tile=run_tile(*crop.shape[-2:], None, crop.device)),
                                              images, side, overlap)
                out = out.clamp_(0.0, 1.0)
                estimated = weights is None and self.estimator is not None
                if used is not None and estimated and self.estimator.keep_head is not None:
                    # the estimator's keep looks at the input and at what the network made of it
                    # (image level: in "pw" the same keep at every pixel)
                    used = used.clone()
                    used[:, -1] = self.estimator.keep(images, out)[:, 0].view(-1, *([1] * (used.dim() - 2)))
                if used is not None and self.tone_lock:
                    # after keep, which judges the unlocked output (its loss counts the locked one with keep_sees_lock);
                    # the estimator's weights get its calibration of the share, the caller's the rule
                    share = tone_free_share(used, self.names)
                    lock_tone(out, images, self.estimator.tone_share(share) if estimated else share)
                if used is not None and bool((used[:, -1] > 0).any()):
                    out = out.lerp_(images, keep_for(used, (h, w)).to(out.dtype))   # in place: no second output copy
        finally:
            for module, training in modes.items():
                module.training = training
        return out, used

    # -- a release folder ------------------------------------------------------------------------

    @classmethod
    def from_release(cls, path, device: str | torch.device = "cpu", keep_seg_head: bool = False) -> "Restorer":
        """The system of a release folder (`abair export`; the format is tasks/release/bundle.py's).

        Every file config.json lists is checked against its sha256 first, and a weights file it
        does not list is refused, so what runs is what was released; the weights are safetensors
        (nothing is unpickled). The weight columns are config.json's `adapters` (then keep); mode
        pw's default map source is the release's `pw_source` (the segmentation head is kept when
        that is "seg", or with keep_seg_head). Errors are CheckpointError naming the file.
        Written here, from the models' own loaders, because models never import tasks."""
        import hashlib
        import json
        from pathlib import Path

        from models.adapters import AdapterBank, read_adapter_options
        from models.checkpoint import CheckpointError
        from models.estimator import load_estimator
        from models.identity import load_backbone

        root = Path(path)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise CheckpointError(root, "not a release folder (no config.json)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(config_path, f"not valid JSON ({exc.msg})") from None
        if not isinstance(config, dict) or config.get("format") != "abair-release" or config.get("format_version") != 1:
            raise CheckpointError(config_path, "not an abair-release config of format version 1")
        listed = config.get("files") or {}
        for relative, expected in listed.items():
            file = root / relative
            if not file.is_file():
                raise CheckpointError(file, "missing: config.json lists it")
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != expected:
                raise CheckpointError(file, "sha256 differs from config.json's: the file changed after the export")
        weights = config.get("weights") or {}
        if not weights.get("backbone"):
            raise CheckpointError(config_path, "names no backbone file (`weights.backbone`)")
        used = [weights["backbone"], *(weights.get("adapters") or {}).values(), weights.get("estimator")]
        present = sorted(p.relative_to(root).as_posix() for p in (root / "weights").rglob("*") if p.is_file())
        unlisted = [relative for relative in [*present, *filter(None, used)] if relative not in listed]
        if unlisted:
            raise CheckpointError(root / unlisted[0], "not listed in config.json: a release runs only the files it lists")

        pw_source = config.get("pw_source")
        backbone = load_backbone(root / weights["backbone"])
        if not (keep_seg_head or pw_source == "seg"):
            backbone.drop_seg_head()
        adapter_paths = [root / relative for relative in (weights.get("adapters") or {}).values()]
        bank = None
        if adapter_paths:
            kind, options = read_adapter_options(adapter_paths[0])
            bank = AdapterBank(backbone, kind, options)
            for adapter in adapter_paths:
                bank.load(adapter)
        estimator = load_estimator(root / weights["estimator"]) if weights.get("estimator") else None
        try:
            restorer = cls(backbone, bank, estimator, names=config.get("adapters"), pw_source=pw_source)
        except ValueError as exc:
            raise CheckpointError(config_path, str(exc)) from None
        return restorer.to(device).eval()


def weights_summary(used: torch.Tensor | None) -> torch.Tensor | None:
    """B x (K+1) per-image weights: the mean over the pixels of a pixel-wise map (B x (K+1) x h x w);
    image-level weights (B x (K+1)) and None pass through."""
    if used is None or used.dim() == 2:
        return used
    return used.float().mean(dim=(2, 3))


def keep_for(used: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The keep column of the weights as a B x 1 x 1 x 1 factor, or B x 1 x H x W when a map's keep
    varies over the pixels (resized to the image)."""
    keep = used[:, -1:]
    if used.dim() == 2:
        return keep.view(-1, 1, 1, 1)
    flat = keep.flatten(1)
    if bool((flat == flat[:, :1]).all()):
        return flat[:, :1].view(-1, 1, 1, 1)
    return F.interpolate(keep, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def map_window(weight_map: torch.Tensor, size: tuple[int, int], rows: slice, cols: slice,
               multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """B x C x h x w map -> its bilinear resize to the image `size` (H, W), cut to rows x cols and
    padded at the bottom/right to a multiple of `multiple` by repeating the last row and column
    (the backbone pads the pixels there too). Only the window is computed: a local tile of a huge
    image never holds the whole resized map."""
    height, width = size
    span_y, span_x = rows.stop - rows.start, cols.stop - cols.start
    ys = torch.arange(rows.start, rows.start + span_y + (-span_y % multiple)).clamp_max(rows.stop - 1)
    xs = torch.arange(cols.start, cols.start + span_x + (-span_x % multiple)).clamp_max(cols.stop - 1)
    row_matrix = bilinear_rows(height, weight_map.shape[-2], ys).to(weight_map.device, weight_map.dtype)
    col_matrix = bilinear_rows(width, weight_map.shape[-1], xs).to(weight_map.device, weight_map.dtype)
    return row_matrix @ weight_map @ col_matrix.T                           # B x C x rows x cols


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
