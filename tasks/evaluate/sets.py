"""Evaluation sets: their specs, the protocol, the cached synthetic sets and loading a set's images.

Sets come from the `evaluate` params section, one spec per set:

    paired:     {name, group, task: [adapter, ...], path: FOLDER, first: N}   FOLDER/input/F, FOLDER/target/F
                path may also be a paired-data mapping ({paths, holdout, group}, tasks/data/reader.py):
                the set is then its held-out side, the pairs that training with the same mapping
                leaves out. first: only the first N pairs by name.
    synthetic:  {name, group, task: [...], clean: val | samples | FOLDER,
                 degradations: [[name, severity], ...], seed, count, crop}

group is known | unseen | mixed (the paper's three tables); task names the adapters that are
"the right ones" for the set (the oracle mode blends them uniformly). `clean: val` uses the shard
set's validation source images (index.json splits.val.sources), which training never saw.
Synthetic sets are generated deterministically and cached as PNG pairs under
`<cache>/<name>/{input,target}/` with a spec.json; they are rebuilt only when their spec, their
clean sources or the degradation code change.

Protocol (PromptIR / Restormer): images centre-cropped to a multiple of 16; the metrics of
tasks.core.metrics per image, then averaged over the set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from tasks.core import imageio, paths, storage
from tasks.core.errors import AbairError
from tasks.core.metrics import PSNR_CAP
from tasks.core.params import params_hash

log = logging.getLogger(__name__)

GROUPS = ("known", "unseen", "mixed")
MODE_CHOICES = ("input", "baseline", "none", "adapters", "oh", "sw", "oracle")
CACHE_FORMAT = "abair-evalset/1"
SPEC_FILE = "spec.json"
_SET_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# A random crop flatter than this (grey-level std) is redrawn: featureless crops (retina's black
# surround, sky) say nothing about restoration and make PSNR swing wildly.
_MIN_CROP_STD = 0.04
_CROP_TRIES = 8


# ------------------------------------------------------------------------------------------------
# Set specs and the protocol


@dataclass(frozen=True)
class SetSpec:
    name: str
    group: str
    task: tuple[str, ...]
    path: str | None = None                                   # paired folder, or a paired-data mapping as JSON
    first: int | None = None                                  # paired: only the first N pairs by name
    clean: str | None = None                                  # synthetic: val | samples | folder
    degradations: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    count: int | None = None                                  # None: one image per clean source
    crop: int | None = None                                   # None: whole images

    @property
    def kind(self) -> str:
        return "paired" if self.path is not None else "synthetic"

    def as_dict(self) -> dict:
        base = {"name": self.name, "group": self.group, "task": list(self.task), "kind": self.kind}
        if self.kind == "paired":
            return {**base, "path": self.path, **({"first": self.first} if self.first is not None else {})}
        return {**base, "clean": self.clean, "degradations": [[n, s] for n, s in self.degradations],
                "seed": self.seed, "count": self.count, "crop": self.crop}

    def describe(self) -> str:
        if self.kind == "paired":
            if self.path.startswith("{"):
                spec = json.loads(self.path)
                return (f"held-out {spec.get('holdout', 0):g} (by {spec.get('group', 'image')}) of "
                        + ", ".join(f"`{p}`" for p in spec["paths"]))
            return f"paired `{self.path}`" + (f", first {self.first}" if self.first is not None else "")
        chain = " + ".join(f"{n} {s:g}" for n, s in self.degradations)
        return f"{chain} on `{self.clean}`"


def parse_sets(cfg: dict) -> list[SetSpec]:
    """The set specs of an `evaluate` section (defaults applied), checked; AbairError otherwise."""
    raw_sets = cfg.get("sets")
    if not isinstance(raw_sets, list) or not raw_sets:
        raise AbairError("evaluate.sets", "no evaluation sets declared")
    defaults = cfg.get("defaults") or {}
    specs = [_parse_set(raw, i, defaults) for i, raw in enumerate(raw_sets)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise AbairError(f"evaluate.sets.{spec.name}", "set names must be unique (they name the cache folders)")
        seen.add(spec.name)
    return specs


def _parse_set(raw, index: int, defaults: dict) -> SetSpec:
    where = f"evaluate.sets[{index}]"
    if not isinstance(raw, dict):
        raise AbairError(where, "must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _SET_NAME.match(name):
        raise AbairError(where, f"name must be letters, digits, '_' or '-' (no slashes), got {name!r}")
    where = f"evaluate.sets.{name}"
    group = raw.get("group")
    if group not in GROUPS:
        raise AbairError(where, f"group must be one of {list(GROUPS)}, got {group!r}")
    task = raw.get("task", [])
    task = [task] if isinstance(task, str) else task
    if not isinstance(task, list) or not all(isinstance(t, str) for t in task):
        raise AbairError(where, f"task must be a list of adapter names, got {task!r}")
    if "path" in raw and "degradations" in raw:
        raise AbairError(where, "give either `path` (a paired folder) or `degradations` (a synthetic set), not both")
    if "path" in raw:
        first = raw.get("first")
        if first is not None and (not isinstance(first, int) or first < 1):
            raise AbairError(where, f"first must be a positive integer or null, got {first!r}")
        path = raw["path"]
        if isinstance(path, dict):
            from tasks.data.reader import paired_spec

            full = paired_spec(path, f"{where}.path")
            if not full["holdout"]:
                raise AbairError(f"{where}.path", "a paired-data mapping needs `holdout` > 0: the set is its held-out side")
            path = json.dumps({k: full[k] for k in ("paths", "holdout", "group")}, sort_keys=True)
        return SetSpec(name, group, tuple(task), path=str(path), first=first)
    merged = {**defaults, **raw}
    chain = _parse_chain(merged.get("degradations"), where)
    clean = merged.get("clean", "val")
    count, crop = merged.get("count"), merged.get("crop")
    for key, value in (("count", count), ("crop", crop)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise AbairError(where, f"{key} must be a positive integer or null, got {value!r}")
    return SetSpec(name, group, tuple(task), clean=str(clean), degradations=chain,
                   seed=int(merged.get("seed", 0)), count=count, crop=crop)


def _parse_chain(steps, where: str) -> tuple[tuple[str, float], ...]:
    """A synthetic set's [[name, severity], ...], each name a registered degradation."""
    import degradations

    if not isinstance(steps, list) or not steps:
        raise AbairError(where, "needs `path` (a paired folder) or a non-empty `degradations` list")
    chain = []
    for step in steps:
        if not (isinstance(step, (list, tuple)) and len(step) == 2):
            raise AbairError(where, f"each degradation is [name, severity], got {step!r}")
        deg, severity = step
        try:
            degradations.get(deg)
        except ValueError as exc:
            raise AbairError(where, str(exc)) from None
        if not isinstance(severity, (int, float)) or not 0.0 <= float(severity) <= 1.0:
            raise AbairError(where, f"severity of {deg} must be in [0, 1], got {severity!r}")
        chain.append((str(deg), float(severity)))
    return tuple(chain)


