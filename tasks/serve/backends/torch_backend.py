"""The torch backend: the project's models, as `abair restore` has always run them (load_model,
restore_image, the memory plan), with --precision as autocast.

Precision: fp32 as trained; bf16 under autocast on CPU and on CUDA (where the GPU has it); fp16
under autocast on CUDA only: torch's CPU kernels have no fast float16 convolutions, so it would run
slower than fp32. The blocks' attention softmax, LayerNorm and AdaptIR's FFT run in float32 under
autocast whatever the precision (models/backbone.py, models/adapters/adaptir.py).
"""

from __future__ import annotations

import contextlib

from tasks.core.errors import AbairError
from tasks.serve.backends import Backend, check_precision, register

AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, restorer, described: str, precision: str = "fp32"):
        self.restorer = restorer
        self.names = list(restorer.names)
        self.precision = precision
        self.described = described + (f", {precision} autocast" if precision != "fp32" else "")

    def pw_source(self, requested: str | None) -> str:
        try:
            return self.restorer.resolve_pw_source(requested)
        except ValueError as exc:
            raise AbairError(self.described, str(exc)) from None

    def plan(self, height, width, max_pixels, tiling, budget, mode, pw_source):
        from tasks.serve import memory

        return memory.plan_restore(self.restorer, height, width, max_pixels, tiling, budget, mode, pw_source)

    def restore(self, rgb, mode, max_pixels, plan, pw_source):
        from tasks.serve.inference import restore_image

        with self.autocast():
            return restore_image(self.restorer, rgb, mode, max_pixels, plan.restore_tiling, pw_source)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        import torch

        device = next(self.restorer.parameters()).device
        return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES[self.precision]))


def precision_problem(precision: str, device) -> str | None:
    """Why `precision` cannot run on the torch device `device`, or None."""
    import torch

    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            return ("fp16 runs on CUDA only: torch's CPU kernels have no fast float16 convolutions (slower than "
                    "fp32); use bf16 or fp32 on the CPU")
        if not torch.amp.is_autocast_available("cpu"):
            return "this torch build has no CPU autocast: use fp32"
        return None
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16: use fp16 or fp32"
    return None


@register("torch", help="the project's torch models (any model: registry, components or release folder)")
def load(model: str, device: str = "auto", precision: str = "fp32", keep_seg_head: bool = False) -> TorchBackend:
    from tasks.core.device import pick_device
    from tasks.serve.restore import load_model

    check_precision(precision)
    problem = precision_problem(precision, pick_device(device, where="--device"))
    if problem is not None:
        raise AbairError("--precision", problem)
    restorer, described = load_model(model, device, keep_seg_head=keep_seg_head)
    return TorchBackend(restorer, described, precision)
