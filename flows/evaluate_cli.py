"""`abair evaluate`. Kept apart from flows/evaluate.py so the CLI starts without importing Prefect."""

from __future__ import annotations

from tasks.core import paths
from tasks.core.params import load_params


def cmd_evaluate(args) -> None:
    if args.runner == "prefect":
        from flows.evaluate import evaluate_flow

        evaluate_flow(params_path=args.params, overrides=list(args.set or ()), checkpoints=args.checkpoints,
                      shards=args.shards, reports=args.reports)
        return
    from tasks.evaluate.stage import evaluate

    cfg = load_params(args.params, "evaluate", args.set or ())
    evaluate(cfg, checkpoints=args.checkpoints, shards=args.shards, reports=args.reports, progress=not args.no_progress)


def add_commands(sub, with_params) -> None:
    p = with_params(sub.add_parser("evaluate", help="paper-style evaluation: known, unseen, mixed and per-region degradations"))
    p.add_argument("--checkpoints", default=paths.CHECKPOINTS,
                   help="folder with backbone.safetensors, adapters/, estimator.safetensors")
    p.add_argument("--shards", default=paths.SHARDS, help="shard set whose validation images the synthetic sets use")
    p.add_argument("--reports", default=paths.REPORTS, help="writes metrics.json, summary.json, results.md and plots/ here")
    p.add_argument("--runner", choices=["local", "prefect"], default="local",
                   help="local: run in this process (default); prefect: as a flow, with table and markdown artifacts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)
