"""`abair evaluate` and the Prefect evaluation flow: the same work (tasks.evaluate.stage.evaluate), and
in the flow the paper's tables published as Prefect table and markdown artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import jobs

from tasks.core import tracking
from tasks.core.params import load_params

log = logging.getLogger(__name__)

TABLE_DESCRIPTIONS = {
    "known": "Table 1: known degradations (PSNR/SSIM per set, params)",
    "unseen": "Table 2: unseen degradations",
    "mixed": "Table 3: mixed degradations",
    "modes": "OH vs SW vs oracle per group",
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
def evaluate_flow(params_path: str = "params.yaml", overrides: list[str] | None = None,
                  checkpoints: str = "checkpoints", shards: str = "data/shards", reports: str = "reports") -> dict:
    tracking.join_flow_pipeline_run()
    cfg = load_params(params_path, "evaluate", list(overrides or []))
    metrics = jobs.evaluate_task(cfg, checkpoints, shards, reports)
    publish_artifacts(metrics, cfg, reports)
    return metrics
