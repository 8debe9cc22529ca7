"""What a release's source records about the system: the facts MODEL_CARD.md is written from.

A source is a registry reference (`models:/abair-restorer@champion`, `models:/abair-restorer/3`), a
downloaded pyfunc model folder, or a components folder (the checkpoints/ layout). What each holds:

| fact | registry version | pyfunc folder | components folder |
|---|---|---|---|
| component files and their metadata (configs, steps, severities, validation figures) | yes | yes | yes |
| registry versions, content hash, suite, metrics (tags `metric.*`), git commit, gate | yes | some (MLmodel metadata) | no |
| release facts: params, training data, training reports, runs (time, device), sets | registered since release_facts | same | with --facts-from |

`release_facts.json` is stored in a restorer version's model folder by registration
(tasks.registry.register.release_facts); versions registered before it have none. A bare
components folder has no training record: its card says "not recorded" for those facts, unless
`facts_from` names the project checkout it was trained in, whose params.yaml, reports/ and shard
index are then read with the same function registration uses, after checking that the project's
checkpoints/ holds byte-identical files (a record of other files would be a guess).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core import paths, storage
from tasks.core.components import adapter_files
from tasks.core.errors import AbairError
from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE
from tasks.core.params import Params
from tasks.registry import store
from tasks.registry.register import FACTS_FILE, FACTS_FORMAT, components, file_metadata, read_metrics, release_facts

# Provenance keys a card shows, as the tags (registry) and the pyfunc's MLmodel metadata spell them.
PROVENANCE = ("abair.content_hash", "abair.git_commit", "abair.params_hash", "abair.data_fingerprint", "abair.suite",
              "abair.registered_at", "abair.package_version", "abair.data_license", "abair.gate", "abair.gate_reason",
              "abair.gate_at")
# File metadata left out of the facts: long lists that say nothing a reader of the card needs.
SKIPPED_METADATA = ("layers",)


@dataclass(frozen=True)
class Source:
    reference: str          # what the user named
    kind: str               # "registry" | "pyfunc folder" | "components folder"
    components: Path        # the checkpoints-layout folder of the component files
    model_dir: Path | None  # the pyfunc model folder (MLmodel), when there is one
    version: Any = None     # the abair-restorer ModelVersion of a registry source


def open_source(spec: str, workdir: str | Path) -> Source:
    """The components of `spec` (a registry version is downloaded into `workdir`), complete:
    backbone, adapters and estimator."""
    if spec.startswith("models:/"):
        version = store.resolve(spec)
        if version.name != store.RESTORER:
            raise AbairError(spec, f"is a {version.name} version; a release needs an {store.RESTORER} model")
        folder = store.download_components(version, Path(workdir) / "model")
        source = Source(spec, "registry", folder, _model_dir(folder), version)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise AbairError(spec, "no such model folder (and not a models:/ reference)")
        folder = store.components_dir(path)
        model_dir = _model_dir(folder)
        source = Source(spec, "pyfunc folder" if model_dir else "components folder", folder, model_dir)
    for required in (BACKBONE_FILE, ESTIMATOR_FILE):
        if not (source.components / required).is_file():
            raise AbairError(source.components / required, "missing: a release holds the backbone, the adapters and the estimator")
    adapter_files(source.components / ADAPTER_DIR)
    return source


def _model_dir(components: Path) -> Path | None:
    """The pyfunc model folder holding a components folder (its artifacts/), if it is one."""
    parent = components.parent
    return parent if (parent / "MLmodel").is_file() and components != parent else None


def component_files(folder: Path) -> dict[str, Path]:
    """label (backbone | adapter.<name> | estimator) -> file, adapters in file-name order (the
    order a system loads them in), as registration names them."""
    return {part.label: part.path for part in components(folder)}


def gather(source: Source, facts_from: str | Path | None = None) -> dict:
    """Everything the source records about its system (see the module docstring): a JSON-able
    dict, None for what it does not hold."""
    refs = store.component_refs(source.version) if source.version is not None else {}
    tags = (source.version.tags or {}) if source.version is not None else {}
    parts = {part.label: {"sha256": part.sha256,
                          "metadata": {k: v for k, v in file_metadata(part.path).items() if k not in SKIPPED_METADATA},
                          "registry": "/".join(refs[part.label]) if part.label in refs else None}
             for part in components(source.components)}
    record = _stored_record(source)
    if facts_from is not None:
        if source.kind != "components folder":
            raise AbairError("--facts-from", f"reads a project's record for a components folder; {source.reference} "
                                             "is a registry model, which carries its own")
        record = project_record(facts_from, parts)
    metrics = store.metrics_of(source.version) if source.version is not None else None
    if not metrics:
        metrics = (record or {}).get("metrics") or None
    registry = None
    if source.version is not None:
        registry = {"name": source.version.name, "version": str(source.version.version),
                    "registry": store.registry_uri(), "aliases": list(getattr(source.version, "aliases", None) or [])}
    return {"source": {"reference": source.reference, "kind": source.kind, "registry": registry,
                       "facts_from": str(facts_from) if facts_from is not None else None},
            "provenance": _provenance(source, tags),
            "components": parts, "metrics": metrics, "record": record}


def _provenance(source: Source, tags: dict) -> dict | None:
    if source.version is not None:
        return {key: tags[key] for key in PROVENANCE if key in tags}
    if source.model_dir is not None:
        import yaml

        metadata = (yaml.safe_load((source.model_dir / "MLmodel").read_text()) or {}).get("metadata") or {}
        found = {key: str(metadata[key]) for key in PROVENANCE if key in metadata}
        if "content_hash" in metadata:
            found["abair.content_hash"] = str(metadata["content_hash"])
        return found or None
    return None


def _stored_record(source: Source) -> dict | None:
    """The release facts stored with a registered restorer (its model folder's FACTS_FILE)."""
    if source.model_dir is None or not (source.model_dir / FACTS_FILE).is_file():
        return None
    path = source.model_dir / FACTS_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AbairError(path, f"not valid JSON ({exc.msg})") from None
    if record.get("format") != FACTS_FORMAT:
        raise AbairError(path, f"unknown release facts format {record.get('format')!r} (this code reads {FACTS_FORMAT})")
    return record


def project_record(project: str | Path, parts: dict) -> dict:
    """The release facts of a project checkout (its params.yaml, reports/, shard index and, when
    it has one, its mlflow.db), refused unless its checkpoints/ holds these very files."""
    project = Path(project)
    checkpoints = project / paths.CHECKPOINTS
    if not (project / paths.PARAMS).is_file():
        raise AbairError(project, f"not a project checkout (no {paths.PARAMS})")
    if not (checkpoints / BACKBONE_FILE).is_file():
        raise AbairError(checkpoints, f"no {BACKBONE_FILE}: the project's record cannot be matched to the exported files")
    theirs = {part.label: part.sha256 for part in components(checkpoints)}
    ours = {label: entry["sha256"] for label, entry in parts.items()}
    if theirs != ours:
        differing = sorted(set(theirs) ^ set(ours) | {k for k in set(theirs) & set(ours) if theirs[k] != ours[k]})
        raise AbairError(checkpoints, f"holds other component files than the exported ones ({', '.join(differing)}): "
                                      "its reports describe another training")
    params = Params.read(project / paths.PARAMS).values
    shards = str((params.get("synthesize") or {}).get("out") or paths.SHARDS)
    if not storage.is_s3(shards) and not Path(shards).is_absolute():
        shards = str(project / shards)
    metrics_path = project / paths.METRICS
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else None
    return release_facts(params, checkpoints, shards, project / paths.TRAINING_REPORTS, metrics, suite=None,
                         runs_client=_project_runs(project))


def _project_runs(project: Path):
    """An MlflowClient on the project's own store (its mlflow.db), or None when it has none."""
    database = project / "mlflow.db"
    if not database.is_file():
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{database.resolve()}")
