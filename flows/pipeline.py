"""The whole pipeline as Prefect flows, for teams that orchestrate with Prefect rather than
`dvc repro` (which stays the main job, and what the scheduled `retrain` deployment runs).

    synthesize_flow  clean images -> shards
    pipeline_flow    synthesize -> training (Phases I-III) -> evaluate -> register (+ gate)

Each step is the same Prefect task (retries declared there) the other flows use.
"""

from __future__ import annotations


from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import jobs

from tasks.core import tracking
from tasks.core.params import load_params


@flow(name="abair-synthesize")
def synthesize_flow(params_path: str = "params.yaml", source: str | None = None, out: str = "data/shards",
                    overrides: list[str] | None = None) -> dict:
    cfg = load_params(params_path, "synthesize", overrides or ())
    index = jobs.synthesize_task(cfg, source, out)
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
def pipeline_flow(params_path: str = "params.yaml", source: str | None = None, shards: str = "data/shards",
                  checkpoints: str = "checkpoints", reports: str = "reports") -> dict:
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
