"""`abair add-degradation NAME`: ABAIR's promise that a new degradation costs one adapter and an
estimator refit with K+1 outputs, nothing else (the paper's "Ours*" row, Table 4).

Steps (each a plain function, wrapped as a Prefect task by the flow):
  prepare   copy the base's backbone and adapters (byte for byte) into a staging folder and grow
            the base estimator by one output
  adapter   train the new adapter on the frozen backbone (a paired folder, or synthetic samples
            from the shard set)
  estimator fine-tune the grown estimator on all K+1 adapters
  check     the backbone and the old adapters are byte-identical to the base's (sha256)
  evaluate  the new system on the evaluation suite (the new task and the old ones)
  publish   the staging folder replaces --out in one rename
  register  new registry versions (the unchanged files keep their existing versions)

The base is a folder of components (default `checkpoints`) or a registry reference; it is never
written to.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import degradations
from models.estimator import load_estimator, save_estimator
from tasks.core import paths
from tasks.core.components import adapter_files, file_sha256
from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE
from tasks.core.errors import AbairError
from tasks.core.params import apply_overrides, load_params, params_hash
from tasks.core.storage import atomic_dir, atomic_path
from tasks.registry import gate, store
from tasks.registry import register as registration
from tasks.registry.register import SaveRestorer
from tasks.train.adapters import train_adapter
from tasks.train.estimator import train_estimator

log = logging.getLogger(__name__)

INIT_FILE = "estimator.init.safetensors"


def default_out(name: str) -> Path:
    return Path(paths.CHECKPOINTS) / f"with-{name}"


def staging_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.staging")


def effective_params(params_path: str, overrides: list[str] | tuple = (), name: str | None = None,
                     data: str | None = None) -> dict:
    """The whole params file with `section.key=value` overrides and the new adapter's data folder."""
    params = apply_overrides(load_params(params_path), overrides)
    if name is not None and data is not None:
        params["adapters"].setdefault("data", {})
        params["adapters"]["data"] = {**(params["adapters"]["data"] or {}), name: str(data)}
    return params


def check_name(name: str, data: str | None) -> None:
    if name not in degradations.names():
        raise AbairError(name, f"unknown degradation; adapters train for the library's degradations "
                               f"({', '.join(degradations.names())}), from synthetic samples or a paired folder (--data)")
    if data is not None and not Path(data).is_dir():
        raise AbairError(data, "paired folder not found (expected input/ and target/ with the same file names)")


def prepare(name: str, base: str, stage: str | Path) -> dict:
    """Stage the base's backbone and adapters, and the base estimator grown to K+1 outputs.
    Returns the sha256 of every staged base file (what `check` compares against)."""
    stage = Path(stage)
    shutil.rmtree(stage, ignore_errors=True)
    (stage / ADAPTER_DIR).mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="abair-base-") as tmp:
        if base.startswith("models:/"):
            version = store.resolve(base)
            if version.name != store.RESTORER:
                raise AbairError(base, f"is a {version.name} version; the base must be an {store.RESTORER} model")
            folder = store.download_components(version, Path(tmp) / "base")
        else:
            if not Path(base).exists():
                raise AbairError(base, "base model folder not found")
            folder = store.components_dir(base)
        if not (folder / ESTIMATOR_FILE).is_file():
            raise AbairError(folder / ESTIMATOR_FILE, "the base has no estimator to grow")
        old = adapter_files(folder / ADAPTER_DIR)
        if any(p.stem == name for p in old):
            raise AbairError(folder / ADAPTER_DIR / f"{name}.safetensors", f"the base already has a {name!r} adapter")
        shutil.copyfile(folder / BACKBONE_FILE, stage / BACKBONE_FILE)
        for path in old:
            shutil.copyfile(path, stage / ADAPTER_DIR / path.name)
        estimator = load_estimator(folder / ESTIMATOR_FILE)
        if not estimator.class_names:
            raise AbairError(folder / ESTIMATOR_FILE, "estimator has no class names to extend")
        before = estimator.num_outputs
        estimator.add_output(name)
        save_estimator(estimator, stage / INIT_FILE)
        hashes = {str(p.relative_to(folder)): file_sha256(p) for p in [folder / BACKBONE_FILE, *old]}
    staged = {rel: file_sha256(stage / rel) for rel in hashes}
    if staged != hashes:
        raise AbairError(stage, "staged copies differ from the base files (disk error?)")
    log.info("add-degradation %s: staged %s (%d adapters), estimator %d -> %d outputs", name, stage, len(old), before,
             before + 1)
    return {"base": base, "base_dir_hashes": hashes, "outputs_before": before}


