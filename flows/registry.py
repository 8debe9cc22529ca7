"""Prefect flows and CLI commands for the registry end of the pipeline: register, promote,
roll back, restore images, add a degradation.

Flows compose the Prefect tasks of flows/jobs.py (retries on transient failures); the CLI runs
the same plain functions directly by default (what `dvc repro` calls: no Prefect server needed),
or the flows with `--runner prefect`. prefect.yaml deploys `promote_flow`.
"""

from __future__ import annotations

import logging

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import jobs

from tasks.core import tracking
from tasks.core.params import load_params

log = logging.getLogger(__name__)


def _gate_artifact(gate: dict | None) -> None:
    if gate and gate.get("table"):
        verdict = "PASS" if gate.get("passed") else "FAIL"
        create_markdown_artifact(f"**{verdict}** ({gate.get('against', '')}): {gate.get('reason', '')}\n\n```\n"
                                 f"{gate['table']}\n```", key="abair-gate", description="ABAIR promotion gate")


@flow(name="abair-register", log_prints=True)
def register_flow(params_path: str = "params.yaml", checkpoints: str = "checkpoints",
                  metrics_path: str = "reports/metrics.json", shards: str = "data/shards",
                  out: str | None = "reports/registry.json", promote: bool | None = None) -> dict:
    """Register the evaluated components (challenger), then run the gate when `promote` (default:
    register.auto_promote)."""
    from tasks.registry.register import write_report

    tracking.join_flow_pipeline_run()
    cfg = load_params(params_path, "register")
    result = jobs.register_task(params_path, checkpoints, metrics_path, shards)
    if cfg.get("auto_promote", True) if promote is None else promote:
        eval_cfg = load_params(params_path).get("evaluate") or {}
        result["gate"] = jobs.promote_task(cfg["gate"], eval_cfg, shards, None, False)
        _gate_artifact(result["gate"])
    return write_report(result, out)


@flow(name="abair-promote", log_prints=True)
def promote_flow(params_path: str = "params.yaml", dry_run: bool = False, challenger: str | None = None,
                 shards: str = "data/shards", overrides: list[str] | None = None) -> dict:
    """Compare the challenger with the champion on one evaluation suite and move `champion` when
    the gate (params: register.gate) passes."""
    cfg = load_params(params_path, "register", overrides or ())
    eval_cfg = load_params(params_path).get("evaluate") or {}
    result = jobs.promote_task(cfg["gate"], eval_cfg, shards, challenger, dry_run)
    _gate_artifact(result)
    return result


@flow(name="abair-add-degradation", log_prints=True)
def add_degradation_flow(name: str, data: str | None = None, params_path: str = "params.yaml",
                         overrides: list[str] | None = None, base: str = "checkpoints", out: str | None = None,
                         shards: str = "data/shards", promote: bool = False) -> dict:
    """One new adapter + the estimator refit with K+1 outputs, evaluated and registered."""
    from tasks.registry import add_degradation as steps

    steps.check_name(name, data)
    out = str(out or steps.default_out(name))
    reports = f"reports/add-degradation/{name}"
    params = steps.effective_params(params_path, overrides or [], name, data)
    stage = str(steps.staging_dir(out))
    prepared = jobs.prepare_degradation_task(name, base, stage)
    adapter = jobs.new_adapter_task(params, name, stage, shards, reports)
    estimator = jobs.refit_estimator_task(params, stage, shards, reports)
    unchanged = jobs.check_unchanged_task(stage, prepared["base_dir_hashes"])
    metrics = jobs.evaluate_candidate_task(params.get("evaluate") or {}, stage, shards)
    return jobs.publish_degradation_task(name, params, stage, out, metrics, shards, reports, prepared, adapter,
                                         estimator, unchanged, promote)


