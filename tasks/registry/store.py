"""The MLflow model registry: versions of every component, the composite restorer, and the
promotion gate that decides which version serves.

Registry names: `abair-backbone`, `abair-adapter-<degradation>` (one per adapter),
`abair-estimator`, and `abair-restorer` (the pyfunc bundling the exact component files, whose
tags name the component versions). Every version carries its file's sha256 (components) or a
content hash over all of them and the training params (restorer), the git commit, the params
hash, the data fingerprint, the evaluation suite and the evaluation metrics (`metric.<key>`).

Aliases: a registration sets `challenger`; the gate moves `champion` (the one before keeps
`previous`); rollback moves `champion` back to `previous`. Registering content that is already
registered returns the existing version instead of a duplicate.

The store is the project's (tasks.tracking): a SQLite file unless MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tasks.core import tracking
from tasks.core.errors import AbairError
from tasks.core.params import params_hash

log = logging.getLogger(__name__)

RESTORER = "abair-restorer"
BACKBONE = "abair-backbone"
ESTIMATOR = "abair-estimator"
ADAPTER_PREFIX = "abair-adapter-"
CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"

METRIC_TAG = "metric."
COMPONENT_TAG = "abair.component."     # restorer tag: component label -> "name/version"
SHA_TAG = "abair.sha256"
CONTENT_TAG = "abair.content_hash"
SUITE_TAG = "abair.suite"
TRAINING_SECTIONS = ("synthesize", "pretrain", "adapters", "estimator")
GROUPS = ("known", "unseen", "mixed")


# ------------------------------------------------------------------------------------------------
# The store


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking.tracking_uri()


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def registry_client(must_exist: bool = True):
    """An MlflowClient on the project's registry. Reading (must_exist) from a SQLite file that is
    not there is an error instead of an empty new store appearing in the current folder."""
    uri = registry_uri()
    path = _sqlite_path(uri)
    if path is not None:
        if not path.parent.is_dir():
            raise AbairError(uri, f"registry folder {path.parent} does not exist")
        if must_exist and not path.is_file():
            raise AbairError(uri, "no MLflow registry here (run `dvc repro` or `abair register` in the project, "
                                  "or set MLFLOW_TRACKING_URI)")
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry a dead server for minutes; a CLI should say so within seconds
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(key, value)
    return tracking.client()


@contextlib.contextmanager
def registry_errors(what: str):
    """MLflow and connection failures as one AbairError line naming `what` and the registry."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except AbairError:
        raise
    except MlflowException as exc:
        message = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        if "Max retries exceeded" in message or "Connection refused" in message:
            raise AbairError(what, f"registry unreachable (registry {registry_uri()})") from None
        # a missing alias comes as INVALID_PARAMETER_VALUE "... alias X not found"
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (exc.error_code == "INVALID_PARAMETER_VALUE"
                                                          and message.endswith("not found.")):
            raise AbairError(what, f"no such model version or alias (registry {registry_uri()})") from None
        raise AbairError(what, f"registry error: {message} (registry {registry_uri()})") from None
    except OSError as exc:
        raise AbairError(what, f"registry unreachable ({exc}) (registry {registry_uri()})") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy / requests errors from the store
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3", "alembic"):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AbairError(what, f"registry unreachable ({first}) (registry {registry_uri()})") from None
        raise


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (name, version, alias)."""
    if not ref.startswith("models:/"):
        raise AbairError(ref, "not a registry reference (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in name:
            return name, None, alias
    elif body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, version, None
    raise AbairError(ref, "malformed registry reference (expected models:/NAME@ALIAS or models:/NAME/VERSION)")


def resolve(ref: str, client=None):
    """The ModelVersion a `models:/` reference names; AbairError when there is none."""
    name, version, alias = parse_ref(ref)
    client = client or registry_client(must_exist=True)
    with registry_errors(ref):
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)


def alias_version(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def download_components(version, dst: str | Path, client=None) -> Path:
    """Download a restorer version and return its checkpoints-layout folder of component files."""
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise here
    client = client or registry_client(must_exist=True)
    what = f"models:/{version.name}/{version.version}"
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with registry_errors(what):
        uri = client.get_model_version_download_uri(version.name, version.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    return components_dir(local)


def components_dir(model_dir: str | Path) -> Path:
    """The checkpoints-layout folder of a model: itself when it is one, else the pyfunc model's
    artifacts folder (where the component files were stored by name)."""
    from tasks.core.components import BACKBONE_FILE

    model_dir = Path(model_dir)
    if (model_dir / BACKBONE_FILE).is_file():
        return model_dir
    if (model_dir / "MLmodel").is_file():
        import yaml

        conf = yaml.safe_load((model_dir / "MLmodel").read_text())
        backbone = ((conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {}).get("backbone") or {})
        if backbone.get("path"):
            folder = (model_dir / backbone["path"]).parent
            if (folder / BACKBONE_FILE).is_file():
                return folder
    raise AbairError(model_dir, f"not a model folder (no {BACKBONE_FILE}, and not an abair-restorer pyfunc model)")


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
    from models.adapters import read_adapter_metadata
    from tasks.core.components import BACKBONE_FILE, ESTIMATOR_FILE, adapter_files, file_sha256

    folder = Path(checkpoints)
    for required in (BACKBONE_FILE, ESTIMATOR_FILE):
        if not (folder / required).is_file():
            raise AbairError(folder / required, "missing: a registration needs the backbone, the adapters and the estimator")
    found = [Component("backbone", BACKBONE, folder / BACKBONE_FILE, file_sha256(folder / BACKBONE_FILE))]
    for path in adapter_files(folder / "adapters"):
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


def data_fingerprint(shards: str, checkpoints: str | Path) -> str:
    """The shard set's hash plus each adapter's data source (a paired folder or synthetic)."""
    from models.adapters import read_adapter_metadata
    from tasks.data import reader
    from tasks.core.components import adapter_files

    index = reader.load_index(shards)
    sources = {p.stem: read_adapter_metadata(p).get("data", "") for p in adapter_files(Path(checkpoints) / "adapters")}
    return params_hash({"shards": index["params_hash"], "adapters": sources})


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def metrics_of(version) -> dict[str, float]:
    return {k[len(METRIC_TAG):]: float(v) for k, v in (version.tags or {}).items() if k.startswith(METRIC_TAG)}


def component_refs(version) -> dict[str, tuple[str, str]]:
    """label -> (registry name, version) of the components a restorer version bundles."""
    refs = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(COMPONENT_TAG):
            name, _, number = value.rpartition("/")
            refs[key[len(COMPONENT_TAG):]] = (name, number)
    return refs


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


DESCRIPTIONS = {
    RESTORER: "ABAIR all-in-one restorer (pyfunc): backbone + per-degradation adapters + degradation estimator. "
              "predict(uint8 HxWx3 image) -> restored uint8 HxWx3.",
    BACKBONE: "ABAIR Phase I backbone (safetensors), frozen after Phase I.",
    ESTIMATOR: "ABAIR Phase III degradation estimator (safetensors): one weight per adapter.",
}


def _version_ref(version) -> str:
    return f"{version.name}/{version.version}"


def register(checkpoints: str | Path = "checkpoints", metrics: Mapping[str, Any] | None = None, *,
             params: str, data: str, suite: str | None, commit: str | None = None, aliases: bool = True) -> dict:
    """Register the components in `checkpoints` and the composite restorer.

    params / data / suite: the training params hash, the data fingerprint and the evaluation suite
    the metrics came from. Content already registered (same files, same params) is not registered
    again: its existing versions are returned (`created` False) and get the `challenger` alias.
    """
    from tasks.serve.pyfunc import save_restorer

    metrics = numeric_metrics(metrics or {})
    parts = components(checkpoints)
    content = content_hash(parts, params)
    commit = commit or git_commit()
    common = {"abair.git_commit": commit, "abair.params_hash": params, "abair.data_fingerprint": data,
              SUITE_TAG: suite or "", "abair.package_version": _package_version(),
              "abair.registered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
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
            result = _register_new(client, parts, content, metrics, common, save_restorer)
        if aliases:
            set_alias(client, result["restorer"]["version"], CHALLENGER, mirror=True)
    return result


def _register_new(client, parts: list[Component], content: str, metrics: dict[str, float], common: dict,
                  save_restorer: Callable) -> dict:
    run = tracking.start_run("register", tags={"abair.stage": "register", CONTENT_TAG: content})
    artifact_root = client.get_run(run.run_id).info.artifact_uri.rstrip("/")
    versions, created = {}, []
    try:
        for part in parts:
            version = _find_version(client, part.model, SHA_TAG, part.sha256)
            if version is None:
                subdir = f"components/{part.label}"
                client.log_artifact(run.run_id, str(part.path), subdir)
                _ensure_model(client, part.model, DESCRIPTIONS.get(part.model, f"ABAIR Phase II adapter for "
                                                                                f"{part.label.split('.', 1)[-1]} (safetensors)."))
                tags = {**common, **metric_tags(_component_metrics(part, metrics)), SHA_TAG: part.sha256,
                        "abair.component": part.label, "abair.file": part.path.name}
                version = client.create_model_version(part.model, f"{artifact_root}/{subdir}", run_id=run.run_id, tags=tags,
                                                      description=f"{part.path.name} sha256 {part.sha256[:16]}")
                created.append(part.label)
            versions[part.label] = version
        with tempfile.TemporaryDirectory(prefix="abair-restorer-") as tmp:
            model_dir = save_restorer(parts[0].path.parent, Path(tmp) / "restorer",
                                      metadata={"content_hash": content, **{k: v for k, v in common.items()}})
            client.log_artifacts(run.run_id, str(model_dir), "restorer")
        _ensure_model(client, RESTORER, DESCRIPTIONS[RESTORER])
        tags = {**common, **metric_tags(metrics), CONTENT_TAG: content,
                "abair.adapters": ",".join(p.label.split(".", 1)[1] for p in parts if p.label.startswith("adapter.")),
                **{COMPONENT_TAG + label: _version_ref(v) for label, v in versions.items()},
                **{f"{SHA_TAG}.{p.label}": p.sha256 for p in parts}}
        described = ", ".join(f"{label} v{v.version}" for label, v in versions.items())
        restorer = client.create_model_version(RESTORER, f"{artifact_root}/restorer", run_id=run.run_id, tags=tags,
                                               description=f"components: {described}")
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


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("abair")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Aliases


def set_alias(client, version: str, alias: str, mirror: bool = True) -> None:
    """Point `alias` of abair-restorer at `version`, and (mirror) the same alias of every
    component model at the component versions it bundles."""
    client.set_registered_model_alias(RESTORER, alias, str(version))
    if mirror:
        restorer = client.get_model_version(RESTORER, str(version))
        for name, number in component_refs(restorer).values():
            client.set_registered_model_alias(name, alias, number)


def delete_alias(client, alias: str, restorer_versions: list) -> None:
    """Remove `alias` from abair-restorer and from the component models of the given versions."""
    names = {RESTORER} | {name for v in restorer_versions for name, _ in component_refs(v).values()}
    from mlflow.exceptions import MlflowException

    for name in sorted(names):
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException:
            pass


# ------------------------------------------------------------------------------------------------
# The gate


@dataclass
class Verdict:
    passed: bool
    against: str                     # "floor" or "champion version N"
    reasons: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "all checks passed"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def compare(challenger: Mapping[str, float], champion: Mapping[str, float], gate: Mapping[str, Any],
            against: str = "champion") -> Verdict:
    """Relative gate: the challenger's average not lower than the champion's (by more than
    avg_tolerance_db) and no task worse by more than task_tolerance_db. Tasks only the challenger
    has (a new degradation) are shown but do not gate."""
    mode, metric = gate.get("mode", "sw"), gate.get("metric", "psnr")
    task_tol, avg_tol = float(gate["task_tolerance_db"]), float(gate.get("avg_tolerance_db", 0.0))
    verdict = Verdict(True, against)

    def tasks(metrics):
        return {k for k in metrics if len(k.split("/")) == 4 and k.split("/")[0] in GROUPS
                and k.split("/")[2] == mode and k.split("/")[3] == metric}

    for key in sorted(tasks(challenger) | tasks(champion)):
        task = "/".join(key.split("/")[:2])
        old, new = champion.get(key), challenger.get(key)
        if old is None:
            verdict.rows.append({"task": task, "champion": None, "challenger": new, "change": None, "status": "new task"})
            continue
        if new is None:
            verdict.passed = False
            verdict.reasons.append(f"{task} not evaluated for the challenger")
            verdict.rows.append({"task": task, "champion": old, "challenger": None, "change": None, "status": "FAIL: missing"})
            continue
        change = new - old
        ok = change >= -task_tol
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"{task} {metric} {change:+.2f} dB (worse than the {task_tol:.2f} dB tolerance)")
        verdict.rows.append({"task": task, "champion": old, "challenger": new, "change": change,
                             "status": "ok" if ok else f"FAIL: < -{task_tol:.2f}"})
    key = f"summary/all/{mode}/{metric}"
    old, new = champion.get(key), challenger.get(key)
    if old is None or new is None:
        verdict.passed = False
        verdict.reasons.append(f"no average ({key}) to compare")
        verdict.rows.append({"task": "average", "champion": old, "challenger": new, "change": None, "status": "FAIL: missing"})
    else:
        ok = new - old >= -avg_tol
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"average {metric} {new - old:+.2f} dB ({new:.2f} vs {old:.2f})")
        verdict.rows.append({"task": "average", "champion": old, "challenger": new, "change": new - old,
                             "status": "ok" if ok else "FAIL: lower"})
    return verdict


def floor_check(challenger: Mapping[str, float], gate: Mapping[str, Any]) -> Verdict:
    """The first champion: average PSNR at least floor_psnr_db and at least min_gain_db above
    the unrestored input's."""
    mode = gate.get("mode", "sw")
    verdict = Verdict(True, "floor")
    average, raw = challenger.get(f"summary/all/{mode}/psnr"), challenger.get("summary/all/input/psnr")
    floor, min_gain = float(gate["floor_psnr_db"]), float(gate["min_gain_db"])
    checks = [("average psnr", average, floor), ("gain over input", None if average is None or raw is None else average - raw,
                                                 min_gain)]
    for name, value, threshold in checks:
        ok = value is not None and value >= threshold
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"{name} {_fmt(value)} dB below the floor {threshold:.2f} dB" if value is not None
                                   else f"{name}: not in the metrics")
        verdict.rows.append({"task": name, "champion": threshold, "challenger": value,
                             "change": None if value is None else value - threshold, "status": "ok" if ok else "FAIL"})
    return verdict


