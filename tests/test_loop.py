"""The one training loop (tasks/train/loop.py): a stop request ends a resumable run with its
state saved, and the resumed run makes exactly the updates of an uninterrupted one."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tasks.train import loop

CFG = {"lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2, "grad_clip": 1.0, "batch": 4, "log_every": 2}
STEPS = 8


def batches(start: int):
    for step in range(start, STEPS):
        generator = torch.Generator().manual_seed(step)
        yield step, torch.randn(4, 3, generator=generator)


def new_training(ema: bool = True) -> loop.Training:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    return loop.Training(model.parameters(), CFG, torch.device("cpu"), module=model, ema_decay=0.9 if ema else None)


def square_loss(training: loop.Training, kill_at: int | None = None):
    def loss_fn(x):
        if kill_at is not None and training.step == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return training.module(x).pow(2).mean(), {"mean": x.mean()}

    return loss_fn


def test_a_stop_request_saves_the_state_and_the_resumed_run_is_exact(tmp_path):
    full = new_training()
    loop.fit(full, square_loss(full), batches(0), CFG, STEPS, torch.device("cpu"), progress=False)

    checkpoints = loop.Checkpoints(tmp_path / "state.pt", every=100, inputs_hash="h")
    cut = new_training()
    previous = signal.getsignal(signal.SIGTERM)
    loop.fit(cut, square_loss(cut, kill_at=3), batches(0), CFG, STEPS, torch.device("cpu"), progress=False,
             checkpoints=checkpoints)
    assert cut.stopped and cut.step == 4 and checkpoints.path.exists()
    assert signal.getsignal(signal.SIGTERM) == previous

    resumed = new_training()
    checkpoints.resume(resumed, "auto", "test", STEPS)
    assert resumed.step == 4
    loop.fit(resumed, square_loss(resumed), batches(resumed.step), CFG, STEPS, torch.device("cpu"), progress=False,
             checkpoints=checkpoints)
    assert not resumed.stopped and resumed.losses == full.losses
    for a, b in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]) for k in full.ema.shadow)


def test_state_of_other_inputs_is_not_resumed(tmp_path):
    checkpoints = loop.Checkpoints(tmp_path / "state.pt", every=2, inputs_hash="a", stop_after=2)
    first = new_training()
    loop.fit(first, square_loss(first), batches(0), CFG, STEPS, torch.device("cpu"), progress=False, checkpoints=checkpoints)
    assert first.stopped and first.step == 2

    other = new_training()
    loop.Checkpoints(checkpoints.path, every=2, inputs_hash="b").resume(other, "auto", "test", STEPS)
    assert other.step == 0 and other.losses == []
    loop.Checkpoints(checkpoints.path, every=2, inputs_hash="b").resume(other, "always", "test", STEPS)
    assert other.step == 2


def test_a_run_without_checkpoints_logs_every_n_steps_and_leaves_signals_alone(tmp_path):
    from tasks.train.logs import StepLog

    training = new_training(ema=False)
    steplog = StepLog(tmp_path / "log.tsv", ["loss", "mean", "lr", "img_per_s"])
    previous = signal.getsignal(signal.SIGTERM)
    seen = []

    def loss_fn(x):
        seen.append(signal.getsignal(signal.SIGTERM))
        return training.module(x).pow(2).mean(), {"mean": x.mean()}

    losses = loop.fit(training, loss_fn, batches(0), CFG, STEPS, torch.device("cpu"), steplog=steplog, progress=False)
    assert len(losses) == STEPS and training.ema is None and not training.stopped
    assert all(handler == previous for handler in seen)
    table = steplog.read()
    assert table["step"] == [2, 4, 6, 8]
    assert table["loss"] == pytest.approx([losses[i] for i in (1, 3, 5, 7)], rel=1e-5)
    assert table["lr"][-1] == pytest.approx(loop.warmup_cosine(STEPS - 1, STEPS, 2, CFG["lr"], CFG["min_lr"]), rel=1e-5)


class FakeClock:
    """One second passes every time the clock is read."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_time_budget_anneals_on_time_and_ends_the_run_when_spent(tmp_path):
    from tasks.train.logs import StepLog

    training = new_training(ema=False)
    steplog = StepLog(tmp_path / "log.tsv", ["loss", "mean", "lr", "img_per_s"])
    budget = loop.TimeBudget(5 / 60, clock=FakeClock())  # 5 s; the clock reads 1, 2, 3, ... s at steps 0, 1, 2, ...
    CFG1 = {**CFG, "log_every": 1}
    loop.fit(training, square_loss(training), batches(0), CFG1, STEPS, torch.device("cpu"), steplog=steplog,
             progress=False, budget=budget)
    assert training.budget_spent and not training.stopped
    assert training.step == 4 and len(training.losses) == 4 and training.elapsed == 5.0
    # the schedule runs on the elapsed fraction (step 3 at 4 of 5 s is 6.4 of 8 steps), not on the step
    expected = [loop.warmup_cosine(max(step, STEPS * (step + 1) / 5), STEPS, 2, CFG["lr"], CFG["min_lr"]) for step in range(4)]
    assert steplog.read()["lr"] == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < loop.warmup_cosine(3, STEPS, 2, CFG["lr"], CFG["min_lr"]) / 2


