"""What restores the float image for `abair restore`: a registry of backends.

tasks/serve/restore.py reads the files, plans the memory, decodes, encodes and writes; a backend
only turns one float RGB image into its Restoration (tasks/serve/inference.py) and says what it
can do:

    torch        the project's models (tasks/serve/torch_backend.py: load_model, restore_image and
                 the memory plan, as they were); --precision fp32, bf16 (CPU and CUDA, autocast),
                 fp16 (CUDA)
    onnxruntime  a release folder's ONNX graphs (tasks/release/onnx_export.py), without torch or
                 MLflow at run time; fp32; whole images and local tiling

Adding a backend: a module here that defines a Backend subclass and a loader decorated with
register(name), listed in _BACKEND_MODULES. Modules stay light on import (the CLI's parser lists
the names): torch, onnxruntime and the like come in when a backend loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from tasks.core.errors import AbairError

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_BACKEND = "torch"


class Backend:
    """A loaded model that restores float images.

    names: the adapters, in the order of the weight columns (then `keep`); described: the model
    as the command's first line names it."""

    name: str = ""
    names: list[str]
    described: str

    def pw_source(self, requested: str | None) -> str:
        """The weight-map source mode pw uses (`requested`, or the model's default), or the
        AbairError naming the model and what it lacks."""
        raise NotImplementedError

    def plan(self, height: int, width: int, max_pixels: int | None, tiling: str, budget: int | None,
             mode: str, pw_source: str | None):
        """The tasks.serve.memory.Plan for one image (memory.DoesNotFit when none fits)."""
        raise NotImplementedError

    def restore(self, rgb, mode: str, max_pixels: int | None, plan, pw_source: str | None):
        """float32 RGB H x W x 3 in [0, 1] -> its tasks.serve.inference.Restoration, run as `plan` says."""
        raise NotImplementedError


def _no_check(tiling: str, precision: str) -> None:
    return None


@dataclass(frozen=True)
class BackendKind:
    name: str
    load: Callable[..., Backend]        # load(model, device=, precision=, keep_seg_head=) -> Backend
    help: str
    # refuses options the backend cannot run (one AbairError naming the flag) before anything loads
    check: Callable[[str, str], None] = _no_check


_BACKENDS: dict[str, BackendKind] = {}


def register(name: str, help: str, check: Callable[[str, str], None] | None = None):
    """Decorator: `load(model, device, precision, keep_seg_head) -> Backend` becomes backend `name`."""
    def wrap(load: Callable[..., Backend]) -> Callable[..., Backend]:
        _BACKENDS[name] = BackendKind(name, load, help, check or _no_check)
        return load

    return wrap


def get(name: str) -> BackendKind:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise AbairError("--backend", f"must be one of {', '.join(_BACKENDS)}, got {name!r}") from None


def names() -> list[str]:
    return list(_BACKENDS)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise AbairError("--precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")


_BACKEND_MODULES = ("torch_backend", "onnxruntime_backend")

for _module in _BACKEND_MODULES:
    import_module(f"{__name__}.{_module}")
