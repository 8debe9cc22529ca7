"""Evaluation sets: their specs, the protocol, the cached synthetic sets and loading a set's images.

Sets come from the `evaluate` params section, one spec per set:

    paired:     {name, group, task: [adapter, ...], path: FOLDER, first: N}   FOLDER/input/F, FOLDER/target/F
                path may also be a paired-data mapping ({paths, holdout, group}, tasks/data/reader.py):
                the set is then its held-out side, the pairs that training with the same mapping
                leaves out. first: only the first N pairs by name.
    synthetic:  {name, group, task: [...], clean: val | samples | FOLDER,
                 degradations: [[name, severity], ...], seed, count, crop}
    regions:    {name, group: regions, task: [...], clean, regions: [[name, severity], ...],
                 region_count: [lo, hi], clean_regions: p, seed, count, crop}

group is known | unseen | mixed (the paper's three tables) | regions; task names the adapters that
are "the right ones" for the set (the oracle mode blends them uniformly; a regions set's task
defaults to its regions' degradations). A regions set's images are partitioned into lo..hi regions
by the composite generator's layouts (degradations/composite.py), ONE degradation of `regions`
per region: the first regions of an image get distinct ones (so a two-entry set always shows both),
each further region stays clean with probability `clean_regions`, else draws one. Its per-pixel
mask (bit i: `regions[i]` was applied there) is cached beside the pairs (`mask/`); the pixel-wise
oracle is built from it. `regions_defaults` applies to regions sets over `defaults`.

Any set may name the `modes` it runs (a subset of evaluate.modes; by default all of them): regions
sets leave out each adapter alone, which says little where every region wants another adapter and
would be five of their eleven network passes. `clean: val` uses the shard
set's validation source images (index.json splits.val.sources), which training never saw.
Synthetic sets are generated deterministically and cached as PNG pairs under
`<cache>/<name>/{input,target}/` with a spec.json; they are rebuilt only when their spec, their
clean sources or the degradation code change.

Protocol (PromptIR / Restormer): images centre-cropped to a multiple of 16; the metrics of
tasks.core.metrics per image, then averaged over the set.
"""

from __future__ import annotations

import dataclasses
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

MAX_MASK_CLASSES = 8  # a regions set's mask is uint8: one bit per degradation (degradations.composite)

log = logging.getLogger(__name__)

GROUPS = ("known", "unseen", "mixed", "regions")
MODE_CHOICES = ("input", "baseline", "none", "adapters", "oh", "sw", "pw", "oracle", "pw_oracle")
CACHE_FORMAT = "abair-evalset/1"
SPEC_FILE = "spec.json"
_SET_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# A random crop flatter than this (grey-level std) is redrawn: featureless crops (retina's black
# surround, sky) say nothing about restoration and make PSNR swing wildly.
_MIN_CROP_STD = 0.04
_CROP_TRIES = 8
MASK_DIR = "mask"
# Distinct degradations an image of a regions set shows at least (fewer when it has fewer regions
# or the set fewer degradations): a regions set is about different degradations side by side.
_DISTINCT_PER_IMAGE = 2
# The composite generator's share of smooth blob layouts (the rest are rectangles).
_BLOB_FRACTION = 0.5


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
    regions: tuple[tuple[str, float], ...] = ()               # regions set: what its regions draw from
    region_count: tuple[int, int] = (2, 4)                    # regions set: regions per image, inclusive
    clean_regions: float = 0.0                                # regions set: chance a further region stays clean
    modes: tuple[str, ...] | None = None                      # the evaluate.modes run on this set (None: all)

    @property
    def kind(self) -> str:
        if self.path is not None:
            return "paired"
        return "regions" if self.regions else "synthetic"

    @property
    def mask_classes(self) -> tuple[str, ...]:
        """What bit i of a regions set's masks stands for (empty for other sets)."""
        return tuple(name for name, _ in self.regions)

    def degradation_names(self) -> list[str]:
        """Every degradation the set's images are made with."""
        return [name for name, _ in (*self.degradations, *self.regions)]

    def as_dict(self) -> dict:
        base = {"name": self.name, "group": self.group, "task": list(self.task), "kind": self.kind,
                **({"modes": list(self.modes)} if self.modes is not None else {})}
        if self.kind == "paired":
            return {**base, "path": self.path, **({"first": self.first} if self.first is not None else {})}
        if self.kind == "regions":
            return {**base, "clean": self.clean, "regions": [[n, s] for n, s in self.regions],
                    "region_count": list(self.region_count), "clean_regions": self.clean_regions,
                    "seed": self.seed, "count": self.count, "crop": self.crop}
        return {**base, "clean": self.clean, "degradations": [[n, s] for n, s in self.degradations],
                "seed": self.seed, "count": self.count, "crop": self.crop}

    def describe(self) -> str:
        if self.kind == "paired":
            if self.path.startswith("{"):
                spec = json.loads(self.path)
                return (f"held-out {spec.get('holdout', 0):g} (by {spec.get('group', 'image')}) of "
                        + ", ".join(f"`{p}`" for p in spec["paths"]))
            return f"paired `{self.path}`" + (f", first {self.first}" if self.first is not None else "")
        if self.kind == "regions":
            lo, hi = self.region_count
            pool = ", ".join(f"{n} {s:g}" for n, s in self.regions)
            clean = f" or clean (p {self.clean_regions:g} beyond the first two)" if self.clean_regions else ""
            return f"{lo}-{hi} regions, each one of {pool}{clean}, on `{self.clean}`"
        chain = " + ".join(f"{n} {s:g}" for n, s in self.degradations)
        return f"{chain} on `{self.clean}`"


