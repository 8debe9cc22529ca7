"""The release folder `abair export` writes: a trained system people can take away, with what it is.

    RELEASE/
      config.json                       rebuilds the system (below); the sha256 of every other file
      MODEL_CARD.md                     generated from facts.json (tasks.release.card), never by hand
      facts.json                        what the source records about the system (tasks.release.facts)
      weights/backbone.safetensors      byte-identical copies of the component files, metadata and all
      weights/adapters/<name>.safetensors
      weights/estimator.safetensors
      onnx/                             with --onnx: the graphs of tasks.release.onnx_export

config.json: `format` (FORMAT) and `format_version`; `adapters` (the adapter of each weight column,
in the estimator's output order) and `weight_columns` (the same, then `keep`: the modes contract of
../shared/DESIGN.md); the adapter `kind` and options; the backbone's and the estimator's configs and
class names; `pw_source` (where mode pw takes its map by default); `parameters`; `weights` (the
component files by role); `files` (path -> sha256 of every file but config.json); `source` (the
reference exported, its kind, the registry versions of the restorer and of each component, the
content hash); `onnx` (the exporter's record, with --onnx).

Reading: models.restorer.Restorer.from_release (load_release here) checks every listed file against
its sha256 and refuses a weights file config.json does not list, then builds the system from the
safetensors files: no MLflow, nothing unpickled. `abair restore --model RELEASE` loads it the same
way. Writing: export_release, into a temporary folder beside the target that is renamed into
place once complete (tasks.core.storage.atomic_dir): an interrupted export leaves no release.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from tasks.core import storage
from tasks.core.components import file_sha256
from tasks.core.errors import AbairError
from tasks.core.paths import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE

FORMAT = "abair-release"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
CARD_FILE = "MODEL_CARD.md"
FACTS_FILE = "facts.json"
WEIGHTS_DIR = "weights"
ONNX_DIR = "onnx"
# The modules --onnx needs: a missing one is a clear error before any work, not a traceback after it.
ONNX_MODULES = ("tasks.release.onnx_export", "onnx", "onnxruntime", "onnxscript")


# ------------------------------------------------------------------------------------------------
# Reading


def is_release(folder: str | Path) -> bool:
    """Whether `folder` is a release folder (its config.json says FORMAT)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder: str | Path) -> dict:
    """A release's config.json, checked to be one this code reads (files are not hashed here:
    load_release / Restorer.from_release do that)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AbairError(folder, f"not a release folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AbairError(path, f"not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AbairError(path, f"not an {FORMAT} config")
    if config.get("format_version") != FORMAT_VERSION:
        raise AbairError(path, f"release format version {config.get('format_version')} (this code reads {FORMAT_VERSION})")
    return config


def load_release(folder: str | Path, device: str = "cpu", keep_seg_head: bool = False):
    """The system of a release folder, every file checked against config.json first."""
    from models.restorer import Restorer

    read_config(folder)
    return Restorer.from_release(folder, device=device, keep_seg_head=keep_seg_head)


# ------------------------------------------------------------------------------------------------
# Writing


def onnx_exporter() -> Callable:
    """tasks.release.onnx_export.export_onnx, or one clear error when it (or what it needs) is missing."""
    try:
        from tasks.release.onnx_export import export_onnx
    except ModuleNotFoundError as exc:
        if exc.name in ONNX_MODULES:
            raise AbairError("--onnx", f"ONNX export is not available here ({exc.name} is missing; "
                                       "pip install -e \".[onnx]\")") from None
        raise
    return export_onnx


def check_target(out: Path, force: bool) -> None:
    """An existing target is an error unless --force, and even then only a release folder (or an
    empty one) is replaced: --force never deletes a folder of something else."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise AbairError(out, "already exists (use --force to replace it)")
    if not out.is_dir() or out.is_symlink():
        raise AbairError(out, "exists and is not a folder: --force replaces only a release folder")
    if not is_release(out) and any(out.iterdir()):
        raise AbairError(out, "is not a release folder (no abair-release config.json): --force replaces only a release")


