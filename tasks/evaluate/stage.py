"""The `evaluate` stage: the ABAIR paper's tables, computed from this pipeline's own models.

Evaluation sets come from the `evaluate` params section, one spec per set:

    paired:     {name, group, task: [adapter, ...], path: FOLDER}        FOLDER/input/F, FOLDER/target/F
    synthetic:  {name, group, task: [...], clean: val | samples | FOLDER,
                 degradations: [[name, severity], ...], seed, count, crop}

group is known | unseen | mixed (the paper's three tables); task names the adapters that are
"the right ones" for the set (the oracle mode blends them uniformly). `clean: val` uses the shard
set's validation source images (index.json splits.val.sources), which training never saw.
Synthetic sets are generated deterministically and cached as PNG pairs under
`<cache>/<name>/{input,target}/` with a spec.json; they are rebuilt only when their spec, their
clean sources or the degradation code change.

Protocol (PromptIR / Restormer): images centre-cropped to a multiple of 16; PSNR and SSIM
(torchmetrics, data_range 1) on RGB in [0, 1] per image, then averaged over the set; optionally
on the BT.601 Y channel too. PSNR of a perfect restoration is capped at PSNR_CAP so averages
and JSON stay finite. Modes, all on the same images:

    input            the degraded input itself
    none             the backbone alone
    adapter_<name>   the backbone with that one adapter
    oh, sw           the estimator's one-hot choice / soft blend (ABAIR)
    oracle           the set's task adapters, uniform weights (absent when none exists)

Outputs: metrics.json (flat `<group>/<set>/<mode>/<metric>` keys plus summaries; DVC metrics),
results.md (paper-like tables), plots/ (radar, bars per group, estimator confusion, strips).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tasks.core import imageio

from tasks.core import storage
from tasks.core.errors import AbairError
from tasks.core.metrics import PSNR_CAP, image_metrics, psnr, ssim, to_y  # noqa: F401
from tasks.core.params import params_hash

log = logging.getLogger(__name__)

GROUPS = ("known", "unseen", "mixed")
GROUP_TITLES = {"known": "Known degradations", "unseen": "Unseen degradations", "mixed": "Mixed degradations"}
MODE_CHOICES = ("input", "none", "adapters", "oh", "sw", "oracle")
DECIMALS = 4
CACHE_FORMAT = "abair-evalset/1"
SPEC_FILE = "spec.json"
# Knobs that change how the evaluation runs (speed, memory, pictures), not what is measured.
RUNTIME_KNOBS = ("cache", "max_pixels", "batch", "device", "threads", "temperature", "strips", "strip_crop")
_SET_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# A random crop flatter than this (grey-level std) is redrawn: featureless crops (retina's black
# surround, sky) say nothing about restoration and make PSNR swing wildly.
_MIN_CROP_STD = 0.04
_CROP_TRIES = 8


# ------------------------------------------------------------------------------------------------
# Metrics


def centre_crop(img: np.ndarray, multiple: int, where: str) -> np.ndarray:
    """The centred H' x W' crop with H', W' the largest multiples of `multiple` (PromptIR)."""
    height, width = img.shape[:2]
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise AbairError(where, f"image is {width}x{height}, smaller than the {multiple} px evaluation grid")
    y0, x0 = (height - new_h) // 2, (width - new_w) // 2
    return img[y0:y0 + new_h, x0:x0 + new_w]


# ------------------------------------------------------------------------------------------------
# Set specs


@dataclass(frozen=True)
class SetSpec:
    name: str
    group: str
    task: tuple[str, ...]
    path: str | None = None                                   # paired folder
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
            return {**base, "path": self.path}
        return {**base, "clean": self.clean, "degradations": [[n, s] for n, s in self.degradations],
                "seed": self.seed, "count": self.count, "crop": self.crop}

    def describe(self) -> str:
        if self.kind == "paired":
            return f"paired `{self.path}`"
        chain = " + ".join(f"{n} {s:g}" for n, s in self.degradations)
        return f"{chain} on `{self.clean}`"


def parse_sets(cfg: dict) -> list[SetSpec]:
    """The set specs of an `evaluate` section (defaults applied), checked; AbairError otherwise."""
    import degradations

    raw_sets = cfg.get("sets")
    if not isinstance(raw_sets, list) or not raw_sets:
        raise AbairError("evaluate.sets", "no evaluation sets declared")
    defaults = cfg.get("defaults") or {}
    specs: list[SetSpec] = []
    for i, raw in enumerate(raw_sets):
        where = f"evaluate.sets[{i}]"
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
            specs.append(SetSpec(name, group, tuple(task), path=str(raw["path"])))
            continue
        merged = {**defaults, **raw}
        steps = merged.get("degradations")
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
        clean = merged.get("clean", "val")
        count, crop = merged.get("count"), merged.get("crop")
        for key, value in (("count", count), ("crop", crop)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise AbairError(where, f"{key} must be a positive integer or null, got {value!r}")
        specs.append(SetSpec(name, group, tuple(task), clean=str(clean), degradations=tuple(chain),
                             seed=int(merged.get("seed", 0)), count=count, crop=crop))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise AbairError(f"evaluate.sets.{spec.name}", "set names must be unique (they name the cache folders)")
        seen.add(spec.name)
    return specs


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
# Clean sources of synthetic sets


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


def set_identity(spec: SetSpec, shards: str) -> dict:
    """What a set's images are, without building them (for suite_fingerprint)."""
    from tasks.data.reader import PairedFolder

    if spec.kind == "paired":
        return {"spec": spec.as_dict(), "files": PairedFolder(spec.path, check=False).fingerprint}
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