def parse_sets(cfg: dict) -> list[SetSpec]:
    """The set specs of an `evaluate` section (defaults applied), checked; AbairError otherwise."""
    raw_sets = cfg.get("sets")
    if not isinstance(raw_sets, list) or not raw_sets:
        raise AbairError("evaluate.sets", "no evaluation sets declared")
    defaults = cfg.get("defaults") or {}
    regions_defaults = {**defaults, **(cfg.get("regions_defaults") or {})}
    specs = [_parse_set(raw, i, regions_defaults if isinstance(raw, dict) and "regions" in raw else defaults)
             for i, raw in enumerate(raw_sets)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise AbairError(f"evaluate.sets.{spec.name}", "set names must be unique (they name the cache folders)")
        seen.add(spec.name)
    return specs


def _parse_set(raw, index: int, defaults: dict) -> SetSpec:
    spec = _parse_images(raw, index, defaults)
    modes = {**defaults, **raw}.get("modes")
    if modes is None:
        return spec
    where = f"evaluate.sets.{spec.name}.modes"
    if not isinstance(modes, list) or not modes or any(m not in MODE_CHOICES for m in modes):
        raise AbairError(where, f"must be a non-empty list of modes from {list(MODE_CHOICES)}, got {modes!r}")
    return dataclasses.replace(spec, modes=tuple(modes))


def _parse_images(raw, index: int, defaults: dict) -> SetSpec:
    """A set's spec but its modes: what it is made of (see the module docstring)."""
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
    given = [key for key in ("path", "degradations", "regions") if key in raw]
    if len(given) > 1:
        raise AbairError(where, f"give one of `path` (a paired folder), `degradations` (a synthetic set) or "
                                f"`regions` (a regions set), not {' and '.join(f'`{k}`' for k in given)}")
    if (group == "regions") != ("regions" in raw):
        raise AbairError(where, "a set of group `regions` is made with `regions: [[name, severity], ...]`, "
                                "and only such a set is of group `regions`")
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
    clean = merged.get("clean", "val")
    count, crop = merged.get("count"), merged.get("crop")
    for key, value in (("count", count), ("crop", crop)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise AbairError(where, f"{key} must be a positive integer or null, got {value!r}")
    if "regions" in raw:
        pool = _parse_chain(raw["regions"], where, "regions")
        names = [n for n, _ in pool]
        if len(set(names)) != len(names) or len(names) > MAX_MASK_CLASSES:
            raise AbairError(f"{where}.regions", f"needs distinct degradations, at most {MAX_MASK_CLASSES} "
                                                 f"(one bit each in the uint8 mask), got {names}")
        return SetSpec(name, group, tuple(task if "task" in raw else names), clean=str(clean), seed=int(merged.get("seed", 0)),
                       count=count, crop=crop, regions=pool, region_count=_parse_region_count(merged, where),
                       clean_regions=_parse_share(merged.get("clean_regions", 0.0), f"{where}.clean_regions"))
    chain = _parse_chain(merged.get("degradations"), where)
    return SetSpec(name, group, tuple(task), clean=str(clean), degradations=chain,
                   seed=int(merged.get("seed", 0)), count=count, crop=crop)


def _parse_region_count(merged: dict, where: str) -> tuple[int, int]:
    bounds = merged.get("region_count", [2, 4])
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)
            and 1 <= bounds[0] <= bounds[1]):
        raise AbairError(f"{where}.region_count", f"must be [lo, hi] with 1 <= lo <= hi, got {bounds!r}")
    return int(bounds[0]), int(bounds[1])


