"""params.yaml: load a section, apply `key.path=value` overrides, hash what a stage depends on."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from tasks.core.errors import AbairError

DEFAULT_PARAMS = "params.yaml"


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: PyYAML follows YAML 1.1, where `8e-3` and `1e5`
    (no dot) are strings, while DVC (ruamel, YAML 1.2) reads them as numbers."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = DEFAULT_PARAMS, section: str | None = None,
                overrides: Iterable[str] = ()) -> dict:
    """Read params.yaml (or one section of it) and apply `a.b.c=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise AbairError(path, "params file not found")
    try:
        params = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AbairError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if section is not None:
        if section not in params:
            raise AbairError(path, f"has no `{section}` section")
        params = params[section]
    return apply_overrides(params, overrides)


def apply_overrides(params: dict, overrides: Iterable[str]) -> dict:
    params = copy.deepcopy(params)
    for item in overrides:
        if "=" not in item:
            raise AbairError(item, "override must look like key.path=value")
        key, raw = item.split("=", 1)
        node = params
        *parents, leaf = key.strip().split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise AbairError(item, f"`{name}` is not a section")
        node[leaf] = parse_yaml(raw)
    return params


def deep_merge(base: dict, overlay: dict) -> dict:
    """Overlay wins key by key; nested sections merge, lists and scalars replace."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def params_hash(params: Any) -> str:
    """Stable short hash of a params section (key order does not matter)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