def suite_fingerprint(cfg: dict, shards: str = "data/shards") -> str:
    """A stable hash of what is evaluated (set specs and their images' identity, protocol), not of
    how (device, tiling, batch, plots): equal fingerprints mean two evaluations are comparable."""
    specs = parse_sets(cfg)
    return params_hash({"protocol": protocol(cfg), "sets": [set_identity(s, shards) for s in specs]})


# ------------------------------------------------------------------------------------------------
# Running the modes


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
    from tasks.data.reader import PairedFolder

    paired = PairedFolder(folder, check=False)
    inputs, targets = [], []
    for name in paired.names:
        degraded, clean = paired.load(name)
        where = storage.join(folder, "input", name)
        inputs.append(np.ascontiguousarray(centre_crop(degraded, multiple, where)))
        targets.append(np.ascontiguousarray(centre_crop(clean, multiple, where)))
    return LoadedSet(spec, folder, list(paired.names), inputs, targets)


def _batches(shapes: Sequence[tuple], batch: int) -> list[list[int]]:
    """Runs of consecutive same-size images, at most `batch` long."""
    out: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if out and len(out[-1]) < batch and shapes[out[-1][0]] == shape:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _stack(images: list[np.ndarray], device) -> torch.Tensor:
    array = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


def adapter_names(restorer) -> list[str]:
    """Adapters the restorer can weight (its weight columns); none without an adapter bank."""
    if getattr(restorer, "bank", True) is None:
        return []
    return list(getattr(restorer, "names", []) or [])


def mode_plan(spec: SetSpec, names: list[str], has_estimator: bool, modes: Sequence[str]) -> list[tuple[str, str, tuple | None]]:
    """(mode key, Restorer mode, weights) in report order; `input` has no restorer call.

    One adapter alone runs as Restorer mode "oh" with one-hot weights: the same function as a
    weight of 1 on that adapter, but a LoRA adapter is merged into the backbone for the pass,
    which makes it as fast as the backbone alone. An oracle with one right adapter is that same
    call (and so runs once); with several it blends them through mode "oracle"."""
    def one_hot(name: str) -> tuple[float, ...]:
        return tuple(1.0 if n == name else 0.0 for n in names)

    plan: list[tuple[str, str, tuple | None]] = []
    if "input" in modes:
        plan.append(("input", "input", None))
    if "none" in modes:
        plan.append(("none", "none", None))
    if "adapters" in modes:
        plan += [(f"adapter_{name}", "oh", one_hot(name)) for name in names]
    if has_estimator:
        plan += [(mode, mode, None) for mode in ("oh", "sw") if mode in modes]
    right = [n for n in spec.task if n in names]
    if "oracle" in modes and len(right) == 1:
        plan.append(("oracle", "oh", one_hot(right[0])))
    elif "oracle" in modes and right:
        plan.append(("oracle", "oracle", tuple(1.0 / len(right) if n in right else 0.0 for n in names)))
    return plan


@dataclass
class SetResult:
    spec: SetSpec
    images: int
    sizes: list[tuple[int, int]]
    per_image: dict[str, dict[str, list[float]]]            # mode -> metric -> values
    predictions: list[str] = field(default_factory=list)    # estimator argmax per image
    strips: dict[str, list[np.ndarray]] = field(default_factory=dict)   # input / output / target
    strip_mode: str | None = None

    def mean(self, mode: str, metric: str) -> float:
        return float(np.mean(self.per_image[mode][metric]))


