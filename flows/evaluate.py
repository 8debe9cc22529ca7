"""`abair evaluate` and the Prefect evaluation flow: the same work (tasks.evaluate.evaluate), and
in the flow the paper's tables published as Prefect table and markdown artifacts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import jobs
from tasks.params import load_params

log = logging.getLogger(__name__)

TABLE_DESCRIPTIONS = {
    "known": "Table 1: known degradations (PSNR/SSIM per set, params)",
    "unseen": "Table 2: unseen degradations",
    "mixed": "Table 3: mixed degradations",
    "modes": "OH vs SW vs oracle per group",
}


def publish_artifacts(metrics: dict, cfg: dict, reports: str | None) -> None:
    """One table artifact per paper table, plus results.md as a markdown artifact."""
    from tasks.evaluate import paper_tables

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
    os.environ.setdefault("ABAIR_PIPELINE_RUN", f"prefect-{os.getpid()}")
    cfg = load_params(params_path, "evaluate", list(overrides or []))
    metrics = jobs.evaluate_task(cfg, checkpoints, shards, reports)
    publish_artifacts(metrics, cfg, reports)
    return metrics


def cmd_evaluate(args) -> None:
    if args.runner == "prefect":
        evaluate_flow(params_path=args.params, overrides=list(args.set or ()), checkpoints=args.checkpoints,
                      shards=args.shards, reports=args.reports)
        return
    from tasks.evaluate import evaluate

    cfg = load_params(args.params, "evaluate", args.set or ())
    evaluate(cfg, checkpoints=args.checkpoints, shards=args.shards, reports=args.reports, progress=not args.no_progress)


def add_commands(sub, with_params) -> None:
    p = with_params(sub.add_parser("evaluate", help="paper-style evaluation: known, unseen and mixed degradations"))
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder with backbone.safetensors, adapters/, estimator.safetensors")
    p.add_argument("--shards", default="data/shards", help="shard set whose validation images the synthetic sets use")
    p.add_argument("--reports", default="reports", help="writes metrics.json, results.md and plots/ here")
    p.add_argument("--runner", choices=["local", "prefect"], default="local",
                   help="local: run in this process (default); prefect: as a flow, with table and markdown artifacts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)
