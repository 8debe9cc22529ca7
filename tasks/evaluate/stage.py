"""The `evaluate` stage: the ABAIR paper's tables, computed from this pipeline's own models.

The sets and the protocol are tasks.evaluate.sets', the modes tasks.evaluate.run's. Outputs in
the reports folder, each replaced atomically:

    metrics.json   every number: flat `<group>/<set>/<mode>/<metric>` keys plus per-group summaries,
                   the estimator's accuracy and the parameter counts (the registry's input)
    summary.json   its short view, DVC's metrics: per group, the served mode's PSNR / SSIM, its
                   gain over the input and its "made worse" share; the estimator's accuracy
    results.md     paper-like tables (tasks.evaluate.tables)
    plots/         radar, bars per group, estimator confusion, strips (tasks.evaluate.plots)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tasks.core import paths, storage
from tasks.core.errors import AbairError
from tasks.evaluate.plots import write_plots
from tasks.evaluate.run import (
    SetResult, adapter_names, build_metrics, estimator_confusion, evaluate_set, mode_plan, pixelwise_ready,
    summary_metrics,
)
from tasks.evaluate.sets import load_set, parse_sets, protocol, set_folder, suite_fingerprint
from tasks.evaluate.tables import mode_label, results_markdown

log = logging.getLogger(__name__)


def pw_source_of(cfg: dict) -> str | None:
    """evaluate.pw_source: where mode pw's maps come from (null: the restorer's default, a dense
    estimator head when there is one, else the backbone's segmentation head)."""
    from models.restorer import PW_SOURCES

    source = cfg.get("pw_source")
    if source is not None and source not in PW_SOURCES:
        raise AbairError("evaluate.pw_source", f"must be one of {list(PW_SOURCES)} or null, got {source!r}")
    return source


def load_restorer(checkpoints: str, device, cfg: dict | None = None) -> Any:
    """The system in a checkpoints folder: backbone required; adapters and estimator optional
    (their modes are then skipped, with a warning). When mode pw is evaluated (`cfg`'s modes) and
    its maps may come from the segmentation head (evaluate.pw_source seg, or null with an estimator
    without a dense head), the backbone keeps that head; otherwise it is dropped, as it changes no
    restored pixel (and the parameter counts stay those of what runs)."""
    from tasks.core.components import load_system
    from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE

    folder = Path(checkpoints)
    backbone = folder / BACKBONE_FILE
    if not backbone.is_file():
        raise AbairError(backbone, "backbone checkpoint not found (run the training stages first)")
    adapters = folder / ADAPTER_DIR
    adapters = adapters if adapters.is_dir() and any(adapters.glob("*.safetensors")) else None
    estimator = folder / ESTIMATOR_FILE
    estimator = estimator if estimator.is_file() and adapters is not None else None
    if adapters is None:
        log.warning("evaluate: no adapters in %s: only the input and backbone modes run", folder)
    elif estimator is None:
        log.warning("evaluate: no estimator in %s: OH and SW do not run", folder)
    cfg = cfg or {}
    source = pw_source_of(cfg)
    wants_seg = "pw" in protocol(cfg)["modes"] and source != "dense" and adapters is not None
    restorer = load_system(backbone, adapters, estimator, device, keep_seg_head=wants_seg)
    dense = restorer.estimator is not None and getattr(restorer.estimator, "has_dense", False)
    if wants_seg and source is None and dense and restorer.backbone.seg_head is not None:
        restorer.backbone.drop_seg_head()      # the dense head makes the maps
    return restorer


def _device(spec: str):
    from tasks.core.device import pick_device

    return pick_device(str(spec or "auto"))