def train_new_adapter(params: dict, name: str, stage: str | Path, shards: str, reports: str,
                      progress: bool = True) -> dict:
    stage = Path(stage)
    summary = train_adapter(params["adapters"], name, backbone_path=str(stage / BACKBONE_FILE), shards=shards,
                            out_dir=str(stage / ADAPTER_DIR), reports=str(Path(reports) / "adapters"), force=True,
                            progress=progress)
    return {k: v for k, v in summary.items() if k != "losses"}


def refit_estimator(params: dict, stage: str | Path, shards: str, reports: str, progress: bool = True) -> dict:
    stage = Path(stage)
    summary = train_estimator(params["estimator"], backbone_path=str(stage / BACKBONE_FILE),
                              adapters_dir=str(stage / ADAPTER_DIR), shards=shards, out=str(stage / ESTIMATOR_FILE),
                              reports=reports, progress=progress, init=str(stage / INIT_FILE))
    (stage / INIT_FILE).unlink(missing_ok=True)
    return summary


def check_unchanged(stage: str | Path, hashes: dict[str, str]) -> dict:
    """The backbone and every old adapter must be byte-identical to the base's."""
    stage = Path(stage)
    changed = [rel for rel, digest in hashes.items() if file_sha256(stage / rel) != digest]
    if changed:
        raise AbairError(stage, f"files that must not change did: {changed}")
    return {"unchanged": sorted(hashes)}


def publish(stage: str | Path, out: str | Path) -> Path:
    """The staging folder becomes `out` in one rename (an older `out` is replaced whole)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        tmp.rmdir()
        Path(stage).rename(tmp)
    return out


def add_degradation(name: str, params_path: str = paths.PARAMS, overrides: list[str] | tuple = (),
                    data: str | None = None, base: str = paths.CHECKPOINTS, out: str | Path | None = None,
                    shards: str = paths.SHARDS, reports: str | None = None, register: bool = True,
                    promote: bool = False, evaluator: gate.Evaluator | None = None, progress: bool = True,
                    echo: Callable[[str], None] = print, *, save_restorer: SaveRestorer) -> dict:
    """The whole flow as plain calls (the Prefect flow runs the same steps as tasks).
    save_restorer writes the restorer's pyfunc model folder (tasks.serve.pyfunc.save_restorer)."""
    check_name(name, data)
    out = Path(out or default_out(name))
    if Path(base).resolve() == out.resolve():
        raise AbairError("--out", "must differ from --base (the base components are never modified)")
    reports = reports or f"{paths.REPORTS}/add-degradation/{name}"
    params = effective_params(params_path, overrides, name, data)
    evaluator = evaluator or gate.Evaluator()
    stage = staging_dir(out)

    prepared = prepare(name, base, stage)
    adapter = train_new_adapter(params, name, stage, shards, reports, progress)
    estimator = refit_estimator(params, stage, shards, reports, progress)
    unchanged = check_unchanged(stage, prepared["base_dir_hashes"])
    metrics = evaluator.evaluate(params.get("evaluate") or {}, str(stage), shards)
    published = publish(stage, out)
    result = finish(name, params, published, metrics, shards, reports, prepared, adapter, estimator, unchanged,
                    register, promote, evaluator, echo, save_restorer)
    return result


def finish(name: str, params: dict, out: Path, metrics: dict, shards: str, reports: str, prepared: dict, adapter: dict,
           estimator: dict, unchanged: dict, register: bool, promote: bool, evaluator: gate.Evaluator,
           echo: Callable[[str], None], save_restorer: SaveRestorer) -> dict:
    """Write the report, register and (optionally) run the gate."""
    result = {"name": name, "out": str(out), "base": prepared["base"], "outputs": prepared["outputs_before"] + 1,
              "adapter": adapter, "estimator": estimator, "unchanged": unchanged["unchanged"], "metrics": metrics}
    if register:
        params_key = params_hash({"training": registration.training_params_hash(params), "added": name,
                                  "data": (params["adapters"].get("data") or {}).get(name)})
        result["registered"] = registration.register(out, metrics, params=params_key,
                                                     data=registration.data_fingerprint(shards, out),
                                                     suite=evaluator.suite(params.get("evaluate") or {}, shards),
                                                     save_restorer=save_restorer)
        version = result["registered"]["restorer"]["version"]
        echo(f"registered: {store.RESTORER} version {version} (challenger) with adapters "
             f"{', '.join(label.split('.', 1)[1] for label in result['registered']['components'] if label.startswith('adapter.'))}")
        if promote:
            result["gate"] = gate.promote(params["register"]["gate"], eval_cfg=params.get("evaluate") or {},
                                          shards=shards, evaluator=evaluator, echo=echo)
    with atomic_path(Path(reports) / "add_degradation.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str))
    echo(f"{name}: one new adapter, estimator {prepared['outputs_before']} -> {prepared['outputs_before'] + 1} outputs; "
         f"unchanged: {', '.join(unchanged['unchanged'])} -> {out}")
    return result
