"""Adapters: the kinds (one module each) and the bank that carries any of them on a backbone.

    base.py     what a kind is (AdapterLayer, AdapterOptions) and the registry of kinds
    lora.py     LoRA on the 1x1 convolutions (mergeable into the weights)
    adaptir.py  AdaptIR's heterogeneous adapter beside each FFN
    bank.py     AdapterBank: named adapters, per-sample weights, merging, adapter files

Adding a kind: write a module that defines an AdapterLayer subclass decorated with
base.register_kind, and add its name below, or keep it outside the package and list its dotted
path in params `adapters.kind_modules` (the stages pass that list to load_kind_modules).
"""

from __future__ import annotations

from importlib import import_module
from typing import Sequence

from models.adapters.bank import AdapterBank, read_adapter_metadata, read_adapter_options
from models.adapters.base import (AdapterKind, AdapterLayer, AdapterOptions, MergeableLayer, PixelWeights, get_kind,
                                  kind_names, register_kind)
from models.checkpoint import AdapterError

_KIND_MODULES = (
    "lora",
    "adaptir",
)

for _name in _KIND_MODULES:
    import_module(f"{__name__}.{_name}")


def load_kind_modules(module_paths: Sequence[str]) -> list[str]:
    """Import the modules of adapter kinds defined outside this package (params
    `adapters.kind_modules`); each registers its kind on import. Returns the kind names known."""
    for path in module_paths:
        try:
            import_module(path)
        except ImportError as exc:
            raise AdapterError("params.yaml adapters.kind_modules", f"cannot import {path!r} ({exc})") from None
    return kind_names()


__all__ = ["AdapterBank", "AdapterKind", "AdapterLayer", "AdapterOptions", "MergeableLayer", "PixelWeights", "get_kind",
           "kind_names", "load_kind_modules", "read_adapter_metadata", "read_adapter_options", "register_kind"]