def evaluate_set(restorer, loaded: LoadedSet, plan, cfg: dict, device, bar=None) -> SetResult:
    names = adapter_names(restorer)
    y_channel = bool(cfg.get("y_channel", False))
    max_pixels = cfg.get("max_pixels")
    temperature = cfg.get("temperature") or getattr(restorer, "temperature", 1.0)
    n_strips = int(cfg.get("strips", 3))
    strip_mode = next((m for m in ("sw", "oh", "oracle", "none") if any(p[0] == m for p in plan)), None)
    per_image: dict[str, dict[str, list[float]]] = {key: {} for key, _, _ in plan}
    predictions: list[str] = []
    strips: dict[str, list[np.ndarray]] = {"input": [], "output": [], "target": []}
    for batch in _batches([x.shape for x in loaded.inputs], int(cfg.get("batch", 8))):
        x = _stack([loaded.inputs[i] for i in batch], device)
        y = _stack([loaded.targets[i] for i in batch], device)
        done: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for key, mode, weights in plan:
            if mode == "input":
                out = x
            else:
                call = (mode, weights)
                if call not in done:
                    done[call] = restorer.restore(x, mode=mode, weights=None if weights is None else list(weights),
                                                  temperature=temperature, max_pixels=max_pixels)
                    if bar is not None:
                        bar.update(len(batch))
                out, _ = done[call]
            for metric, values in image_metrics(out, y, y_channel).items():
                per_image[key].setdefault(metric, []).extend(values)
            if key == strip_mode and len(strips["output"]) < n_strips:
                take = batch[:n_strips - len(strips["output"])]
                strips["output"].extend(imageio.to_uint8(out[j].permute(1, 2, 0).cpu().numpy()) for j in range(len(take)))
                strips["input"].extend(loaded.inputs[i] for i in take)
                strips["target"].extend(loaded.targets[i] for i in take)
        # The estimator's choice: from the SW (or OH) pass when one ran, else asked directly.
        est_weights = (done.get(("sw", None)) or done.get(("oh", None)) or (None, None))[1]
        if est_weights is None and names and getattr(restorer, "estimator", None) is not None:
            with torch.no_grad():
                est_weights = restorer.estimator.weights(x, "sw", temperature)
        if est_weights is not None:
            predictions.extend(names[int(k)] for k in est_weights.argmax(dim=1).cpu())
    return SetResult(loaded.spec, len(loaded.inputs), loaded.sizes, per_image, predictions, strips, strip_mode)


# ------------------------------------------------------------------------------------------------
# Metrics dict


def _r(value: float) -> float:
    return round(float(value), DECIMALS)


def estimator_confusion(results: list[SetResult], names: list[str]) -> dict:
    """Rows: known single-adapter sets (scored) then unseen single-degradation sets (shown only)."""
    rows = []
    for res in results:
        if not res.predictions or len(res.spec.task) != 1:
            continue
        if res.spec.group == "known" and res.spec.task[0] in names:
            rows.append({"set": res.spec.name, "group": "known", "truth": res.spec.task[0],
                         "counts": [res.predictions.count(n) for n in names]})
        elif res.spec.group == "unseen":
            rows.append({"set": res.spec.name, "group": "unseen", "truth": res.spec.task[0],
                         "counts": [res.predictions.count(n) for n in names]})
    scored = [r for r in rows if r["group"] == "known"]
    correct = sum(r["counts"][names.index(r["truth"])] for r in scored)
    total = sum(sum(r["counts"]) for r in scored)
    return {"names": names, "rows": rows, "correct": correct, "total": total,
            "accuracy": correct / total if total else None}


def build_metrics(results: list[SetResult], counts: dict, confusion: dict | None) -> dict:
    """The flat metrics dict (metrics.json): keys sorted, values rounded."""
    flat: dict[str, float | int] = {}
    metric_names = sorted({m for r in results for v in r.per_image.values() for m in v})
    for res in results:
        prefix = f"{res.spec.group}/{res.spec.name}"
        flat[f"sets/{prefix}/images"] = res.images
        for mode, values in res.per_image.items():
            for metric in values:
                flat[f"{prefix}/{mode}/{metric}"] = _r(res.mean(mode, metric))
    for scope in (*GROUPS, "all"):
        members = [r for r in results if scope == "all" or r.spec.group == scope]
        modes = {m for r in members for m in r.per_image}
        for mode in modes:
            for metric in metric_names:
                values = [r.mean(mode, metric) for r in members if metric in r.per_image.get(mode, {})]
                if values:
                    flat[f"summary/{scope}/{mode}/{metric}"] = _r(np.mean(values))
    if confusion is not None and confusion["accuracy"] is not None:
        flat["estimator/accuracy"] = _r(confusion["accuracy"])
        flat["estimator/images"] = confusion["total"]
        for row in confusion["rows"]:
            if row["group"] == "known":
                hits = row["counts"][confusion["names"].index(row["truth"])]
                flat[f"estimator/known/{row['set']}/accuracy"] = _r(hits / max(sum(row["counts"]), 1))
    flat["params/backbone"] = int(counts["backbone"])
    flat["params/adapters"] = int(counts["adapters"])
    flat["params/estimator"] = int(counts["estimator"])
    flat["params/total"] = int(counts["total"])
    for name, n in counts.get("per_adapter", {}).items():
        flat[f"params/adapter/{name}"] = int(n)
    return dict(sorted(flat.items()))


