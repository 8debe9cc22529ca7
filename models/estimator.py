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


@dataclass(frozen=True)
class EstimatorConfig:
    num_outputs: int
    width: int = 16
    crops: int = 2
    crop_size: int = 64
    view_size: int = 128
    random_crops: bool = False
    do_no_harm: bool = False


class StatPool(nn.Module):
    """B x C x H x W -> B x 2C: the mean and the standard deviation of each channel over the
    image. The deviation is what makes texture energy (noise, JPEG ringing, the loss of it under
    blur) visible to the head; an average alone washes zero-mean high-pass responses out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


def _trunk(width: int) -> nn.Sequential:
    """3 x S x S -> 16w features (mean and std of 8w channels). The first conv keeps full resolution so
    single-pixel statistics (noise, JPEG ringing) reach the features."""
    chans = [width, 2 * width, 4 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1), nn.GELU()]
    for c_in, c_out in zip(chans, chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    layers += [StatPool()]
    return nn.Sequential(*layers)


def crop_origins(h: int, w: int, size: int, count: int) -> list[tuple[int, int]]:
    """Fixed crop positions: centre, then the four corners, then repeats."""
    bottom, right = max(h - size, 0), max(w - size, 0)
    spots = [(bottom // 2, right // 2), (0, 0), (bottom, right), (0, right), (bottom, 0)]
    return [spots[i % len(spots)] for i in range(count)]


class Estimator(nn.Module):
    def __init__(self, num_outputs: int, width: int = 16, crops: int = 2, crop_size: int = 64,
                 view_size: int = 128, random_crops: bool = False, do_no_harm: bool = False,
                 class_names: Sequence[str] | None = None):
        super().__init__()
        if num_outputs < 1:
            raise ValueError("the estimator needs at least one output")
        if class_names is not None and len(class_names) != num_outputs:
            raise ValueError(f"{len(class_names)} class names for {num_outputs} outputs")
        self.config = EstimatorConfig(num_outputs, width, crops, crop_size, view_size, random_crops, do_no_harm)
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
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        if self.keep_head is not None:
            # start by trusting the network (keep ~0.1): keep is learned from where it hurts
            nn.init.zeros_(self.keep_head[-1].weight)
            nn.init.constant_(self.keep_head[-1].bias, KEEP_INIT_LOGIT)

    @property
    def num_outputs(self) -> int:
        return self.classifier.out_features

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
        if crops.shape[-2:] != (size, size):
            # nearest keeps each pixel's value (and so its noise) instead of smoothing it away
            crops = F.interpolate(crops, size=(size, size), mode="nearest")
        return crops

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x F pooled features of both trunks."""
        b = x.shape[0]
        x = x - 0.5
        view = F.interpolate(x, size=(self.config.view_size,) * 2, mode="bilinear", antialias=True,
                             align_corners=False)                                    # B x 3 x V x V
        feats = [self.global_trunk(view)]                                            # B x 16w
        if self.local_trunk is not None:
            local = self.local_trunk(self.native_crops(x))                          # (crops*B) x 16w
            feats.append(local.view(self.config.crops, b, -1).mean(dim=0))          # B x 16w
        return torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x K adapter logits."""
        return self.classifier(self.head(self.features(x)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """B x (K+1) logits: the K adapters then `base` (B x K without do-no-harm)."""
        hidden = self.head(self.features(x))
        logits = self.classifier(hidden)
        return logits if self.base is None else torch.cat([logits, self.base(hidden)], dim=1)

    def keep_logit(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """B x 1: the keep logit for inputs `x` and the network's outputs `restored` for them."""
        return self.keep_head(torch.cat([self.features(x), self.features(restored)], dim=1))

    def keep(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """B x 1 keep in [0, 1] (0 for an estimator without do-no-harm)."""
        if self.keep_head is None:
            return x.new_zeros(x.shape[0], 1, dtype=torch.float32)
        return torch.sigmoid(self.keep_logit(x, restored).float())

    def weights(self, x: torch.Tensor, mode: str = "sw", temperature: float = 1.0,
                restored: torch.Tensor | None = None) -> torch.Tensor:
        """B x (K+1): K adapter weights then `keep` (the modes contract of ../shared/DESIGN.md).

        "sw": softmax(logits / T) over the adapters and `base`, the adapter part (summing to at most
        one); "oh": one-hot of the argmax, all zeros when `base` wins (the backbone alone). keep
        needs what the network made of `x` with these weights (`restored`); without it, or without
        do-no-harm, the keep column is 0 (the Restorer fills it in after the network has run)."""
        if mode not in MODES:
            raise ValueError(f"estimator mode must be one of {MODES}, got {mode!r}")
        logits = self.logits(x)
        k = self.num_outputs
        if mode == "oh":
            adapters = F.one_hot(logits.argmax(dim=1), logits.shape[1]).float()[:, :k]
        else:
            if temperature <= 0:
                raise ValueError("temperature must be > 0")
            adapters = torch.softmax(logits.float() / temperature, dim=1)[:, :k]
        keep = self.keep(x, restored) if restored is not None else adapters.new_zeros(adapters.shape[0], 1)
        return torch.cat([adapters, keep], dim=1)

    @torch.no_grad()
    def add_output(self, name: str | None = None) -> int:
        """Grow K -> K+1 (a new degradation); the old outputs' weights are copied exactly.
        Returns the new output's index."""
        old = self.classifier
        new = nn.Linear(old.in_features, old.out_features + 1).to(old.weight.device, old.weight.dtype)
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
        self.classifier = new
        self.config = dataclasses.replace(self.config, num_outputs=new.out_features)
        if self.class_names is not None:
            self.class_names.append(name if name is not None else f"class{new.out_features - 1}")
        return new.out_features - 1


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
        model = build_estimator(config, names)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid estimator config ({exc})") from None
    expected = model.state_dict()
    check_tensors(expected, tensors, path)
    model.load_state_dict(tensors)
    return model.to(device)
