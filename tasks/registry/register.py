"""Registering: the component files of a checkpoints folder and the composite restorer become
registry versions, tagged with where they came from and how they scored; and the `register` stage.

Every version carries its file's sha256 (components) or a content hash over all of them and the
training params (restorer), the git commit, the params hash, the data fingerprint, the evaluation
suite and the evaluation metrics (`metric.<key>`). Registering content that is already registered
returns the existing version instead of a duplicate. Either way the version gets `challenger`.

The restorer's pyfunc model folder is written by a `save_restorer(checkpoints, path, metadata)`
the caller passes in (tasks.serve.pyfunc.save_restorer): serving is a higher room than the
registry, so the registry packages the restorer without importing it.

Beside the pyfunc's files, a new restorer version's model folder holds `release_facts.json`
(release_facts): what a model card needs that the tags do not say (the training params, the shard
set's summary and licenses, the training reports, the training runs' timing and device, the
evaluation sets) so that `abair export` can write the card from the version alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from models.adapters import read_adapter_metadata
from tasks.core import paths, storage, tracking
from tasks.core.components import adapter_files, file_sha256
from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE
from tasks.core.errors import AbairError
from tasks.core.params import Params, params_hash
from tasks.core.storage import atomic_path
from tasks.data import reader
from tasks.evaluate.sets import parse_sets
from tasks.registry.gate import Evaluator, promote
from tasks.registry.store import (ADAPTER_PREFIX, BACKBONE, CHALLENGER, COMPONENT_TAG, CONTENT_TAG, ESTIMATOR,
                                  METRIC_TAG, RESTORER, SHA_TAG, SUITE_TAG, aliases, component_refs, numeric_metrics,
                                  registry_client, registry_errors, registry_uri, set_alias)

log = logging.getLogger(__name__)

TRAINING_SECTIONS = ("synthesize", "pretrain", "adapters", "estimator")
# In the restorer's model folder: the facts `abair export` writes into a model card (release_facts).
FACTS_FILE = "release_facts.json"
FACTS_FORMAT = "abair-release-facts/1"
# The training reports a card quotes (reports/training/<name>.json, written by the stages that wrote the files).
TRAINING_REPORT_FILES = ("pretrain", "estimator")
# Run params that say where a phase ran (the runs record the device setting, not the machine).
RUN_DEVICE_PARAMS = ("device", "world_size", "effective_batch", "parallel", "amp", "workers")
# The stage whose run wrote a component file (adapters: the `adapters` stage's job for that adapter).
TRAINING_STAGE = {"backbone": "pretrain", "estimator": "estimator"}
DESCRIPTIONS = {
    RESTORER: "ABAIR all-in-one restorer (pyfunc): backbone + per-degradation adapters + degradation estimator. "
              "predict(uint8 HxWx3 image) -> restored uint8 HxWx3.",
    BACKBONE: "ABAIR Phase I backbone (safetensors), frozen after Phase I.",
    ESTIMATOR: "ABAIR Phase III degradation estimator (safetensors): one weight per adapter.",
}

# save_restorer(checkpoints folder, model folder to create, metadata) -> the model folder written
SaveRestorer = Callable[..., Path]


# ------------------------------------------------------------------------------------------------
# What gets registered


@dataclass(frozen=True)
class Component:
    label: str      # backbone | adapter.<degradation> | estimator
    model: str      # registry name
    path: Path
    sha256: str


def components(checkpoints: str | Path) -> list[Component]:
    """The component files of a checkpoints folder, with their registry names and hashes."""
    folder = Path(checkpoints)
    for required in (BACKBONE_FILE, ESTIMATOR_FILE):
        if not (folder / required).is_file():
            raise AbairError(folder / required, "missing: a registration needs the backbone, the adapters and the estimator")
    found = [Component("backbone", BACKBONE, folder / BACKBONE_FILE, file_sha256(folder / BACKBONE_FILE))]
    for path in adapter_files(folder / ADAPTER_DIR):
        name = read_adapter_metadata(path).get("degradation") or path.stem
        found.append(Component(f"adapter.{name}", ADAPTER_PREFIX + name, path, file_sha256(path)))
    found.append(Component("estimator", ESTIMATOR, folder / ESTIMATOR_FILE, file_sha256(folder / ESTIMATOR_FILE)))
    return found


def content_hash(parts: list[Component], params: str) -> str:
    return params_hash({"components": {c.label: c.sha256 for c in parts}, "params": params})


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD, with `+dirty` when tracked files differ from it; `unknown` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=60)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def training_params_hash(params: Mapping[str, Any]) -> str:
    """Hash of the params sections that shape the model (not evaluation or registry knobs)."""
    return params_hash({k: params.get(k) for k in TRAINING_SECTIONS})


def data_license(shards: str) -> dict | None:
    """What the shard set's licenses come to (index.json's `licenses`, samples per license), the
    share-alike ones and where the full per-image list lives; None for a source without license
    information (the built-in samples, a folder)."""
    index = reader.load_index(shards)
    if not index.get("licenses"):
        return None
    return {"licenses": index["licenses"], "samples": index["counts"]["samples"], "source": index["source"],
            "share_alike": index.get("share_alike", []), "attribution": storage.join(shards, index["attribution"])}


def license_tag(summary: dict) -> str:
    """`CC BY 2.0: 120, CC BY-SA 3.0: 80 (samples); full list: data/shards/ATTRIBUTION.csv`, within
    MLflow's tag length."""
    counts = ", ".join(f"{name}: {n}" for name, n in sorted(summary["licenses"].items(), key=lambda kv: -kv[1]))
    tail = f" (samples); full list: {summary['attribution']}"
    return (counts if len(counts) + len(tail) <= 4000 else counts[:4000 - len(tail) - 3] + "...") + tail


