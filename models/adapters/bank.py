"""AdapterBank: named per-degradation adapters of one kind on a backbone, behind one interface.

    bank = AdapterBank(backbone, kind="lora", rank=4, alpha=4.0)
    bank.add("rain"); bank.add("haze")
    bank.freeze_backbone()
    with bank.weights(w):          # w: B x len(bank.names), columns in bank.names order
        restored = backbone(x)

The bank puts its kind's layer in place of every target module (the adapter tensors live inside
the backbone, so backbone.to(device) moves them) and keeps the order of adapter names, which is
the column order of the per-sample weights. It knows kinds only through models.adapters.base.
Each adapter saves to its own safetensors file with the fingerprint of the backbone it was
trained on; loading it onto any other backbone is an AdapterError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from models.adapters.base import AdapterKind, AdapterLayer, AdapterOptions, PixelWeights, get_kind
from models.checkpoint import AdapterError, check_tensors, merge_metadata, read_checkpoint, save_atomic
from models.identity import fingerprint

ADAPTER_FORMAT = "abair-adapter"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _replace_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def attach_layers(backbone: nn.Module, kind: AdapterKind, targets: Sequence[str]) -> dict[str, AdapterLayer]:
    """Put a `kind` layer in place of every module whose name is a target or ends in `.<target>`;
    returns them by qualified name, in the backbone's module order."""
    layers: dict[str, AdapterLayer] = {}
    for qualified, module in list(backbone.named_modules()):
        if any(qualified == t or qualified.endswith("." + t) for t in targets):
            layers[qualified] = kind.layer(module)
            _replace_module(backbone, qualified, layers[qualified])
    if not layers:
        raise ValueError(f"no layer of the backbone matches the adapter targets {list(targets)}")
    return layers