def table(verdict: Verdict, champion_label: str, challenger_label: str) -> str:
    head = ["task", champion_label, challenger_label, "change", "verdict"]
    lines = [[r["task"], _fmt(r["champion"]), _fmt(r["challenger"]), _fmt(r["change"], True), r["status"]] for r in verdict.rows]
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class Evaluator:
    """What the gate needs from evaluation: the suite fingerprint and a fresh evaluation of a
    folder of components (tasks.evaluate; replaceable in tests)."""

    def suite(self, cfg: dict, shards: str) -> str:
        return self._module().suite_fingerprint(cfg, shards)

    def evaluate(self, cfg: dict, checkpoints: str, shards: str) -> dict:
        return self._module().evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=None, progress=False)

    @staticmethod
    def _module():
        try:
            from tasks.evaluate import stage as evaluate
        except ImportError as exc:
            raise AbairError("tasks/evaluate.py", f"evaluation is not available ({exc})") from None
        return evaluate


def promote(gate: Mapping[str, Any], *, eval_cfg: dict | None = None, shards: str = "data/shards",
            challenger: str | None = None, dry_run: bool = False, evaluator: Evaluator | None = None,
            echo: Callable[[str], None] = print) -> dict:
    """Run the gate for the `challenger` (alias, or a version number) and move the aliases on pass.

    With a champion: the relative gate on the same evaluation suite (versions evaluated on
    another suite than the current one are re-evaluated first). Without one: the absolute floor.
    On fail nothing moves and the reason is stored as a tag on the challenger; dry_run changes
    nothing at all.
    """
    client = registry_client(must_exist=True)
    evaluator = evaluator or Evaluator()
    ref = f"models:/{RESTORER}/{challenger}" if challenger else f"models:/{RESTORER}@{CHALLENGER}"
    with registry_errors(ref):
        new = resolve(ref, client)
        old = alias_version(client, RESTORER, CHAMPION)
    result = {"challenger": str(new.version), "champion_before": str(old.version) if old else None, "dry_run": dry_run,
              "moved": False}
    if old is not None and str(old.version) == str(new.version):
        echo(f"{RESTORER} version {new.version} is already the champion; nothing to do")
        return {**result, "passed": True, "reason": "already champion", "champion": str(new.version)}

    new_metrics, suites = metrics_of(new), {}
    if old is None:
        verdict = floor_check(new_metrics, gate)
        labels = ("threshold", f"v{new.version}")
    else:
        old_metrics = metrics_of(old)
        new_suite, old_suite = (new.tags or {}).get(SUITE_TAG), (old.tags or {}).get(SUITE_TAG)
        if not new_suite or new_suite != old_suite:
            current = evaluator.suite(eval_cfg or {}, shards)
            with tempfile.TemporaryDirectory(prefix="abair-gate-") as tmp:
                for which, version in (("challenger", new), ("champion", old)):
                    if (version.tags or {}).get(SUITE_TAG) != current:
                        echo(f"re-evaluating the {which} (version {version.version}) on the current suite {current}")
                        folder = download_components(version, Path(tmp) / which, client)
                        fresh = numeric_metrics(evaluator.evaluate(eval_cfg or {}, str(folder), shards))
                        if which == "challenger":
                            new_metrics = fresh
                        else:
                            old_metrics = fresh
                        suites[which] = current
        verdict = compare(new_metrics, old_metrics, gate, against=f"champion version {old.version}")
        labels = (f"champion v{old.version}", f"challenger v{new.version}")
    text = table(verdict, *labels)
    echo(f"gate ({verdict.against}, mode {gate.get('mode', 'sw')}):\n{text}")
    echo(f"{'PASS' if verdict.passed else 'FAIL'}: {verdict.reason()}")
    result.update(passed=verdict.passed, reason=verdict.reason(), against=verdict.against, rows=verdict.rows,
                  table=text, reevaluated=suites)
    if dry_run:
        echo("dry run: no alias moved")
        result["champion"] = str(old.version) if old else None
        return result

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with registry_errors(ref):
        client.set_model_version_tag(RESTORER, new.version, "abair.gate", "passed" if verdict.passed else "failed")
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_reason", verdict.reason()[:4900])
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_against", verdict.against)
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_at", stamp)
        if verdict.passed:
            if old is not None:
                set_alias(client, old.version, PREVIOUS, mirror=True)
            set_alias(client, new.version, CHAMPION, mirror=True)
            result["moved"] = True
            echo(f"champion: {RESTORER} version {new.version}" + (f" (previous: version {old.version})" if old else ""))
        else:
            echo(f"champion unchanged: {f'version {old.version}' if old else 'none yet'}")
    result["champion"] = str(new.version) if result["moved"] else (str(old.version) if old else None)
    return result