def export_release(source: str, out: str | Path, *, onnx: bool = False, merge: Sequence[str] = (), force: bool = False,
                   facts_from: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Write the release of `source` (a models:/ reference, a components folder or a downloaded
    pyfunc folder) to the folder `out`; returns its config. onnx: also the ONNX graphs (merge:
    adapters to fold into single-adapter graphs); force: replace an existing release at `out`;
    facts_from: the project checkout a components folder was trained in (tasks.release.facts)."""
    from tasks.release import card, facts

    out = Path(out)
    merge = list(merge or ())
    if merge and not onnx:
        raise AbairError("--merge", "writes merged ONNX graphs: it needs --onnx")
    check_target(out, force)
    export_onnx = onnx_exporter() if onnx else None
    with tempfile.TemporaryDirectory(prefix="abair-export-") as work:
        src = facts.open_source(source, work)
        gathered = facts.gather(src, facts_from)
        with storage.atomic_dir(out) as staging:
            weights = copy_weights(src.components, staging)
            system = _load_written(staging, weights)
            pw_source = default_pw_source(system, src.model_dir)
            if pw_source != "seg":
                system.backbone.drop_seg_head()   # restored pixels never depend on it
            system.pw_source = pw_source
            unknown = [name for name in merge if name not in system.names]
            if unknown:
                raise AbairError("--merge", f"{unknown[0]!r} is not an adapter of this system ({', '.join(system.names)})")
            config = build_config(system, weights, staging, gathered, pw_source)
            _write_json(staging / FACTS_FILE, gathered)
            if export_onnx is not None:
                config["onnx"] = export_onnx(system, staging / ONNX_DIR, merge, log=log)
            config["files"] = file_hashes(staging)
            (staging / CARD_FILE).write_text(card.render_card(gathered, config))
            config["files"] = file_hashes(staging)
            _write_json(staging / CONFIG_FILE, config)
            load_release(staging)   # what was written loads, every hash checked, before it goes into place
    log(f"{out}: release of {source} ({', '.join(config['adapters'])}; {len(config['files'])} files"
        + (f", {len(config['onnx'].get('graphs') or [])} ONNX graphs" if config.get("onnx") else "") + ")")
    return config


def copy_weights(components: Path, release: Path) -> dict:
    """Byte-identical copies of the component files under release/weights/; their paths by role
    (adapters by name, in the order a system loads them)."""
    from tasks.release.facts import component_files

    target = release / WEIGHTS_DIR
    (target / ADAPTER_DIR).mkdir(parents=True)
    weights: dict = {"adapters": {}}
    for label, path in component_files(components).items():
        if label.startswith("adapter."):
            name = label.split(".", 1)[1]
            relative = f"{WEIGHTS_DIR}/{ADAPTER_DIR}/{name}.safetensors"
            weights["adapters"][name] = relative
        else:
            relative = f"{WEIGHTS_DIR}/{BACKBONE_FILE if label == 'backbone' else ESTIMATOR_FILE}"
            weights[label] = relative
        shutil.copyfile(path, release / relative)
    return weights


def _load_written(release: Path, weights: dict):
    """The system from the copied files (segmentation head kept until the pw source is known)."""
    from tasks.core.components import load_system

    return load_system(release / weights["backbone"], release / WEIGHTS_DIR / ADAPTER_DIR, release / weights["estimator"],
                       "cpu", keep_seg_head=True)


def default_pw_source(system, model_dir: Path | None) -> str | None:
    """Where mode pw takes its map by default: the pyfunc's configured `pw_source` when the source
    is a registered model that set one, else what the system has (Restorer.resolve_pw_source);
    None when it has neither a dense head nor a segmentation head."""
    configured = None
    if model_dir is not None and (model_dir / "MLmodel").is_file():
        import yaml

        conf = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
        configured = (conf.get("flavors", {}).get("python_function", {}).get("config") or {}).get("pw_source")
    try:
        return system.resolve_pw_source(configured)
    except ValueError:
        return None


def build_config(system, weights: dict, release: Path, gathered: dict, pw_source: str | None) -> dict:
    """config.json but its `files` (and `onnx`), from the loaded system and the copied files."""
    from models.restorer import param_counts
    from tasks.registry.register import file_metadata

    backbone_meta = file_metadata(release / weights["backbone"])
    estimator_meta = file_metadata(release / weights["estimator"])
    components = gathered["components"]
    registry = gathered["source"].get("registry")
    versions = None
    if registry:
        versions = {registry["name"]: registry["version"],
                    **{label: entry["registry"] for label, entry in components.items() if entry.get("registry")}}
    counts = param_counts(system.backbone, system.bank, system.estimator)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "adapters": list(system.names), "weight_columns": list(system.weight_names),
            "kind": system.bank.kind.name,
            "adapter_options": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(system.bank.options).items()},
            "backbone": {"config": _json(backbone_meta.get("config")), "fingerprint": backbone_meta.get("fingerprint"),
                         "seg_classes": _json(backbone_meta.get("classes"))},
            "estimator": {"config": _json(estimator_meta.get("config")), "class_names": _json(estimator_meta.get("class_names")),
                          "temperature": _json(estimator_meta.get("temperature"))},
            "pw_source": pw_source,
            "parameters": {key: value for key, value in counts.items() if key != "per_adapter"},
            "weights": weights,
            "source": {"reference": gathered["source"]["reference"], "kind": gathered["source"]["kind"],
                       "registry": registry["registry"] if registry else None, "versions": versions,
                       "content_hash": (gathered.get("provenance") or {}).get("abair.content_hash")},
            "created_by": {"abair": _package_version()}}


def file_hashes(release: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of the release but config.json, in path order."""
    return {path.relative_to(release).as_posix(): file_sha256(path)
            for path in sorted(release.rglob("*")) if path.is_file() and path.relative_to(release).as_posix() != CONFIG_FILE}


def _json(value: str | None):
    return None if value is None else json.loads(value)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("abair")
    except PackageNotFoundError:
        return "unknown"