def protocol(cfg: dict) -> dict:
    """What defines the numbers besides the images: grid, channels, cap, modes."""
    modes = list(cfg.get("modes") or MODE_CHOICES)
    unknown = [m for m in modes if m not in MODE_CHOICES]
    if unknown:
        raise AbairError("evaluate.modes", f"unknown modes {unknown}; choose from {list(MODE_CHOICES)}")
    multiple = int(cfg.get("multiple", 16))
    if multiple < 1:
        raise AbairError("evaluate.multiple", f"must be >= 1, got {multiple}")
    return {"multiple": multiple, "y_channel": bool(cfg.get("y_channel", False)), "psnr_cap": PSNR_CAP,
            "modes": modes, "metrics": "torchmetrics psnr/ssim data_range=1, per image then mean"}


# ------------------------------------------------------------------------------------------------
# Clean sources and the cached synthetic sets


def _source_digest(sources) -> list[list]:
    return [[s.id, s.version] for s in sources]


def clean_sources(spec: SetSpec, shards: str):
    """The clean images (tasks.sources.Source) a synthetic set draws from, sorted by id."""
    from tasks.data.sources import SAMPLES, Source, list_sources

    if spec.clean == "val":
        from tasks.data.reader import load_index

        index = load_index(shards)
        where = storage.join(shards, "index.json")
        ids = sorted(index.get("splits", {}).get("val", {}).get("sources", []))
        if not ids:
            raise AbairError(where, f"has no validation source images for set {spec.name!r} "
                                    "(raise synthesize.val_fraction, or give the set a clean folder)")
        if index["source"] == SAMPLES:
            import skimage

            return [Source(i, f"samples:{i.split('/', 1)[1]}", skimage.__version__) for i in ids]
        listed = {s.id: s for s in list_sources(index["source"])}
        missing = [i for i in ids if i not in listed]
        if missing:
            raise AbairError(storage.join(index["source"], missing[0]), "validation source image is gone")
        return [listed[i] for i in ids]
    return list_sources(spec.clean)


