"""`abair evaluate` and the Prefect evaluation flow: the same work (tasks.evaluate.stage.evaluate), and
in the flow the paper's tables published as Prefect table and markdown artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_unless_bad_input

from tasks.core import paths, tracking
from tasks.core.params import load_params

log = logging.getLogger(__name__)


@task(name="evaluate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def evaluate_task(cfg: dict, checkpoints: str, shards: str, reports: str | None) -> dict:
    from tasks.evaluate.stage import evaluate

    return evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=reports, progress=False)

@task(name="evaluate-candidate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def evaluate_candidate_task(cfg: dict, checkpoints: str, shards: str) -> dict:
    """Evaluate a folder of components without touching reports/ (the DVC stage's outputs)."""
    from tasks.evaluate.stage import evaluate

    return evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=None, progress=False)

TABLE_DESCRIPTIONS = {
    "known": "Table 1: known degradations (PSNR/SSIM per set, params)",
    "unseen": "Table 2: unseen degradations",
    "mixed": "Table 3: mixed degradations",
    "regions": "Regions with different degradations (with PW and the pixel-wise oracle)",
    "modes": "OH vs SW vs PW vs oracle per group",
}


def publish_artifacts(metrics: dict, cfg: dict, reports: str | None) -> None:
    """One table artifact per paper table, plus results.md as a markdown artifact."""
    from tasks.evaluate.tables import paper_tables

    for name, rows in paper_tables(metrics, cfg).items():
        if rows:
            create_table_artifact(table=rows, key=f"abair-eval-{name}", description=TABLE_DESCRIPTIONS.get(name, name))
    results = Path(reports, "results.md") if reports is not None else None
    if results is not None and results.is_file():
        # Plots are files next to results.md; a Prefect markdown artifact cannot show them.
        create_markdown_artifact(results.read_text(), key="abair-eval-results", description="ABAIR evaluation report")


@flow(name="abair-evaluate")
def evaluate_flow(params_path: str = paths.PARAMS, overrides: list[str] | None = None,
                  checkpoints: str = paths.CHECKPOINTS, shards: str = paths.SHARDS, reports: str = paths.REPORTS) -> dict:
    tracking.join_flow_pipeline_run()
    cfg = load_params(params_path, "evaluate", list(overrides or []))
    metrics = evaluate_task(cfg, checkpoints, shards, reports)
    publish_artifacts(metrics, cfg, reports)
    return metrics
