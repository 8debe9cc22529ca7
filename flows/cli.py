"""`abair`: the command line. Each subcommand runs the plain stage function (what `dvc repro`
calls); `abair flow ...` runs the same work as Prefect flows. A command reads params.yaml (with
its `--set` overrides) once and hands the stage its section. The commands are one table
(COMMANDS): adding one is one entry. Heavy imports stay inside the subcommands so `abair
--help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

from tasks.core import paths
from tasks.core.errors import AbairError

# Prefect's ephemeral server (used when PREFECT_API_URL is unset) gets 20 s to start and SQLite
# 5-10 s per lock by default: too little on a busy 2-core machine. Users' own settings win; set
# when a command runs, never on import.
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
                    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30"}


def user_error(exc: BaseException) -> bool:
    """AbairError, or the models package's CheckpointError: the same one-line `where: problem`
    kind. (models is only looked up if it was imported, so the CLI starts without torch.)"""
    checkpoint = sys.modules.get("models.checkpoint")
    return isinstance(exc, AbairError) or (checkpoint is not None and isinstance(exc, checkpoint.CheckpointError))


def stage_params(args, section: str) -> dict:
    """The command's params section: the params file with the command's --set overrides."""
    from tasks.core.params import load_params

    return load_params(args.params, section, args.set or ())


def cmd_synthesize(args) -> None:
    from flows.synthesize import run_synthesize

    cfg = stage_params(args, "synthesize")
    if args.count is not None:
        cfg["samples_per_image"] = args.count
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.workers is not None:
        cfg["workers"] = args.workers
    run_synthesize(cfg, source=args.source, out=args.out)


def cmd_degrade(args) -> None:
    import numpy as np

    import degradations
    from tasks.core import imageio

    img = imageio.read_image(args.input)
    if min(img.shape[:2]) < 2:
        raise AbairError(args.input, f"image is too small ({img.shape[1]}x{img.shape[0]})")
    if not 0.0 <= args.severity <= 1.0:
        raise AbairError("--severity", f"must be in [0, 1], got {args.severity}")
    try:
        module = degradations.get(args.type)
    except ValueError as exc:
        raise AbairError("--type", str(exc)) from None
    degraded, params = module.apply(img, np.random.default_rng(args.seed), args.severity)
    imageio.write_image(args.output, degraded)
    print(f"{args.output}: {args.type} severity {args.severity} seed {args.seed} {params}")


def cmd_preview(args) -> None:
    from tasks.data.preview import write_preview

    real = {}
    for item in args.real or ():
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise SystemExit(f"abair preview: --real wants NAME=FOLDER, got {item!r}")
        real[name] = folder
    sheet = write_preview(args.output, stage_params(args, "synthesize"), seed=args.seed, real=real)
    print(f"{args.output}: {sheet.shape[1]}x{sheet.shape[0]} contact sheet")


def cmd_pretrain(args) -> None:
    from tasks.train.pretrain import pretrain

    cfg = stage_params(args, "pretrain")
    summary = pretrain(cfg, shards=args.shards, out=args.out, state_path=args.state, reports=args.reports,
                       resume=args.resume, stop_after=args.stop_after)
    if summary.get("interrupted"):
        raise SystemExit(3)


def cmd_adapter(args) -> None:
    import json

    from tasks.train.adapters import train_adapter
    from tasks.core.storage import atomic_path

    cfg = stage_params(args, "adapters")
    summary = train_adapter(cfg, args.name, backbone_path=args.backbone, shards=args.shards, out_dir=args.out_dir,
                            reports=args.reports, parent_run_id=args.parent_run, force=args.force,
                            progress=not args.no_progress)
    if args.summary:
        with atomic_path(args.summary) as tmp:
            tmp.write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}))


def cmd_adapters(args) -> None:
    cfg = stage_params(args, "adapters")
    if args.runner == "prefect":
        from flows.adapters import run_adapters

        run_adapters(cfg, backbone=args.backbone, shards=args.shards, out_dir=args.out_dir, reports=args.reports)
        return
    from tasks.train.adapters import prune_adapters, train_adapter

    prune_adapters(cfg, args.out_dir)
    for name in cfg["degradations"]:
        train_adapter(cfg, name, backbone_path=args.backbone, shards=args.shards, out_dir=args.out_dir, reports=args.reports)


def cmd_estimator(args) -> None:
    from tasks.train.estimator import train_estimator

    train_estimator(stage_params(args, "estimator"), backbone_path=args.backbone, adapters_dir=args.adapters,
                    shards=args.shards, out=args.out, reports=args.reports)


def cmd_manifest(args) -> None:
    from tasks.data.manifest import source_manifest, write_manifest

    cfg = stage_params(args, "synthesize")
    manifest = source_manifest(args.source or cfg["source"], cfg.get("endpoint_url"))
    changed = write_manifest(manifest, args.out)
    print(f"{args.out}: {len(manifest['files'])} source files, {'changed' if changed else 'unchanged'} ({manifest['hash']})")


def cmd_flow(args) -> None:
    """The whole pipeline (or only synthesis) as Prefect flows instead of DVC stages."""
    from flows.pipeline import pipeline_flow, synthesize_flow

    if args.name == "synthesize":
        synthesize_flow(params_path=args.params, source=args.source)
    else:
        pipeline_flow(params_path=args.params, source=args.source)


def cmd_retrain(args) -> None:
    from flows.retrain import retrain_flow

    result = retrain_flow(source=args.source, profile=args.profile, project_dir=args.project, push=not args.no_push,
                          force=args.force)
    print(f"retrain: {result['status']}")


def cmd_serve(args) -> None:
    """Serve the retrain (on its schedule) and promote flows from this machine: no work pool."""
    from prefect import serve

    from flows.registry import promote_flow
    from flows.retrain import retrain_flow

    serve(retrain_flow.to_deployment(name="retrain", cron=args.cron, parameters={"project_dir": args.project}),
          promote_flow.to_deployment(name="promote"))


def cmd_profile(args) -> None:
    from tasks.core.profiles import apply_profile

    changed = apply_profile(args.profile, args.params)
    print(f"{args.params}: {len(changed)} value(s) changed by profile {args.profile}" +
          "".join(f"\n  {key}" for key in changed))


def with_params(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--params and --set: the options of every command that reads a params section."""
    p.add_argument("--params", default=paths.PARAMS, help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a value of this stage's params section, e.g. --set crop_size=128")
    return p


def arg(*names: str, **options) -> tuple[tuple[str, ...], dict]:
    """One option or positional of a command, as argparse's add_argument takes it."""
    return names, options


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable
    args: tuple = ()
    params: bool = False  # reads a params section: --params and --set first


ADAPTER_PATHS = (arg("--backbone", default=paths.BACKBONE), arg("--shards", default=paths.SHARDS),
                 arg("--out-dir", default=paths.ADAPTERS), arg("--reports", default=paths.ADAPTER_REPORTS))

COMMANDS: tuple[Command, ...] = (
    Command("synthesize", "clean images -> degraded webdataset shards", cmd_synthesize, params=True, args=(
        arg("--source", help="folder, s3://bucket/prefix, `samples` or gldv2:ROOT?split=train&subset=clean (default: params)"),
        arg("--out", help="folder or s3://bucket/prefix for the shards (default: params)"),
        arg("--count", type=int, help="samples per source image"),
        arg("--seed", type=int),
        arg("--workers", type=int))),
    Command("pretrain", "Phase I: train the backbone (+ segmentation head) on shards", cmd_pretrain, params=True, args=(
        arg("--shards", default=paths.SHARDS),
        arg("--out", default=paths.BACKBONE),
        arg("--state", default=paths.PRETRAIN_STATE, help="resumable training state"),
        arg("--reports", default=paths.TRAINING_REPORTS),
        arg("--resume", choices=["auto", "always", "never"], default="auto",
            help="auto: continue an interrupted run with the same inputs (default)"),
        arg("--stop-after", type=int, help="stop (with a resumable checkpoint) after this many steps"))),
    Command("adapters", "Phase II: one adapter per degradation (concurrent jobs)", cmd_adapters, params=True, args=(
        *ADAPTER_PATHS,
        arg("--runner", choices=["prefect", "local"], default="prefect",
            help="prefect: concurrent jobs in a Prefect flow (default); local: one after another in this process"))),
    Command("adapter", "Phase II: train one adapter (skipped when up to date)", cmd_adapter, params=True, args=(
        *ADAPTER_PATHS,
        arg("name", help="degradation, e.g. rain"),
        arg("--force", action="store_true", help="retrain even when up to date"),
        arg("--parent-run", help="MLflow run to nest this job's run under"),
        arg("--summary", help="write the job summary (JSON) here"),
        arg("--no-progress", action="store_true"))),
    Command("estimator", "Phase III: train the degradation estimator", cmd_estimator, params=True, args=(
        arg("--backbone", default=paths.BACKBONE),
        arg("--adapters", default=paths.ADAPTERS),
        arg("--shards", default=paths.SHARDS),
        arg("--out", default=paths.ESTIMATOR),
        arg("--reports", default=paths.TRAINING_REPORTS))),
    Command("degrade", "apply one degradation to one image", cmd_degrade, args=(
        arg("input"),
        arg("output"),
        arg("--type", required=True, help="degradation name, e.g. rain"),
        arg("--severity", type=float, default=0.5, help="0 (none) to 1 (strongest)"),
        arg("--seed", type=int, default=0))),
    Command("preview", "contact sheet of every degradation and composite samples", cmd_preview, params=True, args=(
        arg("output", nargs="?", default="preview.png"),
        arg("--seed", type=int, default=0),
        arg("--real", nargs="*", metavar="NAME=FOLDER",
            help="real pairs to show beside the model, e.g. noise=../shared/data/train/PolyU_part60"))),
    Command("manifest", "list the clean source files by content (data/source_manifest.json)", cmd_manifest,
            params=True, args=(
        arg("--source", help="folder, s3://bucket/prefix, `samples` or gldv2:ROOT?... (default: params synthesize.source)"),
        arg("--out", default=paths.SOURCE_MANIFEST))),
    Command("flow", "run the pipeline (or synthesis alone) as Prefect flows instead of DVC stages", cmd_flow, args=(
        arg("name", choices=["pipeline", "synthesize"]),
        arg("--params", default=paths.PARAMS),
        arg("--source", help="clean images (default: params synthesize.source)"))),
    Command("retrain", "retrain when the clean source changed (dvc repro, push, gate) as a Prefect flow", cmd_retrain, args=(
        arg("--source", help="set synthesize.source first"),
        arg("--profile", help="apply a params profile first"),
        arg("--project", default=".", help="the project checkout (default: here)"),
        arg("--no-push", action="store_true", help="do not `dvc push` to the default remote"),
        arg("--force", action="store_true", help="run even when nothing changed"))),
    Command("serve", "serve the retrain (scheduled) and promote flows from this machine (flow.serve)", cmd_serve, args=(
        arg("--cron", default="0 3 * * 1", help="retrain schedule (default: Mondays 03:00)"),
        arg("--project", default="."))),
    Command("profile", "merge a params overlay (profiles/NAME.yaml) into params.yaml", cmd_profile, args=(
        arg("action", choices=["apply"]),
        arg("profile", help="a name under profiles/ (gpu, minimal, bench) or a YAML path"),
        arg("--params", default=paths.PARAMS))),
)

# Modules that add their own subcommands: each has add_commands(subparsers, with_params).
COMMAND_MODULES: tuple[str, ...] = ("flows.registry_cli", "flows.evaluate_cli", "flows.release_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abair", description="ABAIR all-in-one image restoration pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        if command.params:
            with_params(p)
        for names, options in command.args:
            p.add_argument(*names, **options)
        p.set_defaults(func=command.run)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub, with_params)
    return parser


def load_adapter_kinds(params_path: str | None) -> None:
    """Adapter kinds from outside the package (params `adapters.kind_modules`) register before any
    command runs: every stage that loads adapter files (estimator, evaluate, register, restore)
    must know them, not only the one that trains them. Nothing is imported when none are listed."""
    from pathlib import Path

    path = Path(params_path or paths.PARAMS)
    if not path.is_file():
        return
    from tasks.core.params import Params

    modules = (Params.read(path).section("adapters", optional=True) or {}).get("kind_modules") or []
    if modules:
        from models.adapters import load_kind_modules

        load_kind_modules(modules)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        # Prefect's client logs every API request through httpx at INFO: noise between our lines.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        load_adapter_kinds(getattr(args, "params", None))
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - user errors become one line; the rest keep their traceback
        if not user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
