"""Params overlays (profiles/*.yaml): partial params files merged into params.yaml.

`abair profile apply gpu` rewrites params.yaml in place (comments kept), so `dvc repro` and
`dvc params diff` see exactly what changed; `git diff params.yaml` shows it too.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core import paths
from tasks.core.errors import AbairError
from tasks.core.params import parse_yaml
from tasks.core.storage import atomic_path

PROFILE_DIR = Path("profiles")


def profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) if PROFILE_DIR.is_dir() else []
        raise AbairError(path, f"profile not found (known: {', '.join(known) or 'none'})")
    return path


def _merge(target, overlay: dict, where: str) -> list[str]:
    changed = []
    for key, value in overlay.items():
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            changed += _merge(target[key], value, name)
        elif target.get(key) != value:
            target[key] = value
            changed.append(name)
    return changed


def apply_profile(name_or_path: str, params_path: str | Path = paths.PARAMS,
                  profiles: str | Path = PROFILE_DIR) -> list[str]:
    """Merge a profile into params.yaml; returns the dotted keys that changed."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(profiles) / f"{name_or_path}.yaml"
    path = profile_path(str(path))
    overlay = parse_yaml(path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise AbairError(path, "a profile must be a mapping of params sections")
    return merge_into_params(overlay, params_path, where=str(path))


def merge_into_params(overlay: dict, params_path: str | Path = paths.PARAMS, where: str = "overlay") -> list[str]:
    """Merge nested values into params.yaml in place, keeping its comments; returns what changed."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    params_path = Path(params_path)
    params = rt.load(params_path.read_text())
    unknown = [section for section in overlay if section not in params]
    if unknown:
        raise AbairError(where, f"sections {unknown} are not in {params_path}")
    changed = _merge(params, overlay, "")
    with atomic_path(params_path) as tmp, tmp.open("w") as f:
        rt.dump(params, f)
    return changed
