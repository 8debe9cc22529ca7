"""What the three training phases share: devices, DDP, the LR schedule, EMA, losses, resumable
state, SIGTERM handling, step logs (TSV for DVC plots + MLflow), curves and sample grids.

No framework: each phase keeps one explicit loop (see tasks/pretrain.py) and calls these."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.core.errors import AbairError
from tasks.core.storage import atomic_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# devices and processes

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str = "auto") -> Dist:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA (amp auto/bf16); full precision elsewhere."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ---------------------------------------------------------------------------------------------
# optimisation

def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(parameters: Iterable[nn.Parameter], cfg: Mapping, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise AbairError("optimizer", "nothing to train (no parameter requires grad)")
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))),
                             weight_decay=cfg.get("weight_decay", 0.0), fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def restoration_loss(restored: torch.Tensor, clean: torch.Tensor, kind: str = "l1", eps: float = 1e-3) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(restored, clean)
    if kind == "charbonnier":
        return torch.sqrt((restored - clean).pow(2) + eps * eps).mean()
    raise AbairError("loss", f"unknown restoration loss {kind!r} (l1 or charbonnier)")


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, value in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def save_state(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise AbairError(path, f"unreadable training state ({type(exc).__name__}: {exc})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """SIGTERM (and SIGINT) set a flag; the loop checkpoints at the end of the step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("signal %d: checkpointing at the end of this step", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# logs, curves, sample grids

class StepLog:
    """Per-step metrics as a TSV (DVC plots) and, when a run is given, MLflow metrics."""

    def __init__(self, path: str | Path, columns: list[str], run=None, resume_step: int | None = None):
        self.path, self.columns, self.run = Path(path), ["step", *columns], run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f, delimiter="\t") if int(r["step"]) < resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, delimiter="\t", extrasaction="ignore").writerow(
                {"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}})
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def read(self) -> dict[str, list[float]]:
        with self.path.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return {c: [float(r[c]) if r.get(c) not in (None, "") else float("nan") for r in rows] for c in self.columns}


def plot_curves(table: Mapping[str, list[float]], columns: list[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ax.plot(table["step"], table[column], lw=1.2)
        ax.set_title(column)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if column.startswith(("loss", "l1", "seg", "ce")) and min(v for v in table[column] if v == v) > 0:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def sample_grid(rows: list[list[np.ndarray]], path: str | Path, labels: list[str]) -> Path:
    """Rows of float HxWx3 images (same size) side by side, a label above each column."""
    import cv2

    from tasks.core import imageio

    tiles = [np.concatenate([imageio.to_uint8(img) for img in row], 1) for row in rows]
    grid = np.concatenate(tiles, 0)
    width = rows[0][0].shape[1]
    header = np.zeros((18, grid.shape[1], 3), np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * width + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    imageio.write_image(path, np.concatenate([header, grid], 0))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# the small loop Phase II and III share (Phase I has its own: DDP, EMA, resume)

def fit(loss_fn, parameters: list[nn.Parameter], cfg: Mapping, batches, total_steps: int, device: torch.device,
        steplog: StepLog | None = None, desc: str = "train", progress: bool = True) -> list[float]:
    """AdamW with warm-up + cosine over `batches` ((step, batch) pairs); `loss_fn(batch)` returns
    (loss tensor, dict of extra scalars to log). Returns the loss of every step."""
    import time

    from tqdm import tqdm

    optimizer = make_optimizer(parameters, cfg, device)
    losses: list[float] = []
    log_every = cfg.get("log_every", 10)
    last = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress, leave=False)
    for step, batch in batches:
        lr = warmup_cosine(step, total_steps, cfg.get("warmup_steps", 0), cfg["lr"], cfg.get("min_lr", 0.0))
        set_lr(optimizer, lr)
        with autocast(device, cfg.get("amp", "auto")):
            loss, extra = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(parameters, cfg["grad_clip"])
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            now = time.perf_counter()
            images = cfg["batch"] * log_every / max(now - last, 1e-9)
            last = now
            if steplog is not None:
                steplog.write(done, {"loss": losses[-1], **{k: float(v) for k, v in extra.items()}, "lr": lr,
                                     "img_per_s": images})
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images:.1f}")
        bar.update(1)
    bar.close()
    return losses