def _parse_share(value, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise AbairError(where, f"must be a probability in [0, 1], got {value!r}")
    return float(value)


def _parse_chain(steps, where: str, key: str = "degradations") -> tuple[tuple[str, float], ...]:
    """A synthetic set's [[name, severity], ...], each name a registered degradation."""
    import degradations

    if not isinstance(steps, list) or not steps:
        raise AbairError(where, f"needs `path` (a paired folder) or a non-empty `{key}` list")
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
    # group, task and modes say how a set is scored, not what its images are
    return {"format": CACHE_FORMAT, "spec": {k: v for k, v in spec.as_dict().items() if k not in ("group", "task", "modes")},
            "sources": _source_digest(sources),
            "code": degradation_code_hash(spec.degradation_names())}


def _clean_images(spec: SetSpec, sources):
    """(i, source, clean 8-bit-valued float crop) for each image of a synthetic or regions set.

    Image i uses clean source i mod len(sources); its crop draws from a generator seeded by
    (seed, source, i), so every image is reproducible on its own and a set with the same seed,
    clean and crop as another shows the same clean crops."""
    count = spec.count if spec.count is not None else len(sources)
    loaded: dict[str, np.ndarray] = {}
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
        yield i, source, imageio.to_float_rgb(imageio.to_uint8(clean))


def _write_pair(folder: Path, name: str, degraded: np.ndarray, clean: np.ndarray) -> None:
    for side, img in (("input", degraded), ("target", clean)):
        (folder / side).mkdir(parents=True, exist_ok=True)
        (folder / side / name).write_bytes(imageio.encode_png(img, compression=3))


def build_synthetic(spec: SetSpec, sources, folder: Path) -> list[dict]:
    """Write the set's PNG pairs into `folder` (input/, target/); returns per-image records.
    An image's degradations draw from a generator seeded by (seed, source, i, 1)."""
    from degradations.composite import apply_chain

    records = []
    for i, source, clean in _clean_images(spec, sources):
        degraded, steps = apply_chain(clean, np.random.default_rng([spec.seed, source.seed_key, i, 1]),
                                      list(spec.degradations))
        name = f"{i:03d}-{_slug(source.id)}.png"
        _write_pair(folder, name, degraded, clean)
        records.append({"file": name, "source": source.id, "degradations": steps})
    return records


def region_picks(rng: np.random.Generator, count: int, pool: int, clean_share: float) -> list[int | None]:
    """Which entry of a pool of `pool` degradations each of `count` regions gets (None: clean).

    min(_DISTINCT_PER_IMAGE, pool, count) distinct entries go to regions chosen at random; every
    other region stays clean with probability `clean_share`, else draws an entry uniformly."""
    distinct = min(_DISTINCT_PER_IMAGE, pool, count)
    picks: list[int | None] = [None] * count
    slots = rng.permutation(count)
    for slot, entry in zip(slots[:distinct], rng.choice(pool, size=distinct, replace=False)):
        picks[int(slot)] = int(entry)
    for slot in slots[distinct:]:
        picks[int(slot)] = None if rng.random() < clean_share else int(rng.integers(pool))
    return picks


def degrade_regions(clean: np.ndarray, rng: np.random.Generator, spec: SetSpec) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(degraded, mask uint8 HxW, per-region records) for one image of a regions set: a composite
    layout (blobs or rectangles) of region_count regions, one degradation (or none) per region,
    each run on its region's box plus context and pasted on the region only (composite.degrade_region),
    so a clean region keeps the input's exact pixels. Bit i of the mask: spec.regions[i] ran there."""
    from degradations.composite import bounding_box, degrade_region, region_layout

    height, width = clean.shape[:2]
    lo, hi = spec.region_count
    labels, shapes = region_layout(rng, height, width, int(rng.integers(lo, hi + 1)), _BLOB_FRACTION)
    count = len(shapes)
    degraded, mask = clean.copy(), np.zeros((height, width), np.uint8)
    records = []
    for label, pick in enumerate(region_picks(rng, count, len(spec.regions), spec.clean_regions)):
        region = labels == label
        bbox = bounding_box(region)
        record = {"shape": shapes[label], "bbox": bbox, "area": round(float(region.mean()), 6), "degradation": None}
        if pick is not None:
            name, severity = spec.regions[pick]
            (applied,) = degrade_region(clean, degraded, region, bbox, rng, [(name, severity, {})])
            mask[region] = 1 << pick
            record.update(degradation=name, severity=severity, params=applied["params"])
        records.append(record)
    return degraded, mask, records


def build_regions(spec: SetSpec, sources, folder: Path) -> list[dict]:
    """Write a regions set: PNG pairs (input/, target/) and each image's mask (mask/, same name);
    returns per-image records. Layout and degradations draw from a generator seeded by
    (seed, source, i, 1)."""
    records = []
    for i, source, clean in _clean_images(spec, sources):
        degraded, mask, regions = degrade_regions(clean, np.random.default_rng([spec.seed, source.seed_key, i, 1]), spec)
        name = f"{i:03d}-{_slug(source.id)}.png"
        _write_pair(folder, name, degraded, clean)
        (folder / MASK_DIR).mkdir(parents=True, exist_ok=True)
        (folder / MASK_DIR / name).write_bytes(imageio.encode_png(mask, compression=3))
        records.append({"file": name, "source": source.id, "classes": list(spec.mask_classes), "regions": regions})
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
        records = (build_regions if spec.kind == "regions" else build_synthetic)(spec, sources, tmp)
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
    return {"spec": spec.as_dict(), "sources": sizes, "code": degradation_code_hash(spec.degradation_names())}


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
    masks: list[np.ndarray] | None = None   # regions sets: uint8 HxW, bit i = spec.mask_classes[i]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [t.shape[:2] for t in self.targets]


def load_set(spec: SetSpec, folder: str, multiple: int) -> LoadedSet:
    """Every pair of a folder, checked (missing partner, size mismatch, unreadable file: one
    AbairError naming the file) and centre-cropped to the evaluation grid."""
    paired = paired_folder(spec, folder)
    inputs, targets = [], []
    masks: list[np.ndarray] | None = [] if spec.kind == "regions" else None
    for name in paired.names:
        degraded, clean = paired.load(name)
        where = storage.join(paired.root if isinstance(paired.root, str) else paired.root[0], "input", name)
        inputs.append(np.ascontiguousarray(centre_crop(degraded, multiple, where)))
        targets.append(np.ascontiguousarray(centre_crop(clean, multiple, where)))
        if masks is not None:
            masks.append(np.ascontiguousarray(centre_crop(_read_mask(folder, name, degraded.shape[:2]), multiple, where)))
    return LoadedSet(spec, folder, list(paired.names), inputs, targets, masks)


def _read_mask(folder: str, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A regions set's cached mask of one image (uint8 HxW), checked against its input's size."""
    uri = storage.join(folder, MASK_DIR, name)
    try:
        data = storage.read_bytes(uri)
    except (OSError, AbairError):
        raise AbairError(uri, "the regions set's mask is missing (delete the set's folder to rebuild it)") from None
    mask = imageio.decode(data, uri)
    if mask.ndim != 2 or mask.dtype != np.uint8 or mask.shape != tuple(shape):
        raise AbairError(uri, f"is not a uint8 mask of its input's size {shape[1]}x{shape[0]} "
                              "(delete the set's folder to rebuild it)")
    return mask