def rollback(echo: Callable[[str], None] = print) -> dict:
    """Move `champion` back to the `previous` version; `previous` is cleared (one step back)."""
    client = registry_client(must_exist=True)
    what = f"models:/{RESTORER}@{PREVIOUS}"
    with registry_errors(what):
        previous = alias_version(client, RESTORER, PREVIOUS)
        if previous is None:
            raise AbairError(what, "no previous champion to roll back to")
        current = alias_version(client, RESTORER, CHAMPION)
        set_alias(client, previous.version, CHAMPION, mirror=True)
        delete_alias(client, PREVIOUS, [previous] + ([current] if current else []))
        if current is not None:
            stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            client.set_model_version_tag(RESTORER, current.version, "abair.rolled_back",
                                         f"replaced by version {previous.version} at {stamp}")
    echo(f"champion: {RESTORER} version {previous.version} (was version {current.version if current else 'none'})")
    return {"champion": str(previous.version), "replaced": str(current.version) if current else None}


def aliases(client=None) -> dict[str, str]:
    """alias -> version of abair-restorer."""
    client = client or registry_client(must_exist=True)
    with registry_errors(f"models:/{RESTORER}"):
        return {alias: str(version) for alias, version in (client.get_registered_model(RESTORER).aliases or {}).items()}


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


