"""The one training loop all three phases drive (`fit`), and what it is made of: processes and
DDP, the LR schedule, AdamW, EMA, the restoration loss, resumable state, SIGTERM.

nanoGPT's style: one explicit loop, its knobs from the phase's params section (lr, min_lr,
warmup_steps, betas, weight_decay, grad_clip, amp, batch, log_every); each phase (pretrain.py,
adapters.py, estimator.py) says only what differs: its model, data, loss, validation, outputs.
The order of a step is part of the result: LR, autocast forward, zero_grad, backward, clip,
step, EMA update. A resumed run replays exactly the updates of an uninterrupted one."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.core.errors import AbairError
from tasks.core.storage import atomic_path
from tasks.train.logs import StepLog

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


def training_module(model: nn.Module, dist: Dist, device: torch.device, compile: bool = False) -> nn.Module:
    """The module the loop calls: `model` in DDP across processes, compiled on request. EMA,
    resumable state and gradient clipping keep using `model` itself."""
    wrapped = model
    if dist.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ---------------------------------------------------------------------------------------------
# optimisation

def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total`. `step` may be fractional
    (a time budget's schedule step)."""
    if step < warmup:
        return lr * min(1.0, (step + 1) / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


SCHEDULE_SLACK = 0.02  # share of the steps the elapsed time may lead by before the LR schedule follows it


class TimeBudget:
    """A phase's wall-clock budget (`time_budget_min`, the time inside training steps): once the
    elapsed share of the budget is ahead of the step share, the LR schedule follows the time, and
    the run ends when the budget is spent. A machine fast enough for `steps` runs exactly as
    without a budget; a slower one anneals on time and ends on time with fewer steps (the phase
    records how many; a run that ends on time is not bit-reproducible on another machine). Elapsed
    time is carried through resumes (`Training.elapsed`); under DDP the main process's clock is
    broadcast each step, so every rank takes the same LR and stops at the same step."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] | None = None):
        if minutes is not None and minutes <= 0:
            raise AbairError("time_budget_min", f"must be positive or null, got {minutes}")
        self.seconds = None if minutes is None else 60.0 * float(minutes)
        self.clock = clock or time.perf_counter
        self.origin: float | None = None

    def start(self, training: "Training") -> None:
        """Count from now, on top of the time the run had spent before a resume."""
        self.origin = self.clock() - training.elapsed

    def elapsed(self, dist: "Dist", device: torch.device) -> float:
        seconds = self.clock() - self.origin
        if self.seconds is not None and dist.world > 1:  # without a budget the time only gets reported
            shared = torch.tensor([seconds], dtype=torch.float64, device=device)
            torch.distributed.broadcast(shared, src=0)
            seconds = float(shared.item())
        return seconds

    def schedule_step(self, step: int, total: int, elapsed: float) -> float:
        """The step the LR schedule is evaluated at: the real one, or where the elapsed share of the
        budget is once that is ahead by more than SCHEDULE_SLACK of the steps (and at least one), so
        a machine on time runs exactly as without one. The slack absorbs the first steps' one-off
        costs (thread pools, the first batches): with "one step ahead", a first step of 2 s put a
        2700-step run with a 7.5-minute budget 12 steps ahead, and the default Phase I trained other
        bits on every run, on machines well within their budget."""
        if self.seconds is None:
            return step
        on_time = total * min(1.0, elapsed / self.seconds)
        return on_time if on_time > step + max(1.0, SCHEDULE_SLACK * total) else step

    def spent(self, elapsed: float) -> bool:
        return self.seconds is not None and elapsed >= self.seconds


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
# the loop

# A phase's loss: batch -> (loss tensor, {name: extra scalar to log}).
LossFn = Callable[[object], tuple]


class Training:
    """What a run carries from step to step, and what its resumable state holds: AdamW over
    `parameters`, an optional EMA of `module`, the step reached and every step's loss."""

    def __init__(self, parameters: Iterable[nn.Parameter], cfg: Mapping, device: torch.device,
                 module: nn.Module | None = None, ema_decay: float | None = None):
        self.parameters = list(parameters)
        self.optimizer = make_optimizer(self.parameters, cfg, device)
        self.module = module
        self.ema = EMA(module, ema_decay) if ema_decay is not None else None
        self.step = 0
        self.losses: list[float] = []
        self.stopped = False  # set when the run stopped early (SIGTERM, stop_after) with its state saved
        self.elapsed = 0.0  # seconds spent training, carried through resumes (the time budget counts them)
        self.budget_spent = False  # set when the run ended on its time budget before its last step (a finished run)

    def state_dict(self, inputs_hash: str) -> dict:
        return {"step": self.step, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state(),
                "losses": self.losses, "inputs_hash": inputs_hash, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.step, self.losses = state["step"], state["losses"]
        self.elapsed = float(state.get("elapsed", 0.0))


@dataclass
class Checkpoints:
    """A long run's resumable state: written every `every` steps and when the run stops early
    (SIGTERM, or after `stop_after` steps: tests and time-boxed jobs), read back by `resume`
    when it belongs to the same inputs."""

    path: Path
    every: int
    inputs_hash: str
    stop_after: int | None = None

    def resume(self, training: Training, mode: str, desc: str, total_steps: int) -> None:
        """mode: auto (continue a matching interrupted run), always, never."""
        if mode != "never" and self.path.exists():
            state = load_state(self.path)
            if state.get("inputs_hash") == self.inputs_hash or mode == "always":
                training.load_state_dict(state)
                log.info("%s: resuming at step %d of %d from %s", desc, training.step, total_steps, self.path)
            else:
                log.info("%s: %s belongs to other inputs; starting afresh", desc, self.path)
        elif mode == "always":
            raise AbairError(self.path, "no training state to resume from")

    def after_step(self, training: Training, stop: StopSignal, total_steps: int, main: bool) -> bool:
        """Save the state when due (by the main process); True when the run stops here."""
        done = training.step
        stopping = stop.requested or (self.stop_after is not None and done >= self.stop_after)
        if main and (done % self.every == 0 or stopping) and done < total_steps:
            save_state(self.path, training.state_dict(self.inputs_hash))
        return stopping and done < total_steps


class StepReport:
    """Every `log_every` steps and at the last: loss, the phase's extra scalars, LR, images per
    second (and peak GPU memory) to the step log and the progress bar."""

    def __init__(self, steplog: StepLog | None, bar, cfg: Mapping, world: int, device: torch.device, total_steps: int):
        self.steplog, self.bar, self.device, self.total_steps = steplog, bar, device, total_steps
        self.every = cfg.get("log_every", 10)
        self.images = cfg["batch"] * world * self.every
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total_steps

    def __call__(self, done: int, loss: float, extra: Mapping, lr: float) -> None:
        if self.due(done):
            self.write(done, loss, extra, lr)

    def final(self, done: int, loss: float, extra: Mapping, lr: float) -> None:
        """The run ends at `done` before `total_steps` (a time budget): its last step is logged too."""
        if not self.due(done):
            self.write(done, loss, extra, lr)

    def write(self, done: int, loss: float, extra: Mapping, lr: float) -> None:
        now = time.perf_counter()
        metrics = {"loss": loss, **{k: float(v) for k, v in extra.items()}, "lr": lr,
                   "img_per_s": self.images / max(now - self.last, 1e-9)}
        if self.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.last = now
        if self.steplog is not None:
            self.steplog.write(done, metrics)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{metrics['img_per_s']:.1f}")


def fit(training: Training, loss_fn: LossFn, batches, cfg: Mapping, total_steps: int, device: torch.device, *,
        steplog: StepLog | None = None, desc: str = "train", progress: bool = True,
        checkpoints: Checkpoints | None = None, dist: Dist = Dist(), keep_bar: bool = False,
        budget: TimeBudget | None = None) -> list[float]:
    """Train over `batches` ((step, batch) pairs from `training.step` on) to `total_steps`, or
    until a stop request when `checkpoints` make the run resumable (then `training.stopped`), or
    until `budget` is spent (then `training.budget_spent`). Returns every step's loss."""
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=training.step, desc=desc, unit="step",
               disable=not (progress and dist.main), leave=keep_bar)
    report = StepReport(steplog, bar, cfg, dist.world, device, total_steps) if dist.main else None
    optimizer = training.optimizer
    try:
        with StopSignal() if checkpoints is not None else contextlib.nullcontext() as stop:
            first_step = training.step
            if budget is not None:
                budget.start(training)
            for step, batch in batches:
                schedule_step = step
                if budget is not None:
                    training.elapsed = budget.elapsed(dist, device)
                    if budget.spent(training.elapsed) and training.step > 0:  # a phase runs one step at least
                        training.budget_spent = True
                        if report is not None and training.step > first_step:  # a step of this call ran
                            report.final(training.step, training.losses[-1], extra, lr)
                        log.info("%s: time budget of %.1f min spent at step %d of %d", desc, budget.seconds / 60,
                                 step, total_steps)
                        break
                    schedule_step = budget.schedule_step(step, total_steps, training.elapsed)
                lr = warmup_cosine(schedule_step, total_steps, cfg.get("warmup_steps", 0), cfg["lr"], cfg.get("min_lr", 0.0))
                set_lr(optimizer, lr)
                with autocast(device, cfg.get("amp", "auto")):
                    loss, extra = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(training.parameters, cfg["grad_clip"])
                optimizer.step()
                if training.ema is not None:
                    training.ema.update(training.module)
                training.losses.append(float(loss.detach()))
                training.step = step + 1
                if report is not None:
                    report(training.step, training.losses[-1], extra, lr)
                bar.update(1)
                if checkpoints is not None and checkpoints.after_step(training, stop, total_steps, dist.main):
                    training.stopped = True
                    break
    finally:
        bar.close()
    return training.losses