def share_alike_note(summary: dict | None) -> str:
    if not summary or not summary["share_alike"]:
        return ""
    shared = sum(summary["licenses"][name] for name in summary["share_alike"])
    return (f". Trained on share-alike images ({', '.join(summary['share_alike'])}: {shared} of {summary['samples']} "
            f"samples): check what those licenses ask of the model; attribution in {summary['attribution']}")


def data_fingerprint(shards: str, checkpoints: str | Path) -> str:
    """The shard set's hash plus each adapter's data source (a paired folder or synthetic)."""
    index = reader.load_index(shards)
    sources = {p.stem: read_adapter_metadata(p).get("data", "") for p in adapter_files(Path(checkpoints) / ADAPTER_DIR)}
    return params_hash({"shards": index["params_hash"], "adapters": sources})


# ------------------------------------------------------------------------------------------------
# Release facts: what a model card needs beyond the tags


def release_facts(params: Mapping[str, Any], checkpoints: str | Path, shards: str,
                  training_reports: str | Path = paths.TRAINING_REPORTS, metrics: Mapping[str, Any] | None = None,
                  suite: str | None = None, runs_client=None) -> dict:
    """The facts of one trained system that its tags do not hold: the training params sections,
    the shard set's summary (source, counts per split, severities, licenses), the training reports
    (reports/training/pretrain.json, estimator.json), the evaluation sets (as results.md describes
    them), the metrics and suite, and (runs_client: an MlflowClient) the training runs that wrote
    each component file. A fact that is not there is None: a card prints "not recorded"."""
    index = reader.load_index(shards)
    reports = {}
    for name in TRAINING_REPORT_FILES:
        path = Path(training_reports) / f"{name}.json"
        try:
            reports[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            reports[name] = None
    evaluate = params.get("evaluate") or {}
    sets = [{"name": s.name, "group": s.group, "from": s.describe(), "task": list(s.task)}
            for s in parse_sets(evaluate)] if evaluate.get("sets") else None
    return {"format": FACTS_FORMAT,
            "params": {section: params.get(section) for section in TRAINING_SECTIONS},
            "data": shard_summary(index, shards),
            "training": reports,
            "runs": training_runs(checkpoints, runs_client) if runs_client is not None else None,
            "evaluation": {"suite": suite, "sets": sets},
            "metrics": numeric_metrics(metrics) if metrics is not None else None}


def shard_summary(index: Mapping[str, Any], shards: str) -> dict:
    """What the card says about the training data, from the shard set's index.json."""
    generator = index.get("generator") or {}
    splits = {name: {"samples": split.get("samples"), "source_images": len(split.get("sources") or [])}
              for name, split in (index.get("splits") or {}).items()}
    licenses = data_license(shards) if index.get("licenses") else None
    return {"source": index.get("source"), "params_hash": index.get("params_hash"), "classes": index.get("classes"),
            "crop_size": index.get("crop_size"), "splits": splits, "counts": index.get("counts"),
            "severity": generator.get("severity"), "options": generator.get("options"),
            "composite": generator.get("composite"), "licenses": licenses}


def file_metadata(path: str | Path) -> dict[str, str]:
    """A component file's safetensors metadata, without reading its tensors; sorted by key
    (safetensors hands the header out in hash-map order)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return dict(sorted((f.metadata() or {}).items()))


def _run_facts(run) -> dict:
    info, params = run.info, run.data.params
    ended = info.end_time
    return {"run_id": info.run_id, "name": info.run_name, "status": info.status,
            "started": _iso(info.start_time), "ended": _iso(ended),
            "wall_s": round((ended - info.start_time) / 1000, 1) if ended and info.start_time else None,
            **{key: params[key] for key in RUN_DEVICE_PARAMS if key in params},
            **({"hardware": run.data.tags[tracking.HARDWARE_TAG]} if tracking.HARDWARE_TAG in run.data.tags else {})}


def _iso(millis: int | None) -> str | None:
    if not millis:
        return None
    return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).isoformat(timespec="seconds")


def training_runs(checkpoints: str | Path, client) -> dict:
    """label -> the finished MLflow run that trained the component (the newest run whose
    `abair.inputs_hash` tag is the file's `inputs_hash` metadata, as the training stages write
    them); `adapters`: the Phase II stage run the adapter jobs ran under. A component without
    such a run (trained elsewhere, or before the stages tagged their runs) is left out."""
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return {}
    found = {}
    for part in components(checkpoints):
        inputs_hash = file_metadata(part.path).get("inputs_hash")
        if not inputs_hash:
            continue
        query = f"tags.`abair.inputs_hash` = '{inputs_hash}' and attributes.status = 'FINISHED'"
        if part.label.startswith("adapter."):
            query += f" and tags.`abair.stage` = 'adapters' and tags.`abair.adapter` = '{part.label.split('.', 1)[1]}'"
        else:
            query += f" and tags.`abair.stage` = '{TRAINING_STAGE[part.label]}'"
        runs = client.search_runs([experiment.experiment_id], filter_string=query, order_by=["attributes.end_time DESC"],
                                  max_results=1)
        if not runs:
            continue
        found[part.label] = _run_facts(runs[0])
        parent = runs[0].data.tags.get("mlflow.parentRunId")
        if part.label.startswith("adapter.") and parent and "adapters" not in found:
            stage_run = client.get_run(parent)
            if stage_run.data.tags.get("abair.stage") == "adapters":
                found["adapters"] = _run_facts(stage_run)
    return found


# ------------------------------------------------------------------------------------------------
# Tags


def _component_metrics(component: Component, metrics: Mapping[str, float]) -> dict[str, float]:
    """The summary keys, plus an adapter's own task and mode."""
    picked = {k: v for k, v in metrics.items() if k.split("/")[0] in ("summary", "estimator", "params")}
    if component.label.startswith("adapter."):
        name = component.label.split(".", 1)[1]
        picked.update({k: v for k, v in metrics.items()
                       if f"/adapter_{name}/" in k or (len(k.split("/")) == 4 and k.split("/")[1] == name)})
    return picked


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {METRIC_TAG + k: repr(float(v)) for k, v in metrics.items()}


def _provenance_tags(params: str, data: str, suite: str | None, commit: str | None) -> dict[str, str]:
    """What every version registered in one go carries: where it came from and when."""
    return {"abair.git_commit": commit or git_commit(), "abair.params_hash": params, "abair.data_fingerprint": data,
            SUITE_TAG: suite or "", "abair.package_version": _package_version(),
            "abair.registered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("abair")
    except PackageNotFoundError:
        return "unknown"


def _version_ref(version) -> str:
    return f"{version.name}/{version.version}"


# ------------------------------------------------------------------------------------------------
# Registering


def _find_version(client, name: str, tag: str, value: str):
    """The oldest version of `name` whose `tag` is `value`, or None (also when `name` is new)."""
    matches = [v for v in client.search_model_versions(f"name = '{name}'") if (v.tags or {}).get(tag) == value]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _ensure_model(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:  # created concurrently
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def register(checkpoints: str | Path = paths.CHECKPOINTS, metrics: Mapping[str, Any] | None = None, *,
             params: str, data: str, suite: str | None, save_restorer: SaveRestorer, commit: str | None = None,
             aliases: bool = True, licenses: dict | None = None, facts: Mapping[str, Any] | None = None) -> dict:
    """Register the components in `checkpoints` and the composite restorer.

    params / data / suite: the training params hash, the data fingerprint and the evaluation suite
    the metrics came from. Content already registered (same files, same params) is not registered
    again: its existing versions are returned (`created` False) and get the `challenger` alias.
    save_restorer writes the restorer's pyfunc model folder (tasks.serve.pyfunc.save_restorer).
    licenses: the training data's license summary (data_license), carried by every version's tags
    (`abair.data_license`), the restorer's model files (metadata `data_license`) and, for
    share-alike data, the restorer version's description.
    facts: release_facts(...), stored as FACTS_FILE in a new restorer version's model folder.
    """
    metrics = numeric_metrics(metrics or {})
    parts = components(checkpoints)
    content = content_hash(parts, params)
    common = _provenance_tags(params, data, suite, commit)
    if licenses:
        common["abair.data_license"] = license_tag(licenses)
    client = registry_client(must_exist=False)
    what = f"models:/{RESTORER}"
    with registry_errors(what):
        existing = _find_version(client, RESTORER, CONTENT_TAG, content)
        if existing is not None:
            refs = component_refs(existing)
            versions = {label: client.get_model_version(name, number) for label, (name, number) in refs.items()}
            result = _result(existing, versions, created=False, created_components=[])
            log.info("register: %s is already registered as version %s (content %s)", RESTORER, existing.version, content)
        else:
            result = _register_new(client, parts, content, metrics, common, save_restorer, licenses, facts)
        if aliases:
            set_alias(client, result["restorer"]["version"], CHALLENGER, mirror=True)
    return result


def _register_component(client, run_id: str, artifact_root: str, part: Component, metrics: dict[str, float],
                        common: dict):
    """A new version of `part`'s model with its file logged to the run."""
    subdir = f"components/{part.label}"
    client.log_artifact(run_id, str(part.path), subdir)
    _ensure_model(client, part.model, DESCRIPTIONS.get(part.model, f"ABAIR Phase II adapter for "
                                                                    f"{part.label.split('.', 1)[-1]} (safetensors)."))
    tags = {**common, **metric_tags(_component_metrics(part, metrics)), SHA_TAG: part.sha256,
            "abair.component": part.label, "abair.file": part.path.name}
    return client.create_model_version(part.model, f"{artifact_root}/{subdir}", run_id=run_id, tags=tags,
                                       description=f"{part.path.name} sha256 {part.sha256[:16]}")


def _register_new(client, parts: list[Component], content: str, metrics: dict[str, float], common: dict,
                  save_restorer: SaveRestorer, licenses: dict | None = None, facts: Mapping[str, Any] | None = None) -> dict:
    run = tracking.start_run("register", tags={"abair.stage": "register", CONTENT_TAG: content})
    artifact_root = client.get_run(run.run_id).info.artifact_uri.rstrip("/")
    versions, created = {}, []
    try:
        for part in parts:
            version = _find_version(client, part.model, SHA_TAG, part.sha256)
            if version is None:
                version = _register_component(client, run.run_id, artifact_root, part, metrics, common)
                created.append(part.label)
            versions[part.label] = version
        with tempfile.TemporaryDirectory(prefix="abair-restorer-") as tmp:
            metadata = {"content_hash": content, **common, **({"data_license": licenses} if licenses else {})}
            model_dir = save_restorer(parts[0].path.parent, Path(tmp) / "restorer", metadata=metadata)
            if facts is not None:
                (model_dir / FACTS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True, default=str))
            client.log_artifacts(run.run_id, str(model_dir), "restorer")
        _ensure_model(client, RESTORER, DESCRIPTIONS[RESTORER])
        tags = {**common, **metric_tags(metrics), CONTENT_TAG: content,
                "abair.adapters": ",".join(p.label.split(".", 1)[1] for p in parts if p.label.startswith("adapter.")),
                **{COMPONENT_TAG + label: _version_ref(v) for label, v in versions.items()},
                **{f"{SHA_TAG}.{p.label}": p.sha256 for p in parts}}
        described = ", ".join(f"{label} v{v.version}" for label, v in versions.items())
        restorer = client.create_model_version(RESTORER, f"{artifact_root}/restorer", run_id=run.run_id, tags=tags,
                                               description=f"components: {described}" + share_alike_note(licenses))
        run.set_tags({"abair.restorer_version": restorer.version})
        run.end()
    except BaseException:
        run.end("FAILED")
        raise
    log.info("register: %s version %s (new components: %s)", RESTORER, restorer.version, created or "none")
    return _result(restorer, versions, created=True, created_components=created)


def _result(restorer, versions: Mapping[str, Any], created: bool, created_components: list[str]) -> dict:
    return {"restorer": {"name": restorer.name, "version": str(restorer.version), "created": created,
                         "content_hash": (restorer.tags or {}).get(CONTENT_TAG)},
            "components": {label: {"name": v.name, "version": str(v.version), "sha256": (v.tags or {}).get(SHA_TAG),
                                   "created": label in created_components} for label, v in versions.items()}}


# ------------------------------------------------------------------------------------------------
# The `register` stage


def read_metrics(metrics_path: str | Path) -> dict:
    path = Path(metrics_path)
    if not path.is_file():
        raise AbairError(path, "no evaluation metrics (run the `evaluate` stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AbairError(path, f"not valid JSON ({exc})") from None


def register_evaluated(params: dict, checkpoints: str = paths.CHECKPOINTS,
                       metrics_path: str = paths.METRICS, shards: str = paths.SHARDS,
                       evaluator: Evaluator | None = None, echo: Callable[[str], None] = print, *,
                       save_restorer: SaveRestorer, training_reports: str = paths.TRAINING_REPORTS) -> dict:
    """Register what the pipeline built (`params`: the whole params, for the training hash and
    the evaluation suite), with the metrics the `evaluate` stage wrote and the release facts
    (the training reports under `training_reports`, the training runs of the project's store)."""
    metrics = read_metrics(metrics_path)
    suite = (evaluator or Evaluator()).suite(params.get("evaluate") or {}, shards)
    facts = release_facts(params, checkpoints, shards, training_reports, metrics, suite,
                          runs_client=registry_client(must_exist=False))
    result = register(checkpoints, metrics, params=training_params_hash(params), data=data_fingerprint(shards, checkpoints),
                      suite=suite, save_restorer=save_restorer, licenses=data_license(shards), facts=facts)
    restorer = result["restorer"]
    echo(f"registered: {RESTORER} version {restorer['version']}" + ("" if restorer["created"] else " (already registered)")
         + "; " + ", ".join(f"{c['name']} v{c['version']}" for c in result["components"].values()))
    return result


def write_report(result: dict, out: str | Path | None) -> dict:
    """reports/registry.json: the versions registered, the gate's verdict, where aliases point."""
    result = {**result, "aliases": aliases(), "registry": registry_uri()}
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2, default=str))
    return result


def register_stage(params_path: str = paths.PARAMS, overrides: list[str] | None = None,
                   checkpoints: str = paths.CHECKPOINTS, metrics_path: str = paths.METRICS,
                   shards: str = paths.SHARDS, out: str | None = paths.REGISTRY_REPORT,
                   evaluator: Evaluator | None = None, echo: Callable[[str], None] = print, *,
                   save_restorer: SaveRestorer) -> dict:
    """The `register` DVC stage: register, then (register.auto_promote) run the gate, so a fresh
    `dvc repro` ends with a champion."""
    params = Params.read(params_path, overrides or (), within="register")
    cfg = params.section("register")
    evaluator = evaluator or Evaluator()
    result = register_evaluated(params.values, checkpoints, metrics_path, shards, evaluator, echo,
                                save_restorer=save_restorer)
    if cfg.get("auto_promote", True):
        result["gate"] = promote(cfg["gate"], eval_cfg=params.section("evaluate", optional=True), shards=shards,
                                 evaluator=evaluator, echo=echo)
    return write_report(result, out)
