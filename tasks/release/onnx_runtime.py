"""How the ONNX graphs of a release run: the onnxruntime sessions the export's checks
(tasks/release/onnx_export.py) and `abair restore --backend onnxruntime`
(tasks/serve/backends/onnxruntime_backend.py) both use, so that what was checked is what runs.
Light on import: onnxruntime comes in when a session is made.

Sessions: CUDAExecutionProvider first when onnxruntime has it (and the device is not cpu), then
the CPU provider; every graph optimisation (ORT_ENABLE_ALL: on the default system's restorer graph
it ran 0.34 s a 256 x 256 image on one thread, against 0.41 s with the basic or extended level);
intra-op threads = the cores this process may use.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.core.errors import AbairError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
INSTALL_HINT = 'pip install -e ".[onnx]"'


def onnxruntime():
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise AbairError("--backend onnxruntime", f"onnxruntime is not installed ({INSTALL_HINT})") from None
    return ort


def providers(device: str = "auto") -> list[str]:
    """The execution providers for --device: CUDA first where onnxruntime has it, then the CPU."""
    available = onnxruntime().get_available_providers()
    device = str(device or "auto")
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device.startswith("cuda"):
        if CUDA not in available:
            raise AbairError("--device", f"{device} requested but this onnxruntime has no CUDA provider "
                                         f"(it has {', '.join(available)})")
        return [CUDA, CPU]
    raise AbairError("--device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def new_session(path: str | Path, device: str = "auto"):
    """An InferenceSession of one graph: every graph optimisation, one intra-op thread per core."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores()
    chosen = providers(device)
    if CUDA in chosen and str(device).startswith("cuda:"):
        chosen = [(CUDA, {"device_id": int(str(device).split(":", 1)[1])}), CPU]
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types: one line naming the file
        raise AbairError(path, f"onnxruntime cannot load this graph ({str(exc).splitlines()[0]})") from None
