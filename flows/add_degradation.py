"""`abair add-degradation --runner prefect`: the paper's "Ours*" as a Prefect flow (one new
adapter, the estimator refitted with one more output, the candidate evaluated, registered and
optionally promoted), each step a task with retries."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.evaluate import evaluate_candidate_task
from flows.retry import retry_unless_bad_input
from tasks.core import paths


@task(name="add-degradation-prepare", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def prepare_degradation_task(name: str, base: str, stage: str) -> dict:
    from tasks.registry.add_degradation import prepare

    return prepare(name, base, stage)

@task(name="add-degradation-adapter", task_run_name="adapter-{name}", retries=1, retry_delay_seconds=10,
      cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)
def new_adapter_task(params: dict, name: str, stage: str, shards: str, reports: str) -> dict:
    from tasks.registry.add_degradation import train_new_adapter

    return train_new_adapter(params, name, stage, shards, reports, progress=False)

@task(name="add-degradation-estimator", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def refit_estimator_task(params: dict, stage: str, shards: str, reports: str) -> dict:
    from tasks.registry.add_degradation import refit_estimator

    return refit_estimator(params, stage, shards, reports, progress=False)

@task(name="add-degradation-check", cache_policy=NO_CACHE)
def check_unchanged_task(stage: str, hashes: dict) -> dict:
    from tasks.registry.add_degradation import check_unchanged

    return check_unchanged(stage, hashes)

@task(name="add-degradation-publish", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def publish_degradation_task(name: str, params: dict, stage: str, out: str, metrics: dict, shards: str, reports: str,
                             prepared: dict, adapter: dict, estimator: dict, unchanged: dict, promote: bool) -> dict:
    from tasks.registry import add_degradation
    from tasks.registry.gate import Evaluator
    from tasks.serve.pyfunc import save_restorer

    if Path(stage).exists():  # a retry after the rename finds `out` already in place
        add_degradation.publish(stage, out)
    return add_degradation.finish(name, params, Path(out), metrics, shards, reports, prepared, adapter, estimator,
                                  unchanged, True, promote, Evaluator(), print, save_restorer)


@flow(name="abair-add-degradation", log_prints=True)
def add_degradation_flow(name: str, data: str | None = None, params_path: str = paths.PARAMS,
                         overrides: list[str] | None = None, base: str = paths.CHECKPOINTS, out: str | None = None,
                         shards: str = paths.SHARDS, promote: bool = False) -> dict:
    """One new adapter + the estimator refit with K+1 outputs, evaluated and registered."""
    from tasks.registry import add_degradation as steps

    steps.check_name(name, data)
    out = str(out or steps.default_out(name))
    reports = f"{paths.REPORTS}/add-degradation/{name}"
    params = steps.effective_params(params_path, overrides or [], name, data)
    stage = str(steps.staging_dir(out))
    prepared = prepare_degradation_task(name, base, stage)
    adapter = new_adapter_task(params, name, stage, shards, reports)
    estimator = refit_estimator_task(params, stage, shards, reports)
    unchanged = check_unchanged_task(stage, prepared["base_dir_hashes"])
    metrics = evaluate_candidate_task(params.get("evaluate") or {}, stage, shards)
    return publish_degradation_task(name, params, stage, out, metrics, shards, reports, prepared, adapter,
                                         estimator, unchanged, promote)
