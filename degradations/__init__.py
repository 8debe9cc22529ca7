"""The synthetic degradation library: pure functions, no I/O, all randomness from the caller's rng.

Every degradation is a module exposing
    NAME: str
    ORDER: int   physical application order when several are stacked (scene -> light -> optics ->
                 particles -> sensor -> storage: haze 10, lowlight 20, blur 30, rain/snow 40,
                 noise and camera_noise 50, jpeg/bitdepth 60); `composite` sorts by it
    apply(img, rng, severity, **options) -> (degraded, params)
with img float32 HxWx3 RGB in [0, 1], severity in [0, 1] (0 is the identity) and params a
JSON-serialisable dict of the physical parameters used. Each module's docstring gives its
severity -> physical range mapping.

Adding a degradation: write the module, add its name below. Nothing else refers to the list.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

import cv2

# Intel IPP, which OpenCV's wheels call for some filters, picks its code path by CPU (AVX2 or
# AVX-512) beyond OPENCV_CPU_DISABLE's reach, and the paths round differently: the same seed gave
# other shard bytes on an AVX2 machine than on an AVX-512 one. OpenCV's own kernels are used instead.
# The switch is per thread: this covers the importing thread; synthesis units and composite.apply
# set it again in whatever thread runs them (Dask and Prefect run work in their own threads).
cv2.ipp.setUseIPP(False)

_MODULE_NAMES = (
    "haze",
    "lowlight",
    "blur",
    "rain",
    "snow",
    "noise",
    "camera_noise",
    "jpeg",
    "bitdepth",
)

REGISTRY: dict[str, ModuleType] = {name: import_module(f"{__name__}.{name}") for name in _MODULE_NAMES}

for _name, _module in REGISTRY.items():
    if getattr(_module, "NAME", None) != _name or not isinstance(getattr(_module, "ORDER", None), int):
        raise ImportError(f"degradations.{_name} must define NAME = {_name!r} and an integer ORDER")


def get(name: str) -> ModuleType:
    """The degradation module registered as `name`."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown degradation {name!r}; known: {names()}") from None


def names() -> list[str]:
    return list(REGISTRY)