# ------------------------------------------------------------------------------------------------
# Tables (from the flat metrics alone, so the registry and Prefect can rebuild them)


MODE_LABELS = {"input": "Input", "none": "Backbone", "oh": "ABAIR (OH)", "sw": "ABAIR (SW)", "oracle": "Oracle"}


def mode_label(mode: str) -> str:
    return MODE_LABELS.get(mode) or (f"Adapter {mode[len('adapter_'):]}" if mode.startswith("adapter_") else mode)


def _parse(metrics: dict) -> dict:
    """{group: {set: {mode: {metric: value}}}} from the flat keys."""
    tree: dict = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] in GROUPS:
            group, name, mode, metric = parts
            tree.setdefault(group, {}).setdefault(name, {}).setdefault(mode, {})[metric] = value
    return tree


def ordered_modes(modes: Iterable[str], set_order: Sequence[str] = ()) -> list[str]:
    """Input, Backbone, adapters (in the order of the sets they serve, then by name), OH, SW, Oracle."""
    modes = set(modes)
    adapters = [m for m in modes if m.startswith("adapter_")]
    rank = {name: i for i, name in enumerate(set_order)}
    adapters.sort(key=lambda m: (rank.get(m[len("adapter_"):], len(rank)), m))
    head = [m for m in ("input", "none") if m in modes]
    tail = [m for m in ("oh", "sw", "oracle") if m in modes]
    rest = sorted(modes - set(head) - set(tail) - set(adapters))
    return head + adapters + rest + tail


def method_params(metrics: dict, mode: str) -> int | None:
    """Parameters a method runs with (the paper's Params column)."""
    backbone = metrics.get("params/backbone")
    if mode == "input" or backbone is None:
        return None
    if mode == "none":
        return backbone
    if mode.startswith("adapter_"):
        return backbone + metrics.get(f"params/adapter/{mode[len('adapter_'):]}", 0)
    if mode == "oracle":
        return backbone + metrics.get("params/adapters", 0)
    return metrics.get("params/total")


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def group_table(metrics: dict, group: str, set_order: Sequence[str] = ()) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, markdown rows, table-artifact rows) for one group: methods x sets, PSNR/SSIM cells,
    the group average and the method's parameter count; the best non-oracle PSNR per column in bold."""
    tree = _parse(metrics).get(group, {})
    sets = [s for s in set_order if s in tree] + sorted(s for s in tree if s not in set_order)
    modes = ordered_modes({m for s in sets for m in tree[s]}, [n for n in set_order])
    header = ["Method", *sets, "Average", "Params"]

    def pair(mode: str, name: str | None) -> tuple[float | None, float | None]:
        if name is None:
            return metrics.get(f"summary/{group}/{mode}/psnr"), metrics.get(f"summary/{group}/{mode}/ssim")
        values = tree[name].get(mode, {})
        return values.get("psnr"), values.get("ssim")

    columns = [*sets, None]
    best = {}
    for col in columns:
        scores = [pair(m, col)[0] for m in modes if m != "oracle"]
        scores = [s for s in scores if s is not None]
        best[col] = max(scores) if scores else None
    rows, records = [], []
    for mode in modes:
        cells, record = [mode_label(mode)], {"method": mode_label(mode)}
        for col in columns:
            p, s = pair(mode, col)
            label = col or "average"
            if p is None:
                cells.append("-")
            else:
                text = f"{p:.2f}/{s:.3f}" if s is not None else f"{p:.2f}"
                cells.append(f"**{text}**" if mode != "oracle" and p == best[col] else text)
            record[f"{label} psnr"] = p
            record[f"{label} ssim"] = s
        n = method_params(metrics, mode)
        cells.append(format_params(n))
        record["params"] = n
        rows.append(cells)
        records.append(record)
    return header, rows, records


