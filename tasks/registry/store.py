"""The MLflow model registry as a store: the client, `models:/` references, aliases, and
downloading a restorer version's component files.

Registry names: `abair-backbone`, `abair-adapter-<degradation>` (one per adapter),
`abair-estimator`, and `abair-restorer` (the pyfunc bundling the exact component files, whose
tags name the component versions). Aliases: a registration sets `challenger`; the gate moves
`champion` (the one before keeps `previous`); rollback moves `champion` back to `previous`.
Registering is tasks.registry.register; the gate is tasks.registry.gate.

The store is the project's (tasks.core.tracking): a SQLite file unless MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Mapping

from tasks.core import tracking
from tasks.core.paths import BACKBONE_FILE
from tasks.core.errors import AbairError

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
# What a version's tags say


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def aliases(client=None) -> dict[str, str]:
    """alias -> version of abair-restorer."""
    client = client or registry_client(must_exist=True)
    with registry_errors(f"models:/{RESTORER}"):
        return {alias: str(version) for alias, version in (client.get_registered_model(RESTORER).aliases or {}).items()}
