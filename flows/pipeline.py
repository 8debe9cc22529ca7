"""The whole pipeline as Prefect flows, for teams that orchestrate with Prefect rather than
`dvc repro` (which stays the main job, and what the scheduled `retrain` deployment runs).

    synthesize_flow  clean images -> shards
    pipeline_flow    synthesize -> training (Phases I-III) -> evaluate -> register (+ gate)

Each step is the same Prefect task (retries declared there) the other flows use.
"""

from __future__ import annotations


from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_unless_bad_input

from tasks.core import paths, tracking
from tasks.core.params import load_params


@task(name="synthesize", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def synthesize_task(cfg: dict, source: str | None = None, out: str | None = None) -> dict:
    from flows.synthesize import run_synthesize

    return run_synthesize(cfg, source=source, out=out, progress=False)


@flow(name="abair-synthesize")
def synthesize_flow(params_path: str = paths.PARAMS, source: str | None = None, out: str = paths.SHARDS,
                    overrides: list[str] | None = None) -> dict:
    cfg = load_params(params_path, "synthesize", overrides or ())
    index = synthesize_task(cfg, source, out)
    counts = index["counts"]
    lines = [f"## Shards: {counts['samples']} samples from {counts['sources_used']} images ({out})", "",
             "| class | pixel fraction |", "|---|---|"]
    lines += [f"| {name} | {fraction:.3f} |" for name, fraction in index["pixel_fractions"].items()]
    if index["skipped"]:
        lines += ["", f"Skipped {len(index['skipped'])} source(s): " +
                  "; ".join(f"{s['source']} ({s['reason']})" for s in index["skipped"][:20])]
    create_markdown_artifact("\n".join(lines), key="abair-shards", description="synthesize summary")
    return index


@flow(name="abair-pipeline")
def pipeline_flow(params_path: str = paths.PARAMS, source: str | None = None, shards: str = paths.SHARDS,
                  checkpoints: str = paths.CHECKPOINTS, reports: str = paths.REPORTS) -> dict:
    """Every stage in order, under one MLflow parent run."""
    from flows.evaluate import evaluate_flow
    from flows.registry import register_flow
    from flows.training import training_flow

    tracking.join_flow_pipeline_run()
    index = synthesize_flow(params_path, source, shards)
    trained = training_flow(params_path, shards, checkpoints, f"{reports}/training")
    metrics = evaluate_flow(params_path, checkpoints=checkpoints, shards=shards, reports=reports)
    registered = register_flow(params_path, checkpoints, f"{reports}/metrics.json", shards, f"{reports}/registry.json")
    return {"samples": index["counts"]["samples"], "estimator": trained["estimator"],
            "sw_psnr": metrics.get("summary/all/sw/psnr"), "gate": (registered.get("gate") or {}).get("passed")}