def _load_clean(source) -> np.ndarray:
    """Float RGB; grayscale files (Classic5) become three equal channels."""
    if source.uri.startswith("samples:"):
        from tasks.data.sources import SourceSkip, load_source

        try:
            return load_source(source, min_size=1)
        except SourceSkip as exc:
            raise AbairError(source.id, str(exc)) from None
    return imageio.read_image(source.uri)


def _pick_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    height, width = img.shape[:2]
    best, best_std = None, -1.0
    for _ in range(_CROP_TRIES):
        y0 = int(rng.integers(0, height - size + 1))
        x0 = int(rng.integers(0, width - size + 1))
        crop = img[y0:y0 + size, x0:x0 + size]
        std = float(crop.mean(axis=2).std())
        if std >= _MIN_CROP_STD:
            return crop
        if std > best_std:
            best, best_std = crop, std
    return best


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "image"


def degradation_code_hash(names: Iterable[str]) -> str:
    """Hash of the degradation modules' source: a change in them changes the generated images."""
    import degradations

    digest = hashlib.sha256()
    for module_name in sorted({"_common", "_particles", "composite", *names}):
        path = Path(degradations.__file__).with_name(f"{module_name}.py")
        if path.is_file():
            digest.update(module_name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _synthetic_identity(spec: SetSpec, sources) -> dict:
    return {"format": CACHE_FORMAT, "spec": {k: v for k, v in spec.as_dict().items() if k not in ("group", "task")},
            "sources": _source_digest(sources),
            "code": degradation_code_hash(n for n, _ in spec.degradations)}


def build_synthetic(spec: SetSpec, sources, folder: Path) -> list[dict]:
    """Write the set's PNG pairs into `folder` (input/, target/); returns per-image records.

    Image i uses clean source i mod len(sources); its crop and its degradations draw from two
    generators seeded by (seed, source, i), so every image is reproducible on its own and a set
    with the same seed, clean and crop as another shows the same clean crops."""
    from degradations.composite import apply_chain

    count = spec.count if spec.count is not None else len(sources)
    loaded: dict[str, np.ndarray] = {}
    records = []
    for i in range(count):
        source = sources[i % len(sources)]
        if source.id not in loaded:
            loaded[source.id] = _load_clean(source)
        clean = loaded[source.id]
        if spec.crop is not None:
            height, width = clean.shape[:2]
            if height < spec.crop or width < spec.crop:
                raise AbairError(source.uri, f"is {width}x{height}, smaller than set {spec.name!r}'s crop {spec.crop}")
            clean = _pick_crop(clean, spec.crop, np.random.default_rng([spec.seed, source.seed_key, i]))
        # The 8-bit target is what gets scored, so degrade the 8-bit image, not the float one.
        clean = imageio.to_float_rgb(imageio.to_uint8(clean))
        degraded, steps = apply_chain(clean, np.random.default_rng([spec.seed, source.seed_key, i, 1]),
                                      list(spec.degradations))
        name = f"{i:03d}-{_slug(source.id)}.png"
        (folder / "input").mkdir(parents=True, exist_ok=True)
        (folder / "target").mkdir(parents=True, exist_ok=True)
        (folder / "input" / name).write_bytes(imageio.encode_png(degraded, compression=3))
        (folder / "target" / name).write_bytes(imageio.encode_png(clean, compression=3))
        records.append({"file": name, "source": source.id, "degradations": steps})
    return records


def prepare_synthetic(spec: SetSpec, shards: str, cache: str | Path) -> Path:
    """The cached folder of a synthetic set, (re)built atomically when its identity changed."""
    sources = clean_sources(spec, shards)
    identity = _synthetic_identity(spec, sources)
    digest = params_hash(identity)
    folder = Path(cache) / spec.name
    spec_file = folder / SPEC_FILE
    if spec_file.is_file():
        try:
            if json.loads(spec_file.read_text()).get("hash") == digest:
                return folder
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt, not trusted
    started = time.perf_counter()
    with storage.atomic_dir(folder) as tmp:
        records = build_synthetic(spec, sources, tmp)
        (tmp / SPEC_FILE).write_text(json.dumps({"hash": digest, **identity, "images": records}, indent=1))
    log.info("evaluate: generated set %s (%d images) in %s in %.1f s", spec.name, len(records), folder,
             time.perf_counter() - started)
    return folder


def set_folder(spec: SetSpec, shards: str, cache: str | Path) -> str:
    return spec.path if spec.kind == "paired" else str(prepare_synthetic(spec, shards, cache))


def paired_folder(spec: SetSpec, folder: str):
    """The pairs a set scores: a folder's (its first N by name), or a mapping's held-out side."""
    from tasks.data.reader import PairedFolder, open_paired

    if spec.kind == "paired" and spec.path.startswith("{"):
        paired = open_paired(json.loads(spec.path), "val", where=f"evaluate.sets.{spec.name}.path")
    else:
        paired = PairedFolder(folder, check=False)
    if spec.first is not None:
        paired.names = paired.names[:spec.first]
    return paired


# ------------------------------------------------------------------------------------------------
# The suite's identity


def set_identity(spec: SetSpec, shards: str) -> dict:
    """What a set's images are, without building them (for suite_fingerprint)."""
    if spec.kind == "paired":
        paired = paired_folder(spec, spec.path)
        return {"spec": spec.as_dict(), "files": paired.fingerprint, "names": paired.names}
    sources = clean_sources(spec, shards)
    # Sizes, not mtimes: a fresh checkout of the same files is the same suite.
    sizes = [[s.id, s.version if s.uri.startswith("samples:") else _file_size(s.uri)] for s in sources]
    return {"spec": spec.as_dict(), "sources": sizes, "code": degradation_code_hash(n for n, _ in spec.degradations)}


def _file_size(uri: str) -> int | str:
    if storage.is_s3(uri):
        return uri
    try:
        return Path(uri).stat().st_size
    except OSError:
        raise AbairError(uri, "file not found") from None


def suite_fingerprint(cfg: dict, shards: str = paths.SHARDS) -> str:
    """A stable hash of what is evaluated (set specs and their images' identity, protocol), not of
    how (device, tiling, batch, plots): equal fingerprints mean two evaluations are comparable."""
    specs = parse_sets(cfg)
    return params_hash({"protocol": protocol(cfg), "sets": [set_identity(s, shards) for s in specs]})


# ------------------------------------------------------------------------------------------------
# Loading a set


def centre_crop(img: np.ndarray, multiple: int, where: str) -> np.ndarray:
    """The centred H' x W' crop with H', W' the largest multiples of `multiple` (PromptIR)."""
    height, width = img.shape[:2]
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise AbairError(where, f"image is {width}x{height}, smaller than the {multiple} px evaluation grid")
    y0, x0 = (height - new_h) // 2, (width - new_w) // 2
    return img[y0:y0 + new_h, x0:x0 + new_w]


@dataclass
class LoadedSet:
    spec: SetSpec
    folder: str
    names: list[str]
    inputs: list[np.ndarray]      # uint8 RGB, centre-cropped to the grid
    targets: list[np.ndarray]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [t.shape[:2] for t in self.targets]


def load_set(spec: SetSpec, folder: str, multiple: int) -> LoadedSet:
    """Every pair of a folder, checked (missing partner, size mismatch, unreadable file: one
    AbairError naming the file) and centre-cropped to the evaluation grid."""
    paired = paired_folder(spec, folder)
    inputs, targets = [], []
    for name in paired.names:
        degraded, clean = paired.load(name)
        where = storage.join(paired.root if isinstance(paired.root, str) else paired.root[0], "input", name)
        inputs.append(np.ascontiguousarray(centre_crop(degraded, multiple, where)))
        targets.append(np.ascontiguousarray(centre_crop(clean, multiple, where)))
    return LoadedSet(spec, folder, list(paired.names), inputs, targets)