def modes_table(metrics: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    """OH vs SW vs Oracle (and the backbone), averaged per group over the sets where all of them exist."""
    tree = _parse(metrics)
    compared = ["none", "oh", "sw", "oracle"]
    header = ["Group", "Sets", *[mode_label(m) for m in compared]]
    rows, records = [], []
    for scope in (*GROUPS, "all"):
        groups = GROUPS if scope == "all" else (scope,)
        members = [tree[g][s] for g in groups for s in tree.get(g, {})]
        present = [m for m in compared if any(m in s for s in members)]
        if not members or not present:
            continue
        common = [s for s in members if all(m in s for m in present)]
        if not common:
            continue
        cells = [scope, f"{len(common)}/{len(members)}"]
        record = {"group": scope, "sets": len(common), "of": len(members)}
        for mode in compared:
            if mode not in present:
                cells.append("-")
                record[f"{mode} psnr"] = record[f"{mode} ssim"] = None
                continue
            p = float(np.mean([s[mode]["psnr"] for s in common]))
            q = float(np.mean([s[mode]["ssim"] for s in common]))
            cells.append(f"{p:.2f}/{q:.3f}")
            record[f"{mode} psnr"], record[f"{mode} ssim"] = _r(p), _r(q)
        rows.append(cells)
        records.append(record)
    return header, rows, records


def paper_tables(metrics: dict, cfg: dict | None = None) -> dict[str, list[dict]]:
    """Table rows (lists of dicts) keyed by table name, for Prefect table artifacts."""
    order = [s.name for s in parse_sets(cfg)] if cfg else []
    tables = {}
    tree = _parse(metrics)
    for group in GROUPS:
        if group in tree:
            tables[group] = group_table(metrics, group, order)[2]
    tables["modes"] = modes_table(metrics)[2]
    return tables


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(metrics: dict, results: list[SetResult], confusion: dict | None, info: dict) -> str:
    order = [r.spec.name for r in results]
    tree = _parse(metrics)
    out = ["# ABAIR evaluation", "",
           f"Checkpoints `{info['checkpoints']}`; suite `{info['suite']}`; device {info['device']}; "
           f"{sum(r.images for r in results)} images in {len(results)} sets.", "",
           f"Protocol: images centre-cropped to a multiple of {info['protocol']['multiple']} px; PSNR (dB) / SSIM "
           f"on RGB in [0, 1] (torchmetrics, per image, then the set mean; PSNR capped at {PSNR_CAP:g} dB)"
           + ("; Y-channel (BT.601) figures in metrics.json" if info["protocol"]["y_channel"] else "")
           + ". Cells are PSNR/SSIM; **bold** is the best method short of the oracle. Params: parameters the "
             "method runs with (backbone, + its adapter(s), + the estimator for OH/SW).", ""]
    table_no = 1
    for group in GROUPS:
        if group not in tree:
            continue
        header, rows, _ = group_table(metrics, group, order)
        sets = [r for r in results if r.spec.group == group]
        out += [f"## Table {table_no}: {GROUP_TITLES[group].lower()}", ""]
        if group == "unseen":
            out += ["No adapter was trained for these degradations; an oracle row appears only where one exists.", ""]
        out += [_markdown(header, rows), ""]
        out += ["Sets: " + "; ".join(f"`{r.spec.name}` = {r.spec.describe()}, {r.images} images" for r in sets), ""]
        table_no += 1
    header, rows, _ = modes_table(metrics)
    out += [f"## Table {table_no}: OH vs SW vs oracle", "",
            "Means over the sets of each group where every listed mode ran (Sets: used/all).", "",
            _markdown(header, rows), ""]
    table_no += 1

    out += [f"## Table {table_no}: evaluation sets", ""]
    size_rows = []
    for r in results:
        sizes = sorted(set(r.sizes))
        size_text = ", ".join(f"{w}x{h}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        size_rows.append([f"`{r.spec.name}`", r.spec.group, r.spec.describe(), ", ".join(r.spec.task) or "-",
                          str(r.images), size_text])
    out += [_markdown(["Set", "Group", "Images from", "Right adapter(s)", "Images", "Size (WxH)"], size_rows), ""]

    out += ["## Degradation estimator", ""]
    if confusion is None or not confusion["rows"]:
        out += ["No estimator in the checkpoints (or no single-degradation set): OH/SW not evaluated.", ""]
    else:
        if confusion["accuracy"] is not None:
            out += [f"Accuracy on the known single-degradation sets: **{confusion['accuracy']:.3f}** "
                    f"({confusion['correct']}/{confusion['total']} images, argmax of the estimator vs the set's task). "
                    "Unseen sets are listed to show which adapter the estimator reaches for.", ""]
        header = ["Set (truth)", *[f"-> {n}" for n in confusion["names"]]]
        rows = [[f"{row['set']} ({row['truth']}{', unseen' if row['group'] == 'unseen' else ''})",
                 *[str(c) for c in row["counts"]]] for row in confusion["rows"]]
        out += [_markdown(header, rows), ""]
    out += ["## Parameters", "",
            _markdown(["Component", "Parameters"],
                      [[k, f"{metrics[f'params/{k}']:,}"] for k in ("backbone", "adapters", "estimator", "total")]), ""]
    out += ["## Plots", "", "![radar](plots/radar.png)", ""]
    out += [f"- [{GROUP_TITLES[g]}](plots/bars_{g}.png)" for g in GROUPS if g in tree]
    if confusion is not None and confusion["rows"]:
        out.append("- [Estimator confusion](plots/confusion.png)")
    out += [f"- strip `{r.spec.name}`: [input / output / target](plots/strips/{r.spec.name}.png)"
            for r in results if r.strips.get("output")]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(modes: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    fixed = {"input": "#9e9e9e", "none": "#5d4037", "oh": "#1f77b4", "sw": "#d62728", "oracle": "#2ca02c"}
    adapters = [m for m in modes if m not in fixed]
    cmap = plt.get_cmap("Set2")
    return {**fixed, **{m: cmap(i % 8) for i, m in enumerate(adapters)}}


def plot_radar(metrics: dict, set_order: Sequence[str], path: Path) -> Path:
    """The paper's Figure 1: one axis per set, PSNR rescaled per axis (the axis' worst plotted
    mode at the inner ring, its best at the rim), one polygon per mode."""
    plt = _pyplot()
    tree = _parse(metrics)
    axes_sets = [(g, s) for g in GROUPS for s in ([n for n in set_order if n in tree.get(g, {})]
                                                  + sorted(n for n in tree.get(g, {}) if n not in set_order))]
    candidates = ["input", "none", "oh", "sw", "oracle"]
    modes = [m for m in candidates if axes_sets and all(m in tree[g][s] for g, s in axes_sets)]
    fig = plt.figure(figsize=(7.5, 7.5))
    ax = fig.add_subplot(projection="polar")
    if len(axes_sets) < 3 or not modes:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "radar needs 3+ sets with common modes", ha="center", transform=ax.transAxes)
    else:
        angles = np.linspace(0, 2 * np.pi, len(axes_sets), endpoint=False)
        values = np.array([[tree[g][s][m]["psnr"] for g, s in axes_sets] for m in modes])
        lo, hi = values.min(axis=0), values.max(axis=0)
        scaled = 0.2 + 0.8 * np.where(hi > lo, (values - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)
        colours = _colours(modes)
        for mode, radii in zip(modes, scaled):
            closed = np.append(radii, radii[0])
            theta = np.append(angles, angles[0])
            ax.plot(theta, closed, color=colours[mode], linewidth=2 if mode == "sw" else 1.3, label=mode_label(mode))
            ax.fill(theta, closed, color=colours[mode], alpha=0.06)
        ax.set_xticks(angles)
        ax.set_xticklabels([f"{s}\n{lo[i]:.1f}-{hi[i]:.1f} dB" for i, (_, s) in enumerate(axes_sets)], fontsize=8)
        ax.set_yticks([0.2, 0.6, 1.0])
        ax.set_yticklabels([])
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper right", bbox_to_anchor=(1.28, 1.1), fontsize=8)
    ax.set_title("PSNR per set, rescaled per axis", pad=24)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(metrics: dict, group: str, set_order: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    tree = _parse(metrics).get(group, {})
    sets = [s for s in set_order if s in tree] + sorted(s for s in tree if s not in set_order)
    modes = ordered_modes({m for s in sets for m in tree[s]}, set_order)
    labels = [*sets, "average"]
    colours = _colours(modes)
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.2 * len(labels) * max(len(modes), 1) + 2)), 4.6))
    x = np.arange(len(labels))
    for k, mode in enumerate(modes):
        heights = [tree[s].get(mode, {}).get("psnr", np.nan) for s in sets]
        heights.append(metrics.get(f"summary/{group}/{mode}/psnr", np.nan))
        ax.bar(x + (k - (len(modes) - 1) / 2) * width, heights, width, label=mode_label(mode), color=colours[mode])
    finite = [v for s in sets for m in modes for v in [tree[s].get(m, {}).get("psnr")] if v is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 3), max(finite) + 1.5)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(GROUP_TITLES[group])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(modes), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion: dict, path: Path) -> Path:
    plt = _pyplot()
    names, rows = confusion["names"], confusion["rows"]
    counts = np.array([row["counts"] for row in rows], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 0.5 * len(rows) + 2))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['set']}{' (unseen)' if r['group'] == 'unseen' else ''}" for r in rows])
    n_known = sum(r["group"] == "known" for r in rows)
    if 0 < n_known < len(rows):
        ax.axhline(n_known - 0.5, color="black", linewidth=1)
    ax.set_xlabel("estimator's choice (argmax)")
    ax.set_ylabel("set")
    accuracy = confusion.get("accuracy")
    ax.set_title("Estimator" + (f": accuracy {accuracy:.3f} on known sets" if accuracy is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strip(res: SetResult, side: int, path: Path) -> Path:
    """Input / output / target centre crops, one row per image, with the row's PSNRs."""
    plt = _pyplot()
    rows = len(res.strips["output"])
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    out_label = mode_label(res.strip_mode or "")
    for i in range(rows):
        for j, (column, title) in enumerate((("input", "input"), ("output", out_label), ("target", "target"))):
            img = res.strips[column][i]
            h, w = img.shape[:2]
            ch, cw = min(side, h), min(side, w)
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            ax = axes[i][j]
            ax.imshow(img[y0:y0 + ch, x0:x0 + cw], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column != "target":
                key = "input" if column == "input" else res.strip_mode
                title = f"{title} {res.per_image[key]['psnr'][i]:.2f} dB"
            ax.set_title(title, fontsize=9)
    fig.suptitle(f"{res.spec.group}/{res.spec.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(metrics: dict, results: list[SetResult], confusion: dict | None, folder: Path, strip_crop: int) -> list[Path]:
    order = [r.spec.name for r in results]
    paths = [plot_radar(metrics, order, folder / "radar.png")]
    groups = {r.spec.group for r in results}
    paths += [plot_bars(metrics, g, order, folder / f"bars_{g}.png") for g in GROUPS if g in groups]
    if confusion is not None and confusion["rows"]:
        paths.append(plot_confusion(confusion, folder / "confusion.png"))
    (folder / "strips").mkdir(exist_ok=True)
    paths += [plot_strip(r, strip_crop, folder / "strips" / f"{r.spec.name}.png") for r in results if r.strips.get("output")]
    return paths


# ------------------------------------------------------------------------------------------------
# The stage


def _estimator_temperature(path: Path) -> float:
    """The SW temperature the estimator was trained with (its file's metadata), else 1."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return float((f.metadata() or {}).get("temperature", 1.0))
    except (OSError, ValueError, RuntimeError):
        return 1.0


def load_restorer(checkpoints: str, device) -> Any:
    """The system in a checkpoints folder: backbone required; adapters and estimator optional
    (their modes are then skipped, with a warning)."""
    from tasks.core.components import ADAPTER_DIR, BACKBONE_FILE, ESTIMATOR_FILE, load_system

    folder = Path(checkpoints)
    backbone = folder / BACKBONE_FILE
    if not backbone.is_file():
        raise AbairError(backbone, "backbone checkpoint not found (run the training stages first)")
    adapters = folder / ADAPTER_DIR
    adapters = adapters if adapters.is_dir() and any(adapters.glob("*.safetensors")) else None
    estimator = folder / ESTIMATOR_FILE
    estimator = estimator if estimator.is_file() and adapters is not None else None
    if adapters is None:
        log.warning("evaluate: no adapters in %s: only the input and backbone modes run", folder)
    elif estimator is None:
        log.warning("evaluate: no estimator in %s: OH and SW do not run", folder)
    restorer = load_system(backbone, adapters, estimator, device)
    restorer.temperature = _estimator_temperature(estimator) if estimator is not None else 1.0
    return restorer


def _device(spec: str):
    from tasks.core.device import pick_device

    return pick_device(str(spec or "auto"))


def evaluate_restorer(restorer, cfg: dict, shards: str = "data/shards", reports: str | None = "reports",
                      progress: bool = True, info: dict | None = None) -> dict:
    """Evaluate any restorer (an object with restore(images, mode, weights, ...) and `names`) on
    the suite of `cfg`; writes the reports when `reports` is given; returns the flat metrics."""
    from models.restorer import param_counts
    from tqdm import tqdm

    started = time.perf_counter()
    specs = parse_sets(cfg)
    proto = protocol(cfg)
    device = _device(cfg.get("device", "auto"))
    cache = cfg.get("cache", "data/eval")
    names = adapter_names(restorer)
    has_estimator = bool(names) and getattr(restorer, "estimator", None) is not None

    folders = [set_folder(spec, shards, cache) for spec in specs]
    # Every file of every set is read once up front, so a bad one stops the run before any model
    # time is spent; the sets are then loaded again one at a time, keeping memory to one set.
    sizes = [len(load_set(spec, folder, proto["multiple"]).inputs) for spec, folder in zip(specs, folders)]
    plans = [mode_plan(spec, names, has_estimator, proto["modes"]) for spec in specs]
    passes = sum(n * len({(m, w) for _, m, w in plan if m != "input"}) for n, plan in zip(sizes, plans))
    log.info("evaluate: %d sets, %d images, adapters %s, estimator %s, %d image passes on %s",
             len(specs), sum(sizes), names or "none", "yes" if has_estimator else "no", passes, device)
    results: list[SetResult] = []
    previous_threads = torch.get_num_threads()
    if cfg.get("threads") and device.type == "cpu":
        torch.set_num_threads(int(cfg["threads"]))
    try:
        with tqdm(total=passes, desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
            for spec, folder, plan in zip(specs, folders, plans):
                bar.set_postfix_str(f"{spec.group}/{spec.name}")
                ls = load_set(spec, folder, proto["multiple"])
                res = evaluate_set(restorer, ls, plan, cfg, device, bar)
                results.append(res)
                log.info("evaluate: %s/%s (%d images) PSNR %s", ls.spec.group, ls.spec.name, res.images,
                         ", ".join(f"{k} {res.mean(k, 'psnr'):.2f}" for k in res.per_image))
    finally:
        torch.set_num_threads(previous_threads)

    counts = param_counts(getattr(restorer, "backbone", None), getattr(restorer, "bank", None),
                          getattr(restorer, "estimator", None))
    confusion = estimator_confusion(results, names) if has_estimator else None
    metrics = build_metrics(results, counts, confusion)
    elapsed = time.perf_counter() - started
    if reports is not None:
        info = {"checkpoints": "-", "suite": suite_fingerprint(cfg, shards), "device": str(device), "protocol": proto,
                **(info or {})}
        write_reports(metrics, results, confusion, info, Path(reports), int(cfg.get("strip_crop", 96)))
    shown = next((m for m in ("sw", "none", "input") if f"summary/all/{m}/psnr" in metrics), None)
    log.info("evaluate: done in %.1f s; mean PSNR %s%s", elapsed,
             f"{metrics[f'summary/all/{shown}/psnr']:.2f} dB ({mode_label(shown)})" if shown else "-",
             f" -> {reports}" if reports is not None else "")
    return metrics


def write_reports(metrics: dict, results: list[SetResult], confusion: dict | None, info: dict, reports: Path,
                  strip_crop: int) -> dict[str, Path]:
    """metrics.json, results.md and plots/, each replaced atomically."""
    reports.mkdir(parents=True, exist_ok=True)
    with storage.atomic_dir(reports / "plots") as tmp:
        write_plots(metrics, results, confusion, tmp, strip_crop)
    with storage.atomic_path(reports / "results.md") as tmp:
        tmp.write_text(results_markdown(metrics, results, confusion, info))
    with storage.atomic_path(reports / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return {"metrics": reports / "metrics.json", "results": reports / "results.md", "plots": reports / "plots"}


def evaluate(cfg: dict, checkpoints: str = "checkpoints", shards: str = "data/shards", reports: str | None = "reports",
             progress: bool = True) -> dict:
    """Run the stage. `cfg` is the `evaluate` params section. Loads the system from `checkpoints`
    (backbone.safetensors, adapters/*.safetensors, estimator.safetensors), writes reports (and
    logs an MLflow run) when `reports` is given, and returns the flat metrics dict (metrics.json)."""
    device = _device(cfg.get("device", "auto"))
    restorer = load_restorer(checkpoints, device)
    info = {"checkpoints": checkpoints}
    if reports is None:
        return evaluate_restorer(restorer, cfg, shards, None, progress, info)

    from tasks.core import tracking

    suite = suite_fingerprint(cfg, shards)
    with tracking.start_run("evaluate", tags={"abair.stage": "evaluate", "abair.suite": suite}) as run:
        run.log_params({k: v for k, v in cfg.items() if k not in ("sets", "defaults")})
        run.log_params({"sets": [s.name for s in parse_sets(cfg)], "suite": suite, "checkpoints": checkpoints})
        metrics = evaluate_restorer(restorer, cfg, shards, reports, progress, {**info, "suite": suite})
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        folder = Path(reports)
        run.log_artifact(folder / "metrics.json")
        run.log_artifact(folder / "results.md")
        for path in sorted((folder / "plots").rglob("*.png")):
            run.log_artifact(path, str(path.parent.relative_to(folder)))
    return metrics
