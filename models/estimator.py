"""Degradation estimator (ABAIR Phase III): one weight per adapter from a look at the input.

Two small CNN trunks. One sees the whole image downscaled to a fixed view (antialiased), which
shows global cues: haze, low light, rain streaks, blur. Downscaling averages pixel noise and JPEG
blocks away, so the other trunk sees a few crops at native resolution (centre, then corners;
random positions while training if `random_crops`). Pooled features of both go through an MLP to
K logits. Input brightness is kept (no normalisation layers), since low light is about it.

Do no harm (../shared/DESIGN.md, "Modes"): with `do_no_harm`, two more outputs. A `base` logit
joins the K adapter logits in the softmax, so the adapter weights sum to less than one (the rest is
the backbone alone); a clean or barely degraded image gets its weight on `base`. A keep head gives
`keep` in [0, 1], the share of the input blended back into the output:
`out = keep * input + (1 - keep) * network(input)`. It looks at the input *and* at what the network
made of it (a small MLP on the pooled features of both): whether a restoration helps shows in the
change it makes (a naturally soft photo sharpened into halos, a dim one brightened), which the
input alone cannot say. Estimators saved before this existed load with neither (keep 0, adapter
weights summing to one), as they were trained.

Tone calibration (`tone_calibration`, with `tone_lock`): the tone lock's share (models/tone.py) is
read off the adapter weights, one minus the weights of tone-changing experts; those are shares of
experts, not the chance that a photo needs no tone change (a dark photo with a little noise weight
lost a little of its brightening, a noisy one with a little low-light weight kept a little of a
brightening it should not have). Two numbers learned with keep map it monotonically,
`sigmoid(scale * logit(share) + bias)` (identity at the start, scale 1 and bias 0), on what the
served result comes to (tasks/train/estimator.py). Two numbers, not a head on the features: a head
reading 48 px windows learned to call noisy photos dark on the `real` run (README "Tone lock").
Estimators saved before it load without it.

Looking at a photo at the scale it learned (`window`, `keep_window`): the estimator trains on
samples of one size (the shard crops, 96-128 px; the keep head on the keep step's central crops),
while photos are several times larger, and downscaling a whole photo into the view makes its noise
fainter, its rain streaks thinner and its texture finer than anything seen in training (on the
`real` profile: Gaussian noise called rain, real camera noise called blur). With `window` set, the
image-level features are those of a grid of `windows` windows of that side, each looked at exactly
as a training sample of that size (view and native crops), averaged; `keep_window` does the same
for the keep head's features of the input and of the network's output. An image no larger than the
window is looked at whole, as before. Estimators saved before this load with neither (the whole
image, as they were scored).

Dense head (`dense`, for the pixel-wise mode `pw`): spatial logits at `view_size / DENSE_STRIDE`,
added to the image-level logits, so a spatial term that is the same at every pixel and for every
output gives exactly the image-level weights. Two terms (DenseDecoder): the image-level head
applied to each cell of the global trunk's last map (its judgement of that part of the view) minus
its judgement of the whole, times a learned gain per output; and a light decoder over the global
trunk's maps after each stride. `weight_map` is the per-pixel softmax over the adapters and `base`.
Both read the downscaled view only: a degradation that the downscaling erases (fine noise on a
large photo) is placed by the image-level term alone, uniformly over the image. Estimators without
it load as they were (no dense tensors).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import (CheckpointError, check_tensors, merge_metadata, metadata_json, read_checkpoint,
                               save_atomic)

ESTIMATOR_FORMAT = "abair-estimator"
MODES = ("sw", "oh")
KEEP_INIT_LOGIT = -2.0
TONE_EPS = 1e-4   # ToneCalibration's clamp: logit(share) stays within +-9.2
DENSE_STRIDE = 2  # the dense map is view_size / 2 on a side (32 x 32 for the default 64 px view)
# The cell logits' starting gain: trust the head's judgement of each cell as much as of the whole view.
# Chosen between 0 and 1 on the default system's validation shards (the head of a plain estimator,
# no dense training): per-pixel accuracy 0.391 at gain 0 (the image-level weights everywhere), 0.467 at 1.
CELL_GAIN_INIT = 1.0


@dataclass(frozen=True)
class EstimatorConfig:
    num_outputs: int
    width: int = 16
    crops: int = 2
    crop_size: int = 64
    view_size: int = 128
    random_crops: bool = False
    do_no_harm: bool = False
    dense: bool = False
    window: int | None = None
    keep_window: int | None = None
    windows: int = 9
    tone_lock: bool = False   # the Restorer keeps the input's low frequencies by the tone-free share (models/tone.py)
    tone_calibration: bool = False   # that share mapped by sigmoid(scale * logit(share) + bias), learned with keep
    temperature: float = 1.0  # the SW softmax temperature it was trained (its keep step) with, and is served with


class StatPool(nn.Module):
    """B x C x H x W -> B x 2C: the mean and the standard deviation of each channel over the
    image. The deviation is what makes texture energy (noise, JPEG ringing, the loss of it under
    blur) visible to the head; an average alone washes zero-mean high-pass responses out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


