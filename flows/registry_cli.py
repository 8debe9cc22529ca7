"""`abair register | promote | rollback | restore | add-degradation`. Kept apart from
flows/registry.py so the CLI starts without importing Prefect."""

from __future__ import annotations

from tasks.core import paths
from tasks.core.params import Params


def cmd_register(args) -> None:
    from tasks.registry import gate, register
    from tasks.serve.pyfunc import save_restorer

    promote = None if args.promote is None else args.promote
    if args.runner == "prefect":
        from flows.registry import register_flow

        register_flow(args.params, args.checkpoints, args.metrics, args.shards, args.out, promote)
        return
    if promote is None:
        register.register_stage(args.params, args.set, args.checkpoints, args.metrics, args.shards, args.out,
                                save_restorer=save_restorer)
        return
    params = Params.read(args.params, args.set or (), within="register")
    result = register.register_evaluated(params.values, args.checkpoints, args.metrics, args.shards,
                                         save_restorer=save_restorer)
    if promote:
        result["gate"] = gate.promote(params.section("register")["gate"],
                                      eval_cfg=params.section("evaluate", optional=True), shards=args.shards)
    register.write_report(result, args.out)


def cmd_promote(args) -> None:
    from tasks.registry import gate

    if args.runner == "prefect":
        from flows.registry import promote_flow

        promote_flow(args.params, args.dry_run, args.challenger, args.shards, list(args.set or ()))
        return
    params = Params.read(args.params, args.set or (), within="register")
    gate.promote(params.section("register")["gate"], eval_cfg=params.section("evaluate", optional=True), shards=args.shards,
                 challenger=args.challenger, dry_run=args.dry_run)


def cmd_rollback(args) -> None:
    from tasks.registry import gate

    gate.rollback()


def cmd_restore(args) -> None:
    from tasks.core import imageio
    from tasks.serve.restore import restore_files

    restore_files(args.inputs, model=args.model, out=args.out, mode=args.mode, device=args.device,
                  max_pixels=args.max_pixels or None, overwrite=args.overwrite, quality=args.quality,
                  progress=False if args.no_progress else None, tiling=args.tiling,
                  max_image_pixels=args.max_image_pixels or imageio.MAX_IMAGE_PIXELS, memory_budget=args.memory_budget,
                  pw_source=args.pw_source, save_maps=args.save_maps, backend=args.backend, precision=args.precision)


def cmd_add_degradation(args) -> None:
    if args.runner == "prefect":
        from flows.add_degradation import add_degradation_flow

        add_degradation_flow(args.name, args.data, args.params, list(args.set or ()), args.base, args.out, args.shards,
                             args.promote)
        return
    from tasks.registry.add_degradation import add_degradation
    from tasks.serve.pyfunc import save_restorer

    add_degradation(args.name, args.params, list(args.set or ()), data=args.data, base=args.base, out=args.out,
                    shards=args.shards, promote=args.promote, save_restorer=save_restorer)


