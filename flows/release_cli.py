"""`abair export`: a release folder (weights, config.json, MODEL_CARD.md, optional ONNX graphs) from a
registry version or a components folder (tasks/release/bundle.py)."""

from __future__ import annotations

from tasks.core import paths


def cmd_export(args) -> None:
    from tasks.release.bundle import export_release

    export_release(args.source, args.out, onnx=args.onnx, merge=args.merge or (), force=args.force,
                   facts_from=args.facts_from)


def add_commands(sub, with_params) -> None:
    p = sub.add_parser("export", help="a self-contained release folder with a generated model card (and ONNX graphs)")
    p.add_argument("source", help="models:/abair-restorer@ALIAS, models:/abair-restorer/VERSION, a components folder "
                                  f"(like {paths.CHECKPOINTS}/) or a downloaded pyfunc model folder")
    p.add_argument("--out", required=True, help="the release folder to write (must not exist, unless --force)")
    p.add_argument("--onnx", action="store_true", help="also export ONNX graphs, checked against the torch model")
    p.add_argument("--merge", action="append", metavar="NAME",
                   help="with --onnx: also a single-adapter graph with adapter NAME folded in (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing release folder at --out")
    p.add_argument("--facts-from", metavar="PROJECT_DIR",
                   help="for a components folder: the project checkout it was trained in, whose params.yaml, "
                        "reports/ and shard index fill the model card (its checkpoints/ must hold the same files)")
    p.set_defaults(func=cmd_export)