def register_evaluated(params_path: str = "params.yaml", checkpoints: str = "checkpoints",
                       metrics_path: str = "reports/metrics.json", shards: str = "data/shards",
                       evaluator: Evaluator | None = None, echo: Callable[[str], None] = print) -> dict:
    """Register what the pipeline built, with the metrics the `evaluate` stage wrote."""
    from tasks.core.params import load_params

    params = load_params(params_path)
    metrics = read_metrics(metrics_path)
    suite = (evaluator or Evaluator()).suite(params.get("evaluate") or {}, shards)
    result = register(checkpoints, metrics, params=training_params_hash(params), data=data_fingerprint(shards, checkpoints),
                      suite=suite)
    restorer = result["restorer"]
    echo(f"registered: {RESTORER} version {restorer['version']}" + ("" if restorer["created"] else " (already registered)")
         + "; " + ", ".join(f"{c['name']} v{c['version']}" for c in result["components"].values()))
    return result


def write_report(result: dict, out: str | Path | None) -> dict:
    """reports/registry.json: the versions registered, the gate's verdict, where aliases point."""
    from tasks.core.storage import atomic_path

    result = {**result, "aliases": aliases(), "registry": registry_uri()}
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2, default=str))
    return result


def register_stage(params_path: str = "params.yaml", overrides: list[str] | None = None,
                   checkpoints: str = "checkpoints", metrics_path: str = "reports/metrics.json",
                   shards: str = "data/shards", out: str | None = "reports/registry.json",
                   evaluator: Evaluator | None = None, echo: Callable[[str], None] = print) -> dict:
    """The `register` DVC stage: register, then (register.auto_promote) run the gate, so a fresh
    `dvc repro` ends with a champion."""
    from tasks.core.params import load_params

    cfg = load_params(params_path, "register", overrides or ())
    evaluator = evaluator or Evaluator()
    result = register_evaluated(params_path, checkpoints, metrics_path, shards, evaluator, echo)
    if cfg.get("auto_promote", True):
        eval_cfg = load_params(params_path).get("evaluate") or {}
        result["gate"] = promote(cfg["gate"], eval_cfg=eval_cfg, shards=shards, evaluator=evaluator, echo=echo)
    return write_report(result, out)