def add_commands(sub, with_params) -> None:
    from tasks.serve import backends
    from tasks.serve.inference import PW_SOURCES, SERVED_MODES
    from tasks.serve.restore import DEFAULT_MAX_PIXELS, DEFAULT_MODEL

    def runner(p, default="local"):
        p.add_argument("--runner", choices=["local", "prefect"], default=default,
                       help="local: plain calls in this process (default); prefect: the Prefect flow (retries, UI)")
        return p

    p = runner(with_params(sub.add_parser("register", help="register the evaluated components in MLflow (alias challenger), "
                                                           "then run the promotion gate (register.auto_promote)")))
    p.add_argument("--checkpoints", default=paths.CHECKPOINTS)
    p.add_argument("--metrics", default=paths.METRICS)
    p.add_argument("--shards", default=paths.SHARDS)
    p.add_argument("--out", default=paths.REGISTRY_REPORT, help="report of what was registered and the gate verdict")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--promote", dest="promote", action="store_const", const=True, default=None,
                       help="run the gate after registering (default: register.auto_promote)")
    group.add_argument("--no-promote", dest="promote", action="store_const", const=False)
    p.set_defaults(func=cmd_register)

    p = runner(with_params(sub.add_parser("promote", help="gate the challenger against the champion; move `champion` on pass")))
    p.add_argument("--dry-run", action="store_true", help="print the comparison table, change nothing")
    p.add_argument("--challenger", metavar="VERSION", help="an abair-restorer version (default: the `challenger` alias)")
    p.add_argument("--shards", default=paths.SHARDS, help="shard set the evaluation suite draws from (re-evaluation)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move `champion` back to the `previous` version")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("restore", help="restore images (files, folders or globs) with a registered or local model")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"models:/NAME@ALIAS, models:/NAME/VERSION or a folder of components (default: {DEFAULT_MODEL})")
    p.add_argument("--mode", choices=SERVED_MODES, default="sw",
                   help="sw: soft blend of adapters (default); oh: the best one; pw: a blend per pixel (a weight map); "
                        "none: the backbone alone")
    p.add_argument("--pw-source", choices=PW_SOURCES,
                   help="where mode pw's weight map comes from: dense (the estimator's dense head) or seg (the backbone's "
                        "segmentation head, one extra backbone pass); default: dense where the system has it, else seg")
    p.add_argument("--save-maps", action="store_true",
                   help="mode pw: also write a picture of each image's weight map beside it (<output stem>.map.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--backend", choices=backends.names(), default=backends.DEFAULT_BACKEND,
                   help="torch: the project's models (default); onnxruntime: a release folder's ONNX graphs "
                        "(abair export --onnx), without torch or MLflow; fp32, --tiling auto or local")
    p.add_argument("--precision", choices=backends.PRECISIONS, default="fp32",
                   help="fp32 (default); torch backend: bf16 (CPU or CUDA autocast) or fp16 (CUDA only); "
                        "onnxruntime: fp32 only")
    p.add_argument("--out", default="restored", help="output folder (default: restored); inputs are never overwritten")
    p.add_argument("--overwrite", action="store_true", help="allow writing over an input file")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"per-tile pixel budget; larger images run in tiles (default: {DEFAULT_MAX_PIXELS}; 0: whole)")
    p.add_argument("--tiling", choices=["auto", "exact", "local"], default="auto",
                   help="auto: exact where it fits the memory budget, else local (default); exact: tiles inside the "
                        "network, the same pixels as whole-image inference; local: independent overlapping tiles, "
                        "the network's memory independent of the image size, slightly different pixels "
                        "(--backend onnxruntime: auto is whole within --max-pixels, else local; exact is refused)")
    p.add_argument("--memory-budget", default="2GB",
                   help="memory a restore may add, e.g. 2GB, 800MB (default: 2GB; 0: no budget); images no tiling "
                        "fits are refused before decoding")
    p.add_argument("--max-image-pixels", type=int,
                   help="refuse images larger than this many pixels before decoding them (default: 100000000); "
                        "not the tile budget: larger images than --max-pixels still restore in tiles")
    p.add_argument("--quality", type=int, help="JPEG output quality (default: the input's, estimated)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_restore)

    p = runner(with_params(sub.add_parser("add-degradation", help="a new degradation: one new adapter + estimator refit "
                                                                  "(K+1 outputs), evaluated and registered")))
    p._option_string_actions["--set"].help = "override any params value, section first, e.g. --set adapters.steps=300"
    p.add_argument("name", help="degradation, e.g. jpeg, bitdepth or snow")
    p.add_argument("--data", metavar="FOLDER", help="paired folder (input/, target/) instead of synthetic samples")
    p.add_argument("--base", default=paths.CHECKPOINTS, help="components to extend: a folder or models:/abair-restorer@champion")
    p.add_argument("--out", help="folder for the extended components (default: checkpoints/with-NAME)")
    p.add_argument("--shards", default=paths.SHARDS)
    p.add_argument("--promote", action="store_true", help="run the promotion gate after registering")
    p.set_defaults(func=cmd_add_degradation)
