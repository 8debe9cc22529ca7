"""What an adapter kind is, and the registry of kinds.

A kind is a layer class that takes the place of a target module of the backbone (wrapping it, or
running beside it) and holds any number of named adapters, registered under a name:

    @register_kind("lora", default_targets=("attn.qkv", ...), configurable_targets=True,
                   matched_options=("rank", "targets"))
    class LoRALayer(MergeableLayer): ...

The bank (models/adapters/bank.py) finds the targets by module name, puts one layer in place of
each, and talks to the layers through AdapterLayer only; it never asks which kind it holds.
Every adapter file stores the same options (kind, rank, alpha, hidden, targets: the file format);
`matched_options` are those a file must share with a bank to load into it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# The backbone's levels: the map at the padded input's size, then after each of three 2x downsamplings.
LEVEL_FACTORS = (1, 2, 4, 8)


class PixelWeights:
    """Per-pixel adapter weights for one forward pass: a B x K x H x W map at the resolution the
    backbone runs at (its padded input), and the same map area-averaged to each coarser level.

    LoRA's delta is linear in the weights, so weighting it per pixel is exact: at pixel p of a
    level, sum_k w_k(p) * scale_k * B_k A_k x(p). A layer asks for the map at its input's size
    (`at`); exact tiling tells a layer which window of its level it runs on (AdapterLayer.window).

    `traced`: for a graph traced with symbolic sizes (torch.export, ONNX): the level is found
    among the static factors LEVEL_FACTORS by what the shapes alone prove (no size-keyed cache,
    no guard on the sizes' values), and the memory format is left to the graph.
    """

    def __init__(self, weight_map: torch.Tensor, traced: bool = False):
        if weight_map.dim() != 4:
            raise ValueError(f"a weight map is B x K x H x W, got {tuple(weight_map.shape)}")
        self.full = weight_map
        self.traced = traced
        self._levels: dict[tuple, torch.Tensor] = {} if traced else {tuple(weight_map.shape[-2:]): weight_map}
        self._by_factor: dict[int, torch.Tensor] = {1: weight_map}   # traced: levels by their static factor

    @property
    def shape(self) -> torch.Size:
        return self.full.shape

    def at(self, size: Sequence[int], channels_last: bool = False) -> torch.Tensor:
        """B x K x h x w: the map area-averaged to a level of size (h, w), which must divide the
        map's own size by the same integer factor on both sides; `channels_last`: in that memory
        format (for layers whose activations are channels-last: mixing formats in one
        elementwise op makes it several times slower on CPU)."""
        if self.traced:
            return self._traced_level(size)
        size = (int(size[0]), int(size[1]))
        if channels_last:
            key = (*size, "channels_last")
            if key not in self._levels:
                self._levels[key] = self.at(size).contiguous(memory_format=torch.channels_last)
            return self._levels[key]
        level = self._levels.get(size)
        if level is None:
            height, width = self.full.shape[-2:]
            factor = height // size[0]
            if factor < 1 or size[0] * factor != height or size[1] * factor != width:
                raise ValueError(f"a weight map of {height}x{width} has no level of {size[0]}x{size[1]}")
            level = self._levels[size] = F.avg_pool2d(self.full, factor)
        return level

    def _traced_level(self, size: Sequence) -> torch.Tensor:
        # sizes may be symbolic: the level is the one whose shape expressions provably equal the
        # layer's (comparing values would pin the graph to the traced size)
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        for factor in LEVEL_FACTORS:
            if factor not in self._by_factor:
                self._by_factor[factor] = F.avg_pool2d(self.full, factor)
            level = self._by_factor[factor]
            if statically_known_true(level.shape[-2] == size[0]) and statically_known_true(level.shape[-1] == size[1]):
                return level
        height, width = self.full.shape[-2:]
        raise ValueError(f"a traced weight map of {height}x{width} has no level of {size[0]}x{size[1]} "
                         f"among the factors {LEVEL_FACTORS}")

    def columns(self, index: Sequence[int]) -> "PixelWeights":
        return PixelWeights(self.full[:, list(index)], self.traced)

    def to(self, device) -> "PixelWeights":
        return self if self.full.device == torch.device(device) else PixelWeights(self.full.to(device), self.traced)


@dataclass(frozen=True)
class AdapterOptions:
    """How the adapters of a bank are built; each kind uses those it needs. Read into these types
    once, from params (from_params) or from an adapter file's metadata (from_metadata)."""
    rank: int = 4
    alpha: float = 4.0                        # LoRA's scale is alpha / rank
    hidden: int = 8                           # AdaptIR's hidden width
    targets: tuple[str, ...] | None = None    # module names, matched by suffix; None: the kind's own

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(f"adapter targets are a list of module names, got the string {self.targets!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))

    @classmethod
    def from_params(cls, section: Mapping[str, Any]) -> "AdapterOptions":
        """From params' `adapters` section (or one job's settings); absent keys keep the defaults."""
        return cls(**{field.name: section[field.name] for field in dataclasses.fields(cls) if field.name in section})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "AdapterOptions":
        """From an adapter file's metadata; KeyError or ValueError when an entry is absent or malformed."""
        return cls(rank=metadata["rank"], alpha=metadata["alpha"], hidden=metadata["hidden"],
                   targets=json.loads(metadata["targets"]))

    def metadata(self) -> dict[str, str]:
        """The adapter file's entries for these options (from_metadata reads them back)."""
        return {"rank": str(self.rank), "alpha": repr(self.alpha), "hidden": str(self.hidden),
                "targets": json.dumps(list(self.targets or ()))}


class AdapterLayer(nn.Module):
    """A target module of the backbone (`base_layer`) and the named adapters that modify it:
    base_layer(x) + adapter_delta(x), where the delta is the per-sample weighted sum of the
    active adapters' outputs (None when none is active, so the layer is exactly its base).

    A kind implements adapter_names, add_adapter, remove_adapter, adapter_parameters and
    adapter_delta; the weights come from set_weights, which the bank calls on every layer.
    """

    wraps_base_layer = True  # models.identity looks through to base_layer (fingerprint, state dict)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.adapter_weights: torch.Tensor | PixelWeights | None = None   # B x len(active_adapters) [x H x W]
        self.active_adapters: tuple[str, ...] = ()
        # set by exact tiling while the layer runs on part of its level: ((level h, w), index of that part)
        self.window: tuple[tuple[int, int], tuple] | None = None

    @property
    def per_pixel(self) -> bool:
        return isinstance(self.adapter_weights, PixelWeights)

    def pixel_weights(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """B x K x h x w: the per-pixel weights at the pixels of `x` (its level, or the window of
        it that exact tiling runs), in channels-last memory format if asked."""
        if self.window is None:
            return self.adapter_weights.at(x.shape[-2:], channels_last)
        level, where = self.window
        return self.adapter_weights.at(level, channels_last)[where]

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def add_adapter(self, name: str, *, rank: int = 4, alpha: float = 4.0, hidden: int = 8) -> None:
        """A new adapter that changes nothing until trained; kinds take the options they use."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def check_new(self, name: str) -> None:
        """Every kind's add_adapter starts here: one adapter per name on a layer."""
        if name in self.adapter_names:
            raise ValueError(f"adapter {name!r} already exists on this layer")

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """One adapter's tensors under keys relative to this layer (the keys of adapter files)."""
        raise NotImplementedError

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        delta = self.adapter_delta(x)
        return out if delta is None else out + delta.to(out.dtype)

    def set_weights(self, weights: torch.Tensor | PixelWeights | None, names: Sequence[str] | None = None) -> None:
        """Per-sample weights (B x len(names); B may be 1 to share them), per-pixel weights
        (PixelWeights, B x len(names) x H x W), or None for the base layer.

        `names` (default: all adapters in insertion order) says which adapter each column is.
        """
        if weights is None:
            self.adapter_weights, self.active_adapters = None, ()
            return
        names = tuple(self.adapter_names if names is None else names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise KeyError(f"no adapter named {unknown} on this layer")
        dims = 4 if isinstance(weights, PixelWeights) else 2
        if len(weights.shape) != dims or weights.shape[1] != len(names):
            raise ValueError(f"weights must be (batch, {len(names)}{', H, W' if dims == 4 else ''}), got {tuple(weights.shape)}")
        self.adapter_weights, self.active_adapters = weights, names

    def original_base_tensors(self) -> dict[str, torch.Tensor]:
        """The base layer's own tensors as they were before any merge (none: this kind never merges)."""
        return {}


class MergeableLayer(AdapterLayer):
    """A kind whose delta is linear in the base layer's input, so one adapter or one blend shared
    by the batch folds into the base weights (zero-overhead inference). While merged the layer is
    its merged base layer: per-sample weights are ignored. unmerge() restores the original
    tensors bit for bit (original_base_tensors() returns them meanwhile)."""

    merged_adapter: str | None
    # set by AdapterBank.set_weights(fold=True): per-sample weights (B x K, row 0 shared by the
    # batch) are folded into the base weights inside the forward pass, as tensors: merge_mix's
    # zero-overhead blend in a traced graph whose weights are an input
    fold_weights: bool = False

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_weights and self.adapter_weights is not None and self.active_adapters \
                and getattr(self, "merged_adapter", None) is None:
            return self.folded_forward(x)
        return super().forward(x)

    def merge(self, name: str) -> None:
        raise NotImplementedError

    def merge_mix(self, mix: Mapping[str, float], label: str | None = None) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class AdapterKind:
    name: str
    layer: type[AdapterLayer]         # layer(target module) takes the target's place in the backbone
    default_targets: tuple[str, ...]
    configurable_targets: bool        # whether the `targets` option may replace default_targets
    matched_options: tuple[str, ...]  # AdapterOptions fields a file must share with the bank

    @property
    def mergeable(self) -> bool:
        return issubclass(self.layer, MergeableLayer)

    def targets(self, options: AdapterOptions) -> tuple[str, ...]:
        if self.configurable_targets and options.targets is not None:
            return options.targets
        return self.default_targets


_KINDS: dict[str, AdapterKind] = {}


def register_kind(name: str, *, default_targets: Sequence[str], configurable_targets: bool = False,
                  matched_options: Sequence[str] = ("targets",)) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
    """Class decorator: the layer class becomes the adapter kind `name`."""
    unknown = set(matched_options) - {field.name for field in dataclasses.fields(AdapterOptions)}
    if unknown:
        raise ValueError(f"adapter kind {name!r}: matched_options {sorted(unknown)} are not AdapterOptions fields")

    def register(layer: type[AdapterLayer]) -> type[AdapterLayer]:
        known = _KINDS.get(name)
        if known is not None and _qualified(known.layer) != _qualified(layer):
            raise ValueError(f"adapter kind {name!r} is already {_qualified(known.layer)}")
        _KINDS[name] = AdapterKind(name, layer, tuple(default_targets), configurable_targets, tuple(matched_options))
        return layer

    return register


def _qualified(layer: type) -> str:
    return f"{layer.__module__}.{layer.__qualname__}"


def get_kind(kind: str | AdapterKind) -> AdapterKind:
    """The registered kind called `kind` (a kind passes through)."""
    if isinstance(kind, AdapterKind):
        return kind
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"adapter kind must be one of {kind_names()}, got {kind!r} (a kind from outside "
                         "models/adapters/ registers when its module is imported: params adapters.kind_modules)"
                         ) from None


def kind_names() -> list[str]:
    return list(_KINDS)