class AdapterBank:
    def __init__(self, backbone: nn.Module, kind: str | AdapterKind = "lora", options: AdapterOptions | None = None, *,
                 targets: Sequence[str] | None = None, rank: int | None = None, alpha: float | None = None,
                 hidden: int | None = None):
        """`options` (default AdapterOptions()) say how adapters are built; targets / rank / alpha /
        hidden, when given, replace its fields. The kind decides which targets apply."""
        self.kind = get_kind(kind)
        given = {"targets": targets, "rank": rank, "alpha": alpha, "hidden": hidden}
        options = dataclasses.replace(options or AdapterOptions(), **{k: v for k, v in given.items() if v is not None})
        self.options = dataclasses.replace(options, targets=self.kind.targets(options))
        if any(getattr(m, "wraps_base_layer", False) for m in backbone.modules()):
            raise ValueError("this backbone already carries an adapter bank; use that one")
        self.backbone = backbone
        self.layers = attach_layers(backbone, self.kind, self.options.targets)   # qualified name -> layer
        self._names: list[str] = []
        self._alphas: dict[str, float] = {}

    # -- the set of adapters ---------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Adapter names in order; column k of the weights is names[k]."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, name: str, alpha: float | None = None) -> str:
        """A new zero-effect adapter on every target layer (alpha defaults to the bank's)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter names are letters, digits, '_' or '-', got {name!r}")
        if name in self._names:
            raise ValueError(f"the bank already has an adapter named {name!r}")
        alpha = self.options.alpha if alpha is None else float(alpha)
        for layer in self.layers.values():
            layer.add_adapter(name, rank=self.options.rank, alpha=alpha, hidden=self.options.hidden)
        self._names.append(name)
        self._alphas[name] = alpha
        self.set_weights(None)  # old weight columns no longer match the names
        return name

    def remove(self, name: str) -> None:
        self._check(name)
        for layer in self.layers.values():
            layer.remove_adapter(name)
        self._names.remove(name)
        del self._alphas[name]
        self.set_weights(None)

    def _check(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(f"no adapter named {name!r} in the bank (has {self._names})")

    def named_parameters_of(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(key, parameter) of one adapter; keys are `<layer>.<tensor>`, without the adapter name."""
        self._check(name)
        for layer_name, layer in self.layers.items():
            for key, param in layer.adapter_parameters(name).items():
                yield f"{layer_name}.{key}", param

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """Only that adapter's tensors (hand these to the optimiser in Phase II)."""
        return [p for _, p in self.named_parameters_of(name)]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name in self._names for p in self.parameters_of(name)]

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        return {key: p.detach() for key, p in self.named_parameters_of(name)}

    def num_parameters(self, name: str | None = None) -> int:
        names = self._names if name is None else [name]
        return sum(p.numel() for n in names for p in self.parameters_of(n))

    def freeze_backbone(self, trainable: Sequence[str] | None = None) -> "AdapterBank":
        """requires_grad False on everything that is not an adapter; adapters in `trainable`
        (default: all) get requires_grad True, the others are frozen too."""
        trainable = self._names if trainable is None else list(trainable)
        for name in trainable:
            self._check(name)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        for name in trainable:
            for param in self.parameters_of(name):
                param.requires_grad_(True)
        return self

    def unload(self) -> nn.Module:
        """Take every wrapper out of the backbone (unmerging first), leaving the plain backbone;
        the bank is empty and unusable afterwards. Save adapters you want to keep before."""
        self.unmerge()
        for qualified, layer in self.layers.items():
            _replace_module(self.backbone, qualified, layer.base_layer)
        self.layers.clear()
        self._names.clear()
        self._alphas.clear()
        return self.backbone

    # -- per-sample weights ------------------------------------------------------------------

    def set_weights(self, weights: torch.Tensor | Sequence[float] | None, traced: bool = False,
                    fold: bool = False) -> None:
        """Per-sample or per-pixel adapter weights for the following forward passes.

        weights: B x K (K = len(names), columns in names order), a length-K vector shared by the
        batch, a B x K x H x W map (per pixel; H x W the backbone's padded input size, whose levels
        the layers area-average it to), or None (the backbone alone). Columns that are zero for the
        whole batch are skipped (their adapters do not run) unless the weights require grad.
        Deciding that reads the values, so pass weights that live on the CPU to avoid a device
        sync; each layer moves them.

        traced: the weights are a graph's input (torch.export / ONNX), not values: every adapter
        runs (skipping some would read the values), and a map's levels use the static factors of
        PixelWeights(traced=True).

        fold (mergeable kinds, B x K weights): the layers fold row 0 of the weights into their base
        weights inside each forward pass (MergeableLayer.folded_forward): merge_mix for a traced
        graph whose weights are an input.
        """
        if fold and not self.kind.mergeable:
            raise NotImplementedError(f"{self.kind.name} adapters cannot be folded into the base weights")
        if weights is None:
            for layer in self.layers.values():
                layer.set_weights(None)
                if self.kind.mergeable:
                    layer.fold_weights = False
            return
        weights = torch.as_tensor(weights)
        if not weights.is_floating_point():
            weights = weights.float()
        if weights.dim() == 1:
            weights = weights[None]
        if weights.dim() not in (2, 4) or weights.shape[1] != len(self._names):
            raise ValueError(f"adapter weights must be (batch, {len(self._names)}) or (batch, {len(self._names)}, H, W) "
                             f"for adapters {self._names}, got {tuple(weights.shape)}")
        if weights.requires_grad or traced:
            active = list(range(len(self._names)))
        else:
            active = torch.nonzero((weights != 0).transpose(0, 1).reshape(len(self._names), -1).any(dim=1)).flatten().tolist()
        names = [self._names[k] for k in active]
        if len(active) < len(self._names):
            weights = weights[:, active]
        device = next(self.backbone.parameters()).device
        weights = weights.to(device, non_blocking=True)
        folding = fold and weights.dim() == 2   # a map (per pixel) is never folded
        if weights.dim() == 4:
            weights = PixelWeights(weights, traced)   # one set of level maps, shared by every layer
        elif folding:
            weights = weights[:1]   # the batch shares one blend
        for layer in self.layers.values():
            layer.set_weights(weights, names)
            if self.kind.mergeable:
                layer.fold_weights = folding

    @contextlib.contextmanager
    def weights(self, weights: torch.Tensor | Sequence[float] | None, traced: bool = False, fold: bool = False):
        """`with bank.weights(w): backbone(x)`; afterwards the layers have no weights set."""
        self.set_weights(weights, traced, fold)
        try:
            yield self
        finally:
            self.set_weights(None)

    # -- merging (mergeable kinds: LoRA) -----------------------------------------------------

    def _check_mergeable(self) -> None:
        if not self.kind.mergeable:
            raise NotImplementedError(f"{self.kind.name} adapters are not linear in the layer's input, "
                                      "so they cannot be merged into the backbone")

    def merge(self, name: str) -> None:
        """Fold one adapter into the base weights (inference only). While merged every layer is
        its merged base layer and per-sample weights are ignored; unmerge() restores the
        original weight tensors bit for bit. Unmerge before training or moving the model."""
        self._check_mergeable()
        self._check(name)
        for layer in self.layers.values():
            layer.merge(name)

    def merge_mix(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Fold a blend (one weight per adapter, in names order) into the base weights: the
        zero-overhead form of set_weights() when every sample uses the same weights."""
        self._check_mergeable()
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten().tolist()
        if len(weights) != len(self._names):
            raise ValueError(f"merge_mix needs {len(self._names)} weights for adapters {self._names}, got {len(weights)}")
        mix = dict(zip(self._names, weights))
        for layer in self.layers.values():
            layer.merge_mix(mix)

    def unmerge(self) -> None:
        if self.kind.mergeable:
            for layer in self.layers.values():
                layer.unmerge()

    @property
    def merged(self) -> str | None:
        if not self.kind.mergeable:
            return None
        return next(iter(self.layers.values())).merged_adapter

    # -- files -----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        return fingerprint(self.backbone)

    def save(self, name: str, path: str | os.PathLike, degradation: str | None = None,
             extra_metadata: Mapping[str, Any] | None = None) -> Path:
        """One adapter's tensors (keys without the adapter name) and what is needed to check a
        later load: degradation, kind, rank, alpha, hidden, targets, layers, backbone fingerprint,
        parameter count. Atomic (temporary name, then os.replace)."""
        tensors = self.state_dict_of(name)
        reserved = {
            "format": ADAPTER_FORMAT,
            "name": name,
            "degradation": degradation or name,
            "kind": self.kind.name,
            **dataclasses.replace(self.options, alpha=self._alphas[name]).metadata(),
            "layers": json.dumps(list(self.layers)),
            "backbone_fingerprint": self.fingerprint(),
            "parameters": str(sum(t.numel() for t in tensors.values())),
        }
        return save_atomic(tensors, path, merge_metadata(reserved, extra_metadata))

    def load(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Add the adapter stored at `path` (under `name`, default its degradation); returns the name.

        Raises AdapterError naming the file when it is unreadable, was trained on another backbone,
        has another kind/rank/targets/hidden width than this bank, or has missing/extra/misshapen
        tensors. On error the bank is left as it was.
        """
        tensors, meta = read_checkpoint(path, ADAPTER_FORMAT, error=AdapterError)
        kind, found, trained_on = _file_identity(path, meta)
        if kind != self.kind.name:
            raise AdapterError(path, f"kind is {kind!r} but this bank's is {self.kind.name!r}")
        for key in self.kind.matched_options:
            theirs, ours = getattr(found, key), getattr(self.options, key)
            if theirs != ours:
                raise AdapterError(path, f"{key} is {theirs!r} but this bank's is {ours!r}")
        mine = self.fingerprint()
        if trained_on != mine:
            raise AdapterError(path, f"trained on backbone {trained_on}, but this backbone is {mine}; "
                                     "an adapter only fits the frozen backbone it was trained on")
        name = name or meta.get("degradation") or meta.get("name")
        if name in self._names:
            raise AdapterError(path, f"the bank already has an adapter named {name!r}")

        self.add(name, alpha=found.alpha)
        try:
            params = dict(self.named_parameters_of(name))
            check_tensors(params, tensors, path, error=AdapterError)
            with torch.no_grad():
                for key, param in params.items():
                    param.copy_(tensors[key])
        except BaseException:
            self.remove(name)
            raise
        return name


def _file_identity(path: str | os.PathLike, meta: Mapping[str, str]) -> tuple[str, AdapterOptions, str]:
    """(kind name, options, backbone fingerprint) of an adapter file, from its metadata."""
    try:
        return meta["kind"], AdapterOptions.from_metadata(meta), meta["backbone_fingerprint"]
    except (KeyError, ValueError) as exc:
        raise AdapterError(path, f"incomplete adapter metadata ({type(exc).__name__}: {exc})") from None


def read_adapter_options(path: str | os.PathLike) -> tuple[AdapterKind, AdapterOptions]:
    """The kind and options an adapter file was built with: what a bank that loads it needs."""
    kind, options, _ = _file_identity(path, read_adapter_metadata(path))
    try:
        return get_kind(kind), options
    except ValueError as exc:
        raise AdapterError(path, str(exc)) from None


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An adapter file's metadata (degradation, kind, rank, fingerprint...) without a bank."""
    _, meta = read_checkpoint(path, ADAPTER_FORMAT, error=AdapterError)
    return meta
