"""The `device` knob of every stage and of serving: auto, cpu, cuda or cuda:N."""

from __future__ import annotations

import torch

from tasks.core.errors import AbairError


def pick_device(spec: str = "auto", local_rank: int = 0, where: str = "device") -> torch.device:
    """auto (this rank's GPU if there is one, else the CPU), cpu, cuda or cuda:N."""
    spec = str(spec or "auto")
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec != "cpu" and not spec.startswith("cuda"):
        raise AbairError(where, f"must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise AbairError(where, f"{spec} requested but no CUDA device is available")
    return torch.device(spec)
