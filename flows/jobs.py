"""The pipeline's units of work as Prefect tasks: retries, run names and caching are declared
here, on the task; the work itself is the plain function in the stage's module. Flows
(flows/) only compose these."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.errors import AbairError

# Exit status of `abair` for bad input: retrying cannot help.
BAD_INPUT = 2


class JobFailed(RuntimeError):
    def __init__(self, name: str, returncode: int):
        self.returncode = returncode
        super().__init__(f"job {name} exited with status {returncode}")


def _retry_unless_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except JobFailed as exc:
        return exc.returncode != BAD_INPUT
    except AbairError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="synthesize", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def synthesize_task(cfg: dict, source: str | None = None, out: str | None = None) -> dict:
    from tasks.data.synthesize import synthesize

    return synthesize(cfg, source=source, out=out, progress=False)


@task(name="pretrain", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def pretrain_task(cfg: dict, shards: str, out: str, state_path: str, reports: str) -> dict:
    # A retry resumes from the last checkpoint (resume="auto"), it does not start over.
    from tasks.train.pretrain import pretrain

    summary = pretrain(cfg, shards=shards, out=out, state_path=state_path, reports=reports, resume="auto", progress=False)
    return {k: v for k, v in summary.items() if k != "losses"}


@task(name="adapter", task_run_name="adapter-{name}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def adapter_job(name: str, cfg: dict, backbone: str, shards: str, out_dir: str, reports: str, device: str,
                threads: int, parent_run_id: str | None) -> dict:
    """Train one adapter in its own process: its own GPU (CUDA_VISIBLE_DEVICES) or CPU threads,
    and a crash or a killed worker becomes a retry instead of taking the flow down. The process
    reads the `adapters` section `cfg` as the flow resolved it (overrides applied, device
    chosen) from a params file of its own: nothing is parsed or decided twice."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    section = dict(cfg)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        section["device"] = "cuda"
    elif device == "cpu":
        section["device"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="abair-job-") as tmp:
        params, summary = Path(tmp) / "params.json", Path(tmp) / "summary.json"
        params.write_text(json.dumps({"adapters": section}))  # JSON is YAML: the params loader reads it
        cmd = [sys.executable, "-m", "flows.cli", "adapter", name, "--params", str(params), "--backbone", backbone,
               "--shards", shards, "--out-dir", out_dir, "--reports", reports, "--summary", str(summary), "--no-progress"]
        if parent_run_id:
            cmd += ["--parent-run", parent_run_id]
        returncode = subprocess.run(cmd, env=env).returncode
        if returncode != 0:
            raise JobFailed(f"adapter {name}", returncode)
        return json.loads(summary.read_text())


@task(name="estimator", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def estimator_task(cfg: dict, backbone: str, adapters_dir: str, shards: str, out: str, reports: str) -> dict:
    from tasks.train.estimator import train_estimator

    return train_estimator(cfg, backbone_path=backbone, adapters_dir=adapters_dir, shards=shards, out=out,
                           reports=reports, progress=False)


# -- registry, promotion and adding a degradation (flows/registry.py) ---------------------------
# Registration and promotion are safe to retry: a retry finds the versions already created by
# content hash, and alias moves are idempotent.

@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def register_task(params_path: str, checkpoints: str, metrics_path: str, shards: str) -> dict:
    from tasks.registry.register import register_evaluated
    from tasks.serve.pyfunc import save_restorer

    return register_evaluated(params_path, checkpoints, metrics_path, shards, save_restorer=save_restorer)


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def promote_task(gate: dict, eval_cfg: dict, shards: str, challenger: str | None, dry_run: bool) -> dict:
    from tasks.registry.gate import promote

    return promote(gate, eval_cfg=eval_cfg, shards=shards, challenger=challenger, dry_run=dry_run)


@task(name="add-degradation-prepare", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def prepare_degradation_task(name: str, base: str, stage: str) -> dict:
    from tasks.registry.add_degradation import prepare

    return prepare(name, base, stage)


@task(name="add-degradation-adapter", task_run_name="adapter-{name}", retries=1, retry_delay_seconds=10,
      cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_input)
def new_adapter_task(params: dict, name: str, stage: str, shards: str, reports: str) -> dict:
    from tasks.registry.add_degradation import train_new_adapter

    return train_new_adapter(params, name, stage, shards, reports, progress=False)


@task(name="add-degradation-estimator", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def refit_estimator_task(params: dict, stage: str, shards: str, reports: str) -> dict:
    from tasks.registry.add_degradation import refit_estimator

    return refit_estimator(params, stage, shards, reports, progress=False)


@task(name="add-degradation-check", cache_policy=NO_CACHE)
def check_unchanged_task(stage: str, hashes: dict) -> dict:
    from tasks.registry.add_degradation import check_unchanged

    return check_unchanged(stage, hashes)


@task(name="evaluate-candidate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def evaluate_candidate_task(cfg: dict, checkpoints: str, shards: str) -> dict:
    """Evaluate a folder of components without touching reports/ (the DVC stage's outputs)."""
    from tasks.evaluate.stage import evaluate

    return evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=None, progress=False)


@task(name="add-degradation-publish", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def publish_degradation_task(name: str, params: dict, stage: str, out: str, metrics: dict, shards: str, reports: str,
                             prepared: dict, adapter: dict, estimator: dict, unchanged: dict, promote: bool) -> dict:
    from pathlib import Path

    from tasks.registry import add_degradation
    from tasks.registry.gate import Evaluator
    from tasks.serve.pyfunc import save_restorer

    if Path(stage).exists():  # a retry after the rename finds `out` already in place
        add_degradation.publish(stage, out)
    return add_degradation.finish(name, params, Path(out), metrics, shards, reports, prepared, adapter, estimator,
                                  unchanged, True, promote, Evaluator(), print, save_restorer)


@task(name="evaluate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_bad_input)
def evaluate_task(cfg: dict, checkpoints: str, shards: str, reports: str | None) -> dict:
    from tasks.evaluate.stage import evaluate

    return evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=reports, progress=False)