def test_the_schedule_follows_the_clock_only_once_it_leads_by_more_than_the_slack():
    budget = loop.TimeBudget(1000 / 60)  # 1000 s for 2700 steps: 0.37 s per step
    # a slow first step (8 s, 21.6 steps' worth) is within the slack (2% of 2700 = 54 steps): the run
    # keeps the step schedule, as a machine on time must (the default Phase I had other bits on every run)
    assert budget.schedule_step(0, 2700, 8.0) == 0
    assert budget.schedule_step(100, 2700, 50.0) == 100                     # 135 steps' worth: 35 ahead
    assert budget.schedule_step(100, 2700, 60.0) == pytest.approx(162.0)   # 62 ahead: follows the clock
    assert budget.schedule_step(2000, 2700, 1000.0) == pytest.approx(2700)  # spent: fully annealed
    assert loop.TimeBudget(5 / 60).schedule_step(3, 8, 4.0) == pytest.approx(6.4)  # short runs: one step ahead suffices
    assert loop.TimeBudget(None).schedule_step(7, 2700, 1e9) == 7


def test_a_budget_long_enough_changes_nothing_and_its_time_is_kept_through_a_resume(tmp_path):
    plain = new_training()
    loop.fit(plain, square_loss(plain), batches(0), CFG, STEPS, torch.device("cpu"), progress=False)
    budgeted = new_training()
    checkpoints = loop.Checkpoints(tmp_path / "state.pt", every=100, inputs_hash="h", stop_after=3)
    loop.fit(budgeted, square_loss(budgeted), batches(0), CFG, STEPS, torch.device("cpu"), progress=False,
             checkpoints=checkpoints, budget=loop.TimeBudget(60.0, clock=FakeClock()))
    assert budgeted.stopped and budgeted.elapsed == 3.0
    resumed = new_training()
    checkpoints.stop_after = None
    checkpoints.resume(resumed, "auto", "test", STEPS)
    assert resumed.step == 3 and resumed.elapsed == 3.0
    loop.fit(resumed, square_loss(resumed), batches(resumed.step), CFG, STEPS, torch.device("cpu"), progress=False,
             checkpoints=checkpoints, budget=loop.TimeBudget(60.0, clock=FakeClock()))
    assert not resumed.budget_spent and resumed.losses == plain.losses
    assert resumed.elapsed == 3.0 + 5  # the first step after the resume reads 1 s past the saved 3 s
    with pytest.raises(Exception, match="time_budget_min"):
        loop.TimeBudget(0)