def evaluate_restorer(restorer, cfg: dict, shards: str = paths.SHARDS, reports: str | None = paths.REPORTS,
                      progress: bool = True, info: dict | None = None) -> dict:
    """Evaluate any restorer (an object with restore(images, mode, weights, ...) and `names`) on
    the suite of `cfg`; writes the reports when `reports` is given; returns the flat metrics."""
    from models.restorer import param_counts
    from tqdm import tqdm

    started = time.perf_counter()
    specs = parse_sets(cfg)
    proto = protocol(cfg)
    device = _device(cfg.get("device", "auto"))
    cache = cfg.get("cache", paths.EVAL_CACHE)
    names = adapter_names(restorer)
    has_estimator = bool(names) and getattr(restorer, "estimator", None) is not None
    has_pw = pixelwise_ready(restorer)
    if "pw" in proto["modes"] and names and not has_pw:
        log.warning("evaluate: mode pw skipped: the estimator has no dense head and the backbone no segmentation head")

    folders = [set_folder(spec, shards, cache) for spec in specs]
    # Every file of every set is read once up front, so a bad one stops the run before any model
    # time is spent; the sets are then loaded again one at a time, keeping memory to one set.
    sizes = [len(load_set(spec, folder, proto["multiple"]).inputs) for spec, folder in zip(specs, folders)]
    plans = [mode_plan(spec, names, has_estimator, proto["modes"], has_pw) for spec in specs]
    passes = sum(n * len({(m, w) for _, m, w in plan if m != "input"}) for n, plan in zip(sizes, plans))
    log.info("evaluate: %d sets, %d images, adapters %s, estimator %s, %d image passes on %s",
             len(specs), sum(sizes), names or "none", "yes" if has_estimator else "no", passes, device)
    results: list[SetResult] = []
    previous_threads = torch.get_num_threads()
    if cfg.get("threads") and device.type == "cpu":
        torch.set_num_threads(int(cfg["threads"]))
    try:
        with tqdm(total=passes, desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
            for spec, folder, plan in zip(specs, folders, plans):
                bar.set_postfix_str(f"{spec.group}/{spec.name}")
                ls = load_set(spec, folder, proto["multiple"])
                res = evaluate_set(restorer, ls, plan, cfg, device, bar)
                results.append(res)
                log.info("evaluate: %s/%s (%d images) PSNR %s", ls.spec.group, ls.spec.name, res.images,
                         ", ".join(f"{k} {res.mean(k, 'psnr'):.2f}" for k in res.per_image))
    finally:
        torch.set_num_threads(previous_threads)

    counts = param_counts(getattr(restorer, "backbone", None), getattr(restorer, "bank", None),
                          getattr(restorer, "estimator", None))
    confusion = estimator_confusion(results, names) if has_estimator else None
    metrics = build_metrics(results, counts, confusion)
    elapsed = time.perf_counter() - started
    if reports is not None:
        info = {"checkpoints": "-", "suite": suite_fingerprint(cfg, shards), "device": str(device), "protocol": proto,
                **(info or {})}
        write_reports(metrics, results, confusion, info, Path(reports), int(cfg.get("strip_crop", 96)))
    shown = next((m for m in ("sw", "none", "input") if f"summary/all/{m}/psnr" in metrics), None)
    log.info("evaluate: done in %.1f s; mean PSNR %s%s", elapsed,
             f"{metrics[f'summary/all/{shown}/psnr']:.2f} dB ({mode_label(shown)})" if shown else "-",
             f" -> {reports}" if reports is not None else "")
    return metrics


def write_reports(metrics: dict, results: list[SetResult], confusion: dict | None, info: dict, reports: Path,
                  strip_crop: int) -> dict[str, Path]:
    """metrics.json, summary.json, results.md and plots/, each replaced atomically."""
    reports.mkdir(parents=True, exist_ok=True)
    with storage.atomic_dir(reports / "plots") as tmp:
        write_plots(metrics, results, confusion, tmp, strip_crop)
    with storage.atomic_path(reports / "results.md") as tmp:
        tmp.write_text(results_markdown(metrics, results, confusion, info))
    with storage.atomic_path(reports / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with storage.atomic_path(reports / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary_metrics(metrics), indent=2) + "\n")
    return {"metrics": reports / "metrics.json", "summary": reports / "summary.json", "results": reports / "results.md",
            "plots": reports / "plots"}


def evaluate(cfg: dict, checkpoints: str = paths.CHECKPOINTS, shards: str = paths.SHARDS, reports: str | None = paths.REPORTS,
             progress: bool = True) -> dict:
    """Run the stage. `cfg` is the `evaluate` params section. Loads the system from `checkpoints`
    (backbone.safetensors, adapters/*.safetensors, estimator.safetensors), writes reports (and
    logs an MLflow run) when `reports` is given, and returns the flat metrics dict (metrics.json)."""
    device = _device(cfg.get("device", "auto"))
    restorer = load_restorer(checkpoints, device, cfg)
    info = {"checkpoints": checkpoints}
    if reports is None:
        return evaluate_restorer(restorer, cfg, shards, None, progress, info)

    from tasks.core import tracking

    suite = suite_fingerprint(cfg, shards)
    with tracking.start_run("evaluate", tags={"abair.stage": "evaluate", "abair.suite": suite}) as run:
        run.log_params({k: v for k, v in cfg.items() if k not in ("sets", "defaults")})
        run.log_params({"sets": [s.name for s in parse_sets(cfg)], "suite": suite, "checkpoints": checkpoints})
        metrics = evaluate_restorer(restorer, cfg, shards, reports, progress, {**info, "suite": suite})
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        folder = Path(reports)
        run.log_artifact(folder / "metrics.json")
        run.log_artifact(folder / "results.md")
        for path in sorted((folder / "plots").rglob("*.png")):
            run.log_artifact(path, str(path.parent.relative_to(folder)))
    return metrics
