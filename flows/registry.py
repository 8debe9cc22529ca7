"""Prefect flows and CLI commands for the registry end of the pipeline: register, promote,
roll back, restore images, add a degradation.

Flows compose the Prefect tasks defined here (retries on transient failures); the CLI runs
the same plain functions directly by default (what `dvc repro` calls: no Prefect server needed),
or the flows with `--runner prefect`. prefect.yaml deploys `promote_flow`.
"""

from __future__ import annotations

import logging

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_unless_bad_input

from tasks.core import paths, tracking
from tasks.core.params import Params

log = logging.getLogger(__name__)

# Registration and promotion are safe to retry: a retry finds the versions already created by
# content hash, and alias moves are idempotent.

@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def register_task(params: dict, checkpoints: str, metrics_path: str, shards: str) -> dict:
    from tasks.registry.register import register_evaluated
    from tasks.serve.pyfunc import save_restorer

    return register_evaluated(params, checkpoints, metrics_path, shards, save_restorer=save_restorer)

@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def promote_task(gate: dict, eval_cfg: dict, shards: str, challenger: str | None, dry_run: bool) -> dict:
    from tasks.registry.gate import promote

    return promote(gate, eval_cfg=eval_cfg, shards=shards, challenger=challenger, dry_run=dry_run)

def _gate_artifact(gate: dict | None) -> None:
    if gate and gate.get("table"):
        verdict = "PASS" if gate.get("passed") else "FAIL"
        create_markdown_artifact(f"**{verdict}** ({gate.get('against', '')}): {gate.get('reason', '')}\n\n```\n"
                                 f"{gate['table']}\n```", key="abair-gate", description="ABAIR promotion gate")


@flow(name="abair-register", log_prints=True)
def register_flow(params_path: str = paths.PARAMS, checkpoints: str = paths.CHECKPOINTS,
                  metrics_path: str = paths.METRICS, shards: str = paths.SHARDS,
                  out: str | None = paths.REGISTRY_REPORT, promote: bool | None = None) -> dict:
    """Register the evaluated components (challenger), then run the gate when `promote` (default:
    register.auto_promote)."""
    from tasks.registry.register import write_report

    tracking.join_flow_pipeline_run()
    params = Params.read(params_path)
    cfg = params.section("register")
    result = register_task(params.values, checkpoints, metrics_path, shards)
    if cfg.get("auto_promote", True) if promote is None else promote:
        result["gate"] = promote_task(cfg["gate"], params.section("evaluate", optional=True), shards, None, False)
        _gate_artifact(result["gate"])
    return write_report(result, out)


@flow(name="abair-promote", log_prints=True)
def promote_flow(params_path: str = paths.PARAMS, dry_run: bool = False, challenger: str | None = None,
                 shards: str = paths.SHARDS, overrides: list[str] | None = None) -> dict:
    """Compare the challenger with the champion on one evaluation suite and move `champion` when
    the gate (params: register.gate) passes."""
    params = Params.read(params_path, overrides or (), within="register")
    result = promote_task(params.section("register")["gate"], params.section("evaluate", optional=True), shards,
                          challenger, dry_run)
    _gate_artifact(result)
    return result