def _trunk_channels(width: int) -> list[int]:
    """Channels of the trunk's maps, at strides 1, 2, 4, 8 and 16."""
    return [width, 2 * width, 4 * width, 4 * width, 8 * width]


def _trunk(width: int) -> nn.Sequential:
    """3 x S x S -> 16w features (mean and std of 8w channels). The first conv keeps full resolution so
    single-pixel statistics (noise, JPEG ringing) reach the features."""
    chans = _trunk_channels(width)
    layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1), nn.GELU()]
    for c_in, c_out in zip(chans, chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    layers += [StatPool()]
    return nn.Sequential(*layers)


def trunk_maps(trunk: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pooled features, the maps after each conv's activation, finest first): the trunk run layer
    by layer, the same computation as `trunk(x)`."""
    maps = []
    for layer in trunk:
        x = layer(x)
        if isinstance(layer, nn.GELU):
            maps.append(x)
    return x, maps


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area average to a coarser size (every pixel counts), bilinear to a finer one."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DenseDecoder(nn.Module):
    """B x outputs x h x w spatial logits from two terms:
    - `gain` (one per output) x (cell logits - image logits): the cell logits are the image-level
      head applied to each cell of the trunk's last map (Estimator.cell_logits), already trained
      to tell degradations apart, so the map can follow them where they differ over the image;
    - a light decoder over the trunk's maps: each projected to `hidden` channels and brought to
      h x w (a feature pyramid, summed), one 3x3 conv to mix neighbours, a 1x1 conv to the outputs.
    19w x hidden + 9 hidden^2 weights (+ the output's and the gains): ~4k for hidden = w = 12.
    The output conv starts at zero, the gains at CELL_GAIN_INIT: with both at zero, the map is the
    image-level weights everywhere."""

    def __init__(self, channels: Sequence[int], hidden: int, outputs: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in channels)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, outputs, 1)
        self.gain = nn.Parameter(torch.full((outputs,), CELL_GAIN_INIT))
        he_init(self)
        # the decoder starts silent: the map departs from the cell logits where it learns to
        nn.init.zeros_(self.out.weight)

    def forward(self, maps: Sequence[torch.Tensor], cell_contrast: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """maps: the trunk's maps, finest first; cell_contrast: B x outputs x h' x w' cell logits
        minus the image logits."""
        # resizing and a 1x1 conv commute (both linear, resampling weights sum to one): a map finer
        # than the output is pooled first, a coarser one projected first, whichever has fewer pixels
        pyramid = sum(lateral(resize_map(m, size)) if m.shape[-2] > size[0] else resize_map(lateral(m), size)
                      for lateral, m in zip(self.laterals, maps))
        contrast = self.gain[None, :, None, None] * resize_map(cell_contrast, size)
        return contrast + self.out(F.gelu(self.mix(F.gelu(pyramid))))


class ToneCalibration(nn.Module):
    """share -> sigmoid(scale * logit(share) + bias): monotone, the identity at scale 1 and bias 0
    (the share clamped to [TONE_EPS, 1 - TONE_EPS] first, so 0 and 1 stay finite)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, share: torch.Tensor) -> torch.Tensor:
        logit = torch.logit(share.float().clamp(TONE_EPS, 1 - TONE_EPS))
        return torch.sigmoid(self.scale * logit + self.bias)


def he_init(model: nn.Module) -> nn.Module:
    """He-normal weights and zero biases for every conv and linear layer of `model`."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def crop_origins(h: int, w: int, size: int, count: int) -> list[tuple[int, int]]:
    """Fixed crop positions: centre, then the four corners, then repeats."""
    # sym_max: the same ints in eager, and no guard on the size when traced (ONNX export)
    bottom, right = torch.sym_max(h - size, 0), torch.sym_max(w - size, 0)
    spots = [(bottom // 2, right // 2), (0, 0), (bottom, right), (0, right), (bottom, 0)]
    return [spots[i % len(spots)] for i in range(count)]


def grid_origins(h: int, w: int, size: int, count: int) -> list[tuple[int, int]]:
    """`count` window positions on an even grid (rows x cols as square as `count` allows, the
    extra rows or columns along the image's longer side), first and last flush with the edges."""
    short = 1
    while (short + 1) ** 2 <= count:
        short += 1
    long = count // short
    # square grids need no comparison of the sides (none in a traced graph: it would fix them)
    rows, cols = (short, short) if long == short else ((long, short) if h > w else (short, long))
    bottom, right = torch.sym_max(h - size, 0), torch.sym_max(w - size, 0)

    def spread(extent, n: int) -> list:
        return [extent // 2] if n == 1 else [extent * i // (n - 1) for i in range(n)]

    return [(y, x) for y in spread(bottom, rows) for x in spread(right, cols)]


class Estimator(nn.Module):
    def __init__(self, num_outputs: int, width: int = 16, crops: int = 2, crop_size: int = 64,
                 view_size: int = 128, random_crops: bool = False, do_no_harm: bool = False,
                 dense: bool = False, window: int | None = None, keep_window: int | None = None,
                 windows: int = 9, tone_lock: bool = False, tone_calibration: bool = False,
                 temperature: float = 1.0, class_names: Sequence[str] | None = None):
        super().__init__()
        if num_outputs < 1:
            raise ValueError("the estimator needs at least one output")
        if class_names is not None and len(class_names) != num_outputs:
            raise ValueError(f"{len(class_names)} class names for {num_outputs} outputs")
        if dense and view_size < DENSE_STRIDE:
            raise ValueError(f"a dense head needs view_size >= {DENSE_STRIDE}, got {view_size}")
        for name, side in (("window", window), ("keep_window", keep_window)):
            if side is not None and side < 1:
                raise ValueError(f"{name} must be a positive number of pixels or None, got {side}")
        if windows < 1:
            raise ValueError(f"windows must be >= 1, got {windows}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tone_calibration and not (tone_lock and do_no_harm):
            raise ValueError("a tone calibration maps the tone lock's share and is learned with keep: it needs "
                             "tone_lock and do_no_harm")
        self.config = EstimatorConfig(num_outputs, width, crops, crop_size, view_size, random_crops, do_no_harm, dense,
                                      window, keep_window, windows, bool(tone_lock), bool(tone_calibration),
                                      float(temperature))
        self.class_names = list(class_names) if class_names is not None else None
        self.global_trunk = _trunk(width)
        self.local_trunk = _trunk(width) if crops > 0 else None
        features = 16 * width * (2 if crops > 0 else 1)  # mean and std of 8w channels per trunk
        self.head = nn.Sequential(nn.Linear(features, 8 * width), nn.GELU())
        self.classifier = nn.Linear(8 * width, num_outputs)
        # do no harm: the backbone-alone logit, and keep from the pooled features
        self.base = nn.Linear(8 * width, 1) if do_no_harm else None
        self.keep_head = nn.Sequential(nn.Linear(2 * features, 4 * width), nn.GELU(), nn.Linear(4 * width, 1)) \
            if do_no_harm else None
        # He initialisation: with PyTorch's default (fan-in uniform, a=sqrt(5)) the activations
        # shrink ~4x per layer without normalisation layers, and the pooled features start at
        # 1e-4, where noise and texture statistics are too faint to learn from.
        he_init(self)
        if self.keep_head is not None:
            # start by trusting the network (keep ~0.1): keep is learned from where it hurts
            nn.init.zeros_(self.keep_head[-1].weight)
            nn.init.constant_(self.keep_head[-1].bias, KEEP_INIT_LOGIT)
        self.tone_calibration = ToneCalibration() if tone_calibration else None
        # dense: spatial logits for the K adapters (and base), added to the image-level ones. Drawn
        # from a forked RNG, so the rest of the estimator (and the training after it) gets the
        # same random numbers with or without it: a dense estimator's image-level part is the
        # plain estimator's, seed for seed.
        self.dense_head = None
        if dense:
            with torch.random.fork_rng(devices=[]):
                self.dense_head = DenseDecoder(_trunk_channels(width), width, num_outputs + int(do_no_harm))

    @property
    def num_outputs(self) -> int:
        return self.classifier.out_features

    @property
    def has_dense(self) -> bool:
        return self.dense_head is not None

    @property
    def map_size(self) -> tuple[int, int]:
        """h x w of the dense map."""
        side = self.config.view_size // DENSE_STRIDE
        return side, side

    def native_crops(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> (crops*B) x 3 x s x s at native resolution (nearest-upscaled if smaller)."""
        b, _, h, w = x.shape
        size, count = self.config.crop_size, self.config.crops
        if self.training and self.config.random_crops:
            ys = torch.randint(0, max(h - size, 0) + 1, (count,)).tolist()
            xs = torch.randint(0, max(w - size, 0) + 1, (count,)).tolist()
            origins = list(zip(ys, xs))
        else:
            origins = crop_origins(h, w, size, count)
        crops = torch.cat([x[:, :, y:y + size, x0:x0 + size] for y, x0 in origins], dim=0)
        # a traced graph (ONNX export) resizes always: whether the image is smaller than a crop is
        # known only when it runs, and nearest to the same size is the identity
        if torch.compiler.is_exporting() or crops.shape[-2:] != (size, size):
            # nearest keeps each pixel's value (and so its noise) instead of smoothing it away
            crops = F.interpolate(crops, size=(size, size), mode="nearest")
        return crops

    def _view(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x - 0.5 (B x 3 x H x W) -> (B x 16w pooled features of the global trunk, its maps)."""
        view = F.interpolate(x, size=(self.config.view_size,) * 2, mode="bilinear", antialias=True,
                             align_corners=False)                                    # B x 3 x V x V
        return trunk_maps(self.global_trunk, view)

    def _look(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """B x 3 x H x W in [0, 1] -> (B x F pooled features of both trunks, the global trunk's maps)."""
        b = x.shape[0]
        x = x - 0.5
        pooled, maps = self._view(x)                                                 # B x 16w
        feats = [pooled]
        if self.local_trunk is not None:
            local = self.local_trunk(self.native_crops(x))                          # (crops*B) x 16w
            feats.append(local.view(self.config.crops, b, -1).mean(dim=0))          # B x 16w
        return torch.cat(feats, dim=1), maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x F pooled features of both trunks, at the config's `window`."""
        return self.features_at(x, self.config.window)

    def features_at(self, x: torch.Tensor, window: int | None) -> torch.Tensor:
        """The pooled features of the whole image (`window` None), or their mean over the config's
        `windows` grid windows of side `window`, each looked at as a training sample of that size."""
        h, w = x.shape[-2:]
        # a training sample (or anything no larger) is one window: looked at whole, as in training
        if window is None or (not torch.compiler.is_exporting() and h <= window and w <= window):
            return self._look(x)[0]
        origins = grid_origins(h, w, window, self.config.windows)
        windows = torch.cat([x[:, :, y:y + window, x0:x0 + window] for y, x0 in origins], dim=0)
        return self._look(windows)[0].view(len(origins), x.shape[0], -1).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x K adapter logits."""
        return self.classifier(self.head(self.features(x)))

    def _image_logits(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.head(features)
        logits = self.classifier(hidden)
        return logits if self.base is None else torch.cat([logits, self.base(hidden)], dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """B x (K+1) logits: the K adapters then `base` (B x K without do-no-harm)."""
        return self._image_logits(self.features(x))

    def cell_logits(self, last_map: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """B x C x h' x w': the image-level head applied to each cell of the global trunk's last
        map (B x 8w x h' x w') as if that cell were the whole view (its features as the pooled mean,
        no spread); the native crops' pooled features (the rest of `features`) stay image-level."""
        b, c, h, w = last_map.shape
        cells = last_map.permute(0, 2, 3, 1).reshape(b * h * w, c)
        local = features[:, 2 * c:].repeat_interleave(h * w, dim=0)
        logits = self._image_logits(torch.cat([cells, torch.zeros_like(cells), local], dim=1))
        return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def logits_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x C image-level logits, B x C x h x w per-pixel logits) from one look at `x`; C = K+1
        with do-no-harm (the adapters then `base`), else K. Per pixel: the image-level logits plus
        the dense head's spatial term. The per-pixel logits' gradient stops at the dense head: a
        per-pixel loss trains the dense head alone, and the image-level estimator learns what it
        learns without one. (On the default system, a first head whose loss reached the trunk left
        an image-level accuracy of 0.575 and a clean-image base share of 0.06, against 0.625 and
        0.31 without a dense head.)"""
        if self.dense_head is None:
            raise ValueError("this estimator has no dense head (it was trained with estimator.dense: false)")
        if self.config.window is None:
            features, maps = self._look(x)
        else:
            # the map needs the whole image in the view; the image-level weights look at windows
            features, maps = self.features(x), self._view(x - 0.5)[1]
        image = self._image_logits(features)
        with torch.no_grad():
            contrast = self.cell_logits(maps[-1], features) - image[:, :, None, None]
        spatial = self.dense_head([m.detach() for m in maps], contrast, self.map_size)
        return image, image.detach()[:, :, None, None] + spatial

    def weight_map(self, x: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """B x (K+1) x h x w (h x w = map_size): per pixel the K adapter weights then a zero `keep`
        column (the Restorer fills keep in). The adapter weights are the per-pixel softmax over the
        adapters and `base`, restricted to the adapters (summing to at most one); over the adapters
        alone without do-no-harm."""
        _, pixels = self.logits_and_map(x)
        return self.map_from_logits(pixels, temperature)

    def map_from_logits(self, pixels: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """weight_map from the per-pixel logits of logits_and_map (an exported graph computes both
        outputs from one look at the image). temperature None: the estimator's own (config)."""
        temperature = self.softmax_temperature(temperature)
        b, c, h, w = pixels.shape
        # the softmax runs on one row per pixel, the layout `weights` uses, so that a map whose
        # spatial term is zero reproduces the image-level weights bit for bit
        rows = pixels.float().permute(0, 2, 3, 1).reshape(-1, c)
        probabilities = torch.softmax(rows / temperature, dim=1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        adapters = probabilities[:, :self.num_outputs]
        return torch.cat([adapters, adapters.new_zeros(b, 1, h, w)], dim=1).contiguous()

    def keep_features(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """B x 2F: what the keep head reads, the features of the inputs `x` and of the
        network's outputs `restored` for them (in keep windows when `keep_window` is set)."""
        window = self.config.keep_window
        return torch.cat([self.features_at(x, window), self.features_at(restored, window)], dim=1)

    def keep_logit(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """B x 1: the keep logit for inputs `x` and the network's outputs `restored` for them."""
        return self.keep_head(self.keep_features(x, restored))

    def keep(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """B x 1 keep in [0, 1] (0 for an estimator without do-no-harm)."""
        if self.keep_head is None:
            return x.new_zeros(x.shape[0], 1, dtype=torch.float32)
        return torch.sigmoid(self.keep_logit(x, restored).float())

    def tone_share(self, rule_share: torch.Tensor) -> torch.Tensor:
        """The tone lock's share from the one read off the weights (models/tone.tone_free_share, any
        shape): calibrated with a tone calibration, as it is without."""
        return rule_share if self.tone_calibration is None else self.tone_calibration(rule_share)

    def softmax_temperature(self, temperature: float | None = None) -> float:
        """The SW temperature of a call: `temperature`, or None for the estimator's own (the one its
        keep head was trained with, config.temperature); ValueError unless > 0."""
        temperature = self.config.temperature if temperature is None else temperature
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        return temperature

    def weights(self, x: torch.Tensor, mode: str = "sw", temperature: float | None = None,
                restored: torch.Tensor | None = None) -> torch.Tensor:
        """B x (K+1): K adapter weights then `keep` (the modes contract of ../shared/DESIGN.md).

        "sw": softmax(logits / T) over the adapters and `base`, the adapter part (summing to at most
        one; T: softmax_temperature(temperature)); "oh": one-hot of the argmax, all zeros when `base`
        wins (the backbone alone). keep needs what the network made of `x` with these weights
        (`restored`); without it, or without do-no-harm, the keep column is 0 (the Restorer fills it
        in after the network has run)."""
        if mode not in MODES:
            raise ValueError(f"estimator mode must be one of {MODES}, got {mode!r}")
        weights = self.weights_from_logits(self.logits(x), mode, temperature)
        if restored is not None:
            weights = torch.cat([weights[:, :-1], self.keep(x, restored)], dim=1)
        return weights

    def weights_from_logits(self, logits: torch.Tensor, mode: str = "sw", temperature: float | None = None) -> torch.Tensor:
        """B x (K+1) weights (keep 0) from the B x C logits of `logits` (an exported graph computes
        them once for several outputs)."""
        k = self.num_outputs
        if mode == "oh":
            adapters = F.one_hot(logits.argmax(dim=1), logits.shape[1]).float()[:, :k]
        else:
            adapters = torch.softmax(logits.float() / self.softmax_temperature(temperature), dim=1)[:, :k]
        return torch.cat([adapters, adapters.new_zeros(adapters.shape[0], 1)], dim=1)

    @torch.no_grad()
    def add_output(self, name: str | None = None) -> int:
        """Grow K -> K+1 (a new degradation); the old outputs' weights are copied exactly.
        Returns the new output's index."""
        old = self.classifier
        new = nn.Linear(old.in_features, old.out_features + 1).to(old.weight.device, old.weight.dtype)
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
        self.classifier = new
        if self.dense_head is not None:
            self.dense_head.out = grown_dense_output(self.dense_head.out, old.out_features)
            gain = self.dense_head.gain.detach()
            self.dense_head.gain = nn.Parameter(torch.cat([gain[:old.out_features], gain.new_zeros(1),
                                                           gain[old.out_features:]]))
        self.config = dataclasses.replace(self.config, num_outputs=new.out_features)
        if self.class_names is not None:
            self.class_names.append(name if name is not None else f"class{new.out_features - 1}")
        return new.out_features - 1


@torch.no_grad()
def grown_dense_output(old: nn.Conv2d, adapters: int) -> nn.Conv2d:
    """The dense head's 1x1 output conv with one more adapter channel, inserted after the `adapters`
    old ones (before `base`, if any); old channels copied exactly, the new one zero (its pixels start
    at the image-level logit)."""
    new = nn.Conv2d(old.in_channels, old.out_channels + 1, 1).to(old.weight.device, old.weight.dtype)
    new.weight.zero_()
    new.bias.zero_()
    new.weight[:adapters].copy_(old.weight[:adapters])
    new.bias[:adapters].copy_(old.bias[:adapters])
    new.weight[adapters + 1:].copy_(old.weight[adapters:])
    new.bias[adapters + 1:].copy_(old.bias[adapters:])
    return new


def build_estimator(config: EstimatorConfig | Mapping[str, Any], class_names: Sequence[str] | None = None) -> Estimator:
    values = dataclasses.asdict(config) if isinstance(config, EstimatorConfig) else dict(config)
    return Estimator(class_names=class_names, **values)


def save_estimator(estimator: Estimator, path: str | os.PathLike,
                   extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """safetensors with metadata: format, config (JSON), class_names (JSON list or null). Atomic."""
    reserved = {"format": ESTIMATOR_FORMAT,
                "config": json.dumps(dataclasses.asdict(estimator.config), sort_keys=True),
                "class_names": json.dumps(estimator.class_names)}
    return save_atomic(estimator.state_dict(), path, merge_metadata(reserved, extra_metadata))


def load_estimator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Estimator:
    """The estimator stored at `path`, with its class names; CheckpointError naming the file otherwise."""
    tensors, metadata = read_checkpoint(path, ESTIMATOR_FORMAT)
    config = metadata_json(path, metadata, "config")
    names = metadata_json(path, metadata, "class_names") if "class_names" in metadata else None
    try:
        if isinstance(config, dict) and "temperature" not in config and "temperature" in metadata:
            config["temperature"] = float(metadata["temperature"])   # written before the config held it
        model = build_estimator(config, names)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid estimator config ({exc})") from None
    expected = model.state_dict()
    check_tensors(expected, tensors, path)
    model.load_state_dict(tensors)
    return model.to(device)
