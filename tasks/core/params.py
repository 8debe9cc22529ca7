"""params.yaml, parsed once: an entry point (a CLI command, a flow) reads the file and its
`--set` overrides into a `Params` and hands sections down as plain dicts; what runs below never
sees a params path. Also the hash of what a stage depends on."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from tasks.core import paths
from tasks.core.errors import AbairError

DEFAULT_PARAMS = paths.PARAMS


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: PyYAML follows YAML 1.1, where `8e-3` and `1e5`
    (no dot) are strings, while DVC (ruamel, YAML 1.2) reads them as numbers."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass


class Params:
    """The merged params (the file, then the overrides), handed out one section at a time."""

    def __init__(self, values: dict, source: str | Path = DEFAULT_PARAMS):
        self.values, self.source = values, Path(source)

    @classmethod
    def read(cls, path: str | Path = DEFAULT_PARAMS, overrides: Iterable[str] = (),
             within: str | None = None) -> "Params":
        """Read `path` and apply `a.b.c=value` overrides (values parsed as YAML): keys relative
        to section `within` when given (a stage command's `--set`), else to the whole file."""
        path = Path(path)
        if not path.is_file():
            raise AbairError(path, "params file not found")
        try:
            values = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise AbairError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        params = cls(values, path)
        if within is None:
            params.values = apply_overrides(values, overrides)
        else:
            section = params.section(within)
            params.values[within] = apply_overrides(section, [params._relative(item, within, section) for item in overrides])
        return params

    def _relative(self, item: str, within: str, section: dict) -> str:
        """A stage command's override, relative to its section: `estimator.lr=1` on the estimator
        command means `lr=1` (the whole-file spelling works too); another section's key is an error
        rather than a new, silently unused sub-section."""
        first, _, rest = item.partition(".")
        if "=" in first or first in section or first not in self.values:
            return item
        if first == within:
            return rest
        raise AbairError(item, f"sets the `{first}` section; this command reads `{within}` (--set is relative to it)")

    def section(self, name: str, optional: bool = False) -> dict:
        """A copy of section `name`; a missing one is an error unless `optional` (then {})."""
        if name not in self.values:
            if optional:
                return {}
            raise AbairError(self.source, f"has no `{name}` section")
        return copy.deepcopy(self.values[name])


def load_params(path: str | Path = DEFAULT_PARAMS, section: str | None = None,
                overrides: Iterable[str] = ()) -> dict:
    """One read for one use: the whole params dict, or one section with overrides relative to it."""
    params = Params.read(path, overrides, within=section)
    return params.values if section is None else params.section(section)


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
