"""The `synthesize` stage: clean sources -> webdataset shards of (clean, degraded, mask, json).

Each sample is a random crop degraded by the composite ("degradation CutMix") generator. A
sample depends only on (seed, source id, index), so runs are reproducible whatever the runner or
worker count, and shards are byte-identical across runs (fixed tar mtimes, ordered writes).
Layout of a shard set:

    OUT/train-000000.tar ...   OUT/val-000000.tar ...   OUT/index.json (written last)

The work is cut into units (tasks/data/sources.py: one per GLDv2 tar, or `unit_files` loose
images); each unit writes its own shards, named after it when there are several
(`train-images_007-000000.tar`). A unit's shards are written to a staging folder and published
only once the unit is complete (and, for a tar, its md5 matches), then its done marker
(`.units/<unit>.json`: what index.json needs from it). A retry or re-run keeps the units whose
marker matches (same params, same input) and runs the rest. Locally the set is assembled in the
sibling folder `.OUT.partial/` and renamed into place once complete; on S3 units publish under OUT
and index.json is written last. The units run here, on `workers` local processes, or on a Dask
cluster (`runner: dask`, through Prefect: flows/synthesize.py passes its runner in).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from degradations._common import SRGB_GAMMA, clip01, power
from tasks.core import imageio, paths, storage
from tasks.core.errors import AbairError
from tasks.core.params import params_hash
from tasks.data.catalogs import open_catalog
from tasks.data.sources import Catalog, Item, Source, SourceSkip, Unit, load_source, split_keys

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
ATTRIBUTION_NAME = "ATTRIBUTION.csv"
ATTRIBUTION_COLUMNS = ("id", "landmark_id", "license", "author", "title", "url", "split", "samples")
MARKERS = ".units"          # a unit's done marker: OUT/.units/<unit>.json while the set is being made
SHARD_FORMAT = "abair-shards/1"
MAX_CLASSES = 8  # the mask is one uint8 bit per class
RUNNERS = ("processes", "dask")
DEFAULT_UNIT_FILES = 10000
# Settings that change how the work runs, not what it writes.
# Not hashed into index.json: how the run executes (workers, runner, the unit size: the same
# samples, cut into more or fewer shards), where it reads and writes, and the size limit (whose
# effect, a skipped source, index.json lists by name).
NOT_IN_OUTPUT = ("workers", "endpoint_url", "out", "source", "max_image_pixels", "max_bad_fraction",
                 "runner", "dask_address", "unit_files")


@dataclass
class SourceResult:
    source_id: str
    samples: list          # [(key, {"clean.png": bytes, ...}), ...]
    skip_reason: str | None = None
    class_pixels: np.ndarray | None = None   # per class: pixels carrying that bit
    kinds: Counter | None = None


def sample_rng(seed: int, source: Source, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, source.seed_key, index])


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    height, width = img.shape[:2]
    y0 = int(rng.integers(0, height - size + 1))
    x0 = int(rng.integers(0, width - size + 1))
    return img[y0:y0 + size, x0:x0 + size], [y0, x0, size, size]


def vary_clean(clean: np.ndarray, rng: np.random.Generator, variation: dict) -> np.ndarray:
    """Clean photos vary: some are dim, some are soft. A share `p` of the clean crops gets an
    exposure gain U(exposure) in linear light and a Gaussian softening of sigma U(soften) px, and
    the varied crop is the target: a dim or soft photo is not a degraded one (low light is far
    darker, blur far wider), so the models learn to leave those alone instead of brightening every
    dim photo and sharpening every soft one. Quantised to 8 bits, like the crop."""
    if not variation or rng.random() >= variation.get("p", 0.0):
        return clean
    import cv2

    lo, hi = variation.get("exposure", (1.0, 1.0))
    gain = rng.uniform(lo, hi)
    # degradations' power (OpenCV's exp and log), not numpy's float32 power, whose AVX-512 code path
    # rounds differently: the shards must have the same bytes on every machine
    linear = power(np.asarray(clean, dtype=np.float32), SRGB_GAMMA)
    out = power(clip01(np.multiply(linear, np.float32(gain), out=linear)), 1 / SRGB_GAMMA)
    lo, hi = variation.get("soften", (0.0, 0.0))
    sigma = rng.uniform(lo, hi)
    if sigma > 0.05:
        out = cv2.GaussianBlur(out, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return np.round(out.astype(np.float32) * 255.0) / 255.0


def make_sample(clean_source: np.ndarray, source: Source, index: int, cfg: dict,
                attribution: dict | None = None) -> tuple[str, dict, np.ndarray, str]:
    """One (key, members) pair for the shard, plus its mask and kind for the statistics."""
    from degradations import composite

    rng = sample_rng(cfg["seed"], source, index)
    clean, crop_box = random_crop(clean_source, cfg["crop_size"], rng)
    # The shard stores 8-bit images: degrade the 8-bit clean crop so that untouched pixels of
    # the degraded image are byte-identical to the clean one.
    clean = imageio.to_uint8(clean).astype(np.float32) / 255.0
    clean = vary_clean(clean, rng, cfg.get("clean_variation") or {})
    if cfg.get("p_gray") and rng.random() < cfg["p_gray"]:
        # grey photos exist (scans, old prints, B&W shots): without them every model learns that
        # missing colour is a degradation (haze washes colour out) and "restores" it
        clean = np.round(imageio.to_grey_rgb(clean) * 255.0) / 255.0
    comp = cfg["composite"]
    degraded, mask, info = composite.apply(
        clean, rng, cfg["classes"], {k: tuple(v) for k, v in cfg["severity"].items()},
        regions=tuple(comp["regions"]), degradations_per_region=tuple(comp["degradations_per_region"]),
        shape_fraction=comp["shape_fraction"], p_single=comp["p_single"], p_clean=comp["p_clean"],
        options=cfg.get("options") or {})
    key = f"{source.short_hash}-{index:05d}"
    meta = {"key": key, "source": source.id, "crop": crop_box, "seed": cfg["seed"], "index": index,
            "classes": cfg["classes"], **info}
    if attribution:   # the source image's id, landmark, url, author, license, title (GLDv2)
        meta["attribution"] = attribution
    members = {
        "clean.png": imageio.encode_png(clean),
        "degraded.png": imageio.encode_png(degraded),
        "mask.png": imageio.encode_png(mask),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return key, members, mask, info["kind"]


def synthesize_item(job: tuple[Item, dict]) -> SourceResult:
    """Worker: decode one source image (reading it unless its unit already did) and make all of
    its samples."""
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes (or Dask workers)
    cv2.ipp.setUseIPP(False)   # per thread in OpenCV: the same bytes on every CPU (degradations/__init__.py)
    item, cfg = job
    source = item.source
    try:
        clean_source = load_source(source, max(cfg["min_size"], cfg["crop_size"]), cfg.get("endpoint_url"),
                                   cfg.get("max_image_pixels", imageio.MAX_IMAGE_PIXELS), data=item.data)
    except SourceSkip as skip:
        return SourceResult(source.id, [], skip_reason=str(skip))
    n_classes = len(cfg["classes"])
    class_pixels = np.zeros(n_classes, np.int64)
    kinds: Counter = Counter()
    samples = []
    for index in range(cfg["samples_per_image"]):
        key, members, mask, kind = make_sample(clean_source, source, index, cfg, item.attribution)
        bits = np.unpackbits(mask[:, :, None], axis=2, bitorder="little")[:, :, :n_classes]
        class_pixels += bits.reshape(-1, n_classes).sum(0, dtype=np.int64)
        kinds[kind] += 1
        samples.append((key, members))
    return SourceResult(source.id, samples, class_pixels=class_pixels, kinds=kinds)


def validate(cfg: dict) -> None:
    from degradations import names as known

    classes = cfg["classes"]
    where = "params.yaml synthesize"
    if not classes or len(classes) > MAX_CLASSES:
        raise AbairError(f"{where}.classes", f"need 1 to {MAX_CLASSES} classes (the mask has 8 bits), got {len(classes)}")
    unknown = [c for c in classes if c not in known()]
    if unknown:
        raise AbairError(f"{where}.classes", f"unknown degradation(s) {unknown}; known: {known()}")
    missing = [c for c in classes if c not in cfg["severity"]]
    if missing:
        raise AbairError(f"{where}.severity", f"no severity range for {missing}")
    from degradations.composite import check_options

    try:
        check_options(cfg.get("options"), classes)
    except ValueError as exc:
        raise AbairError(f"{where}.options", str(exc)) from None
    if cfg["crop_size"] < 16 or cfg["samples_per_image"] < 1:
        raise AbairError(where, "crop_size must be >= 16 and samples_per_image >= 1")
    if cfg.get("runner", "processes") not in RUNNERS:
        raise AbairError(f"{where}.runner", f"unknown runner {cfg['runner']!r} ({' or '.join(RUNNERS)})")
    if int(cfg.get("unit_files", DEFAULT_UNIT_FILES)) < 1:
        raise AbairError(f"{where}.unit_files", f"must be >= 1, got {cfg['unit_files']}")


# ------------------------------------------------------------------------------------------------
# Where units write: the workspace


@dataclass(frozen=True)
class Workspace:
    """Where a run's units publish: a local sibling of OUT (`.OUT.partial/`, renamed into place at
    the end), or OUT itself on S3 (index.json, written last, marks the set complete)."""
    out: str
    work: str
    endpoint_url: str | None = None

    @classmethod
    def for_out(cls, out: str, endpoint_url: str | None) -> "Workspace":
        if storage.is_s3(out):
            return cls(out, out.rstrip("/"), endpoint_url)
        final = Path(out)
        return cls(out, str(final.with_name(f".{final.name}.partial")), endpoint_url)

    @property
    def local(self) -> bool:
        return not storage.is_s3(self.work)

    def marker(self, unit: str) -> str:
        return storage.join(self.work, MARKERS, f"{unit}.json")

    @contextmanager
    def staging(self, unit: str) -> Iterator[Path]:
        """A fresh local folder for one unit's shards (inside the workspace when it is local, so
        publishing is a rename); removed afterwards, whatever happened."""
        if self.local:
            folder = Path(self.work) / f".unit-{unit}.tmp"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"abair-{unit}-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, shard: Path) -> None:
        if self.local:
            os.replace(shard, Path(self.work) / shard.name)
        else:
            storage.upload_file(shard, storage.join(self.work, shard.name), self.endpoint_url)

    def read_marker(self, unit: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.marker(unit), self.endpoint_url))
        except AbairError as exc:
            if exc.problem in ("file not found", "no such object"):
                return None
            raise
        except json.JSONDecodeError:
            return None   # a marker cut short: the unit runs again

    def write_marker(self, unit: str, record: dict) -> None:
        storage.write_bytes(self.marker(unit), json.dumps(record).encode(), self.endpoint_url)

    def prepare(self, keys: dict[str, str]) -> list[str]:
        """Ready the workspace for units named by `keys` (unit -> key): keep the units already
        done with the same key, drop everything else a killed or different run left. Returns the
        units kept."""
        if self.local:
            Path(self.work).mkdir(parents=True, exist_ok=True)
            for leftover in Path(self.work).glob(".unit-*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
        # the set is not complete now; an earlier set's attribution is not this one's
        for name in (INDEX_NAME, ATTRIBUTION_NAME):
            storage.delete(storage.join(self.work, name), self.endpoint_url)
        markers = storage.list_files(storage.join(self.work, MARKERS), (".json",), self.endpoint_url, recursive=False) \
            if not self.local or (Path(self.work) / MARKERS).is_dir() else []
        kept, claimed = [], set()
        for entry in markers:
            unit = entry.relpath[:-len(".json")]
            record = self.read_marker(unit)
            if record is not None and keys.get(unit) == record.get("key"):
                kept.append(unit)
                claimed.update(s for split in record["splits"].values() for s in split["shards"])
                continue
            for split in (record or {}).get("splits", {}).values():
                for shard in split["shards"]:
                    storage.delete(storage.join(self.work, shard), self.endpoint_url)
            storage.delete(entry.uri, self.endpoint_url)
        if self.local:   # shards a killed unit published before its marker
            for stray in Path(self.work).glob("*.tar"):
                if stray.name not in claimed:
                    stray.unlink()
        return kept

    def finish(self, index_bytes: bytes, attribution: str | None, units: Iterable[str]) -> None:
        """ATTRIBUTION.csv, then index.json (last: it marks the set complete), then the markers go."""
        if self.local:
            work = Path(self.work)
            if attribution is not None:
                (work / ATTRIBUTION_NAME).write_text(attribution)
            (work / INDEX_NAME).write_bytes(index_bytes)
            shutil.rmtree(work / MARKERS, ignore_errors=True)
            storage.replace_dir(work, self.out)
            return
        if attribution is not None:
            storage.write_bytes(storage.join(self.work, ATTRIBUTION_NAME), attribution.encode(), self.endpoint_url)
        storage.write_bytes(storage.join(self.work, INDEX_NAME), index_bytes, self.endpoint_url)
        for unit in units:
            storage.delete(self.marker(unit), self.endpoint_url)


# ------------------------------------------------------------------------------------------------
# One unit


@dataclass(frozen=True)
class UnitJob:
    """Everything a process (here, or a Dask worker elsewhere) needs to run one unit."""
    unit: Unit
    cfg: dict
    val_keys: frozenset      # the split keys held out for validation
    workspace: Workspace
    key: str                 # changes when anything the unit's output depends on does


class UnitSink:
    """One webdataset ShardWriter per split, writing into the unit's staging folder; a shard
    counts once closed and non-empty."""

    def __init__(self, staging: Path, tag: str, cfg: dict):
        import webdataset as wds

        self.shards: list[Path] = []
        stem = f"-{tag}" if tag else ""
        self.writers = {split: wds.ShardWriter(str(staging / f"{split}{stem}-%06d.tar"), maxcount=cfg["shard_maxcount"],
                                               post=self._keeper(split), verbose=0, mtime=0.0)
                        for split in ("train", "val")}

    def _keeper(self, split: str):
        def keep(shard: str) -> None:
            if self.writers[split].count == 0:
                os.unlink(shard)
            else:
                self.shards.append(Path(shard))
        return keep

    def write(self, split: str, samples) -> None:
        for key, members in samples:
            self.writers[split].write({"__key__": key, **members})

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


@dataclass
class UnitTally:
    """What one unit's samples add up to; becomes its record (and done marker)."""
    classes: int
    splits: dict = field(default_factory=lambda: {s: {"samples": 0, "sources": [], "shards": []} for s in ("train", "val")})
    kinds: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)
    licenses: Counter = field(default_factory=Counter)
    images: int = 0
    attribution: io.StringIO = field(default_factory=io.StringIO)

    def __post_init__(self):
        self.class_pixels = np.zeros(self.classes, np.int64)
        self.rows = csv.writer(self.attribution, lineterminator="\n")

    def add(self, item: Item, result: SourceResult, split: str) -> None:
        self.images += 1
        if result.skip_reason:
            self.skipped.append({"source": result.source_id, "reason": result.skip_reason})
            return
        self.splits[split]["samples"] += len(result.samples)
        self.splits[split]["sources"].append(result.source_id)
        self.class_pixels += result.class_pixels
        self.kinds.update(result.kinds)
        if item.attribution:
            a = item.attribution
            self.licenses[a.get("license", "unknown")] += len(result.samples)
            self.rows.writerow([a.get("id", ""), a.get("landmark_id", ""), a.get("license", ""), a.get("author", ""),
                                a.get("title", ""), a.get("url", ""), split, len(result.samples)])

    def record(self, name: str, key: str, problem: str | None = None, filtered: dict | None = None) -> dict:
        return {"unit": name, "key": key, "problem": problem, "images": self.images, "splits": self.splits,
                "class_pixels": self.class_pixels.tolist(), "kinds": dict(self.kinds), "skipped": self.skipped,
                "licenses": dict(self.licenses), "filtered": dict(filtered or {}),
                "attribution": self.attribution.getvalue()}


def ordered_map(func: Callable, jobs: Iterable, pool=None, window: int = 0) -> Iterator[tuple]:
    """(job, func(job)) in the jobs' order, on `pool` when given, with at most `window` jobs in
    flight: the jobs are read (a tar streamed) here, in the calling thread, only as fast as the
    pool keeps up."""
    if pool is None:
        for job in jobs:
            yield job, func(job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append((job, pool.apply_async(func, (job,))))
        if len(pending) >= window:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def run_unit(job: UnitJob, pool=None, bar=None, window: int = 8) -> dict:
    """Synthesize one unit and publish it (shards, then its done marker), or return its record
    at once when a previous attempt completed it. A unit that turns out unusable as a whole (a
    missing tar, an md5 mismatch) publishes nothing: its record says why."""
    unit, cfg, workspace = job.unit, job.cfg, job.workspace
    done = workspace.read_marker(unit.name)
    if done is not None and done.get("key") == job.key:
        log.info("synthesize: unit %s already done, kept", unit.name)
        return done
    started = time.perf_counter()
    reading = unit.read(cfg.get("endpoint_url"))
    tally = UnitTally(len(cfg["classes"]))
    with workspace.staging(unit.name) as staging:
        sink = UnitSink(staging, unit.tag, cfg)
        try:
            jobs = ((item, cfg) for item in reading)
            for (item, _), result in ordered_map(synthesize_item, jobs, pool, window):
                split = "val" if item.source.split_key in job.val_keys else "train"
                if result.skip_reason:
                    log.warning("skipped %s: %s", result.source_id, result.skip_reason)
                else:
                    sink.write(split, result.samples)
                tally.add(item, result, split)
                if bar is not None:
                    bar.update(1)
        finally:
            sink.close()
        if reading.problem:
            log.warning("synthesize: unit %s is unusable, its output discarded: %s", unit.name, reading.problem)
            return tally.record(unit.name, job.key, reading.problem, reading.filtered)
        for shard in sorted(sink.shards):
            workspace.publish(shard)
        for split in ("train", "val"):
            tally.splits[split]["shards"] = sorted(s.name for s in sink.shards if s.name.startswith(split + "-"))
        record = tally.record(unit.name, job.key, None, reading.filtered)
        workspace.write_marker(unit.name, record)   # after its shards: a marker means the unit is complete
    samples = sum(s["samples"] for s in tally.splits.values())
    log.info("synthesize: unit %s: %d images, %d samples, %d skipped in %.1f s", unit.name, tally.images, samples,
             len(tally.skipped), time.perf_counter() - started)
    return record


# runs every job and returns their records in the jobs' order
UnitRunner = Callable[[list[UnitJob]], list[dict]]


def run_units_in_processes(jobs: list[UnitJob], workers: int, progress: bool, total: int | None) -> list[dict]:
    """The units one after the other, each unit's images over `workers` forked processes."""
    from tqdm import tqdm

    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=total, desc="synthesize", unit="image", disable=not progress) as bar:
            return [run_unit(job, pool, bar, window=4 * workers) for job in jobs]
    finally:
        if pool:
            pool.terminate()


# ------------------------------------------------------------------------------------------------
# The shard set


def check_bad_share(source: str, skipped: list[dict], count: int, max_bad_fraction: float | None, samples: int,
                    skipped_units: list[dict] | None = None) -> None:
    """Bad sources are counted, never fatal one by one: the run fails only when nothing usable is
    left, or, with `max_bad_fraction` set, when a larger share of the images was bad. An unusable
    unit counts as the images it held (for a missing tar: as many as the units that were read held
    on average)."""
    reasons = dict(Counter(s["reason"].split(" (")[0] for s in skipped))
    units = dict(Counter(u["reason"].split(" (")[0] for u in skipped_units or ()))
    bad = len(skipped) + sum(u["images"] for u in skipped_units or ())
    also = f"; {len(skipped_units)} unusable unit(s): {units}" if skipped_units else ""
    if samples == 0:
        raise AbairError(source, f"no usable images ({len(skipped)} skipped: {reasons}{also})")
    if max_bad_fraction is not None and bad > float(max_bad_fraction) * count:
        raise AbairError(source, f"{bad} of {count} sources are bad, more than synthesize.max_bad_fraction "
                                 f"{float(max_bad_fraction):g} allows ({reasons}{also})")


def generator(cfg: dict) -> dict:
    """How the samples were degraded: what training stages need to draw more of the same
    (Phase I's `redraw`, the adapters' and the estimator's synthetic samples)."""
    return {"classes": list(cfg["classes"]), "severity": {k: list(v) for k, v in cfg["severity"].items()},
            "composite": dict(cfg["composite"]), "options": dict(cfg.get("options") or {})}


def output_params(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in NOT_IN_OUTPUT}


def is_share_alike(license: str) -> bool:
    """CC BY-SA (and the GFDL, also copyleft): derivatives must carry the same license."""
    words = license.upper().replace("-", " ").replace("_", " ").split()
    return "SA" in words or "SHARE ALIKE" in " ".join(words) or "SHAREALIKE" in words or "GFDL" in words


def estimate_unit_images(records: list[dict]) -> list[dict]:
    """The unusable units, each with the images it held: counted where it was read, else the
    average of the units that were."""
    read = [r["images"] for r in records if r["images"]]
    average = round(sum(read) / len(read)) if read else 0
    return [{"unit": r["unit"], "reason": r["problem"], "images": r["images"] or average,
             "images_estimated": not r["images"]} for r in records if r["problem"]]


def build_index(cfg: dict, source: str, records: list[dict], several_units: bool) -> dict:
    """index.json from the units' records, in unit order. Keys only some sources have (units,
    filtered, licenses, attribution) appear only where they say something."""
    good = [r for r in records if not r["problem"]]
    splits = {split: {"samples": sum(r["splits"][split]["samples"] for r in good),
                      "sources": [s for r in good for s in r["splits"][split]["sources"]]} for split in ("train", "val")}
    for split in ("train", "val"):
        splits[split]["shards"] = sorted(s for r in good for s in r["splits"][split]["shards"]) if splits[split]["samples"] else []
    total = splits["train"]["samples"] + splits["val"]["samples"]
    class_pixels = np.sum([r["class_pixels"] for r in good], axis=0) if good else np.zeros(len(cfg["classes"]))
    kinds = sum((Counter(r["kinds"]) for r in good), Counter())
    skipped = [s for r in good for s in r["skipped"]]
    pixels_total = max(1, total) * cfg["crop_size"] ** 2
    index = {
        "format": SHARD_FORMAT,
        "classes": list(cfg["classes"]),
        "crop_size": cfg["crop_size"],
        "generator": generator(cfg),
        "seed": cfg["seed"],
        "source": source,
        "params_hash": params_hash(output_params(cfg)),
        "splits": splits,
        "counts": {"samples": total, "sources_used": len(splits["train"]["sources"]) + len(splits["val"]["sources"]),
                   "sources_skipped": len(skipped), "kinds": dict(sorted(kinds.items()))},
        "pixel_fractions": {c: round(float(n) / pixels_total, 6) for c, n in zip(cfg["classes"], class_pixels)},
        "skipped": skipped,
    }
    skipped_units = estimate_unit_images(records)
    if several_units or skipped_units:
        index["units"] = len(records)
        index["skipped_units"] = skipped_units
    filtered = sum((Counter(r["filtered"]) for r in records), Counter())
    if filtered:
        index["filtered"] = dict(sorted(filtered.items()))
    licenses = sum((Counter(r["licenses"]) for r in good), Counter())
    if licenses:
        index["licenses"] = dict(sorted(licenses.items()))
        index["share_alike"] = sorted(name for name in licenses if is_share_alike(name))
        index["attribution"] = ATTRIBUTION_NAME
    return index


def attribution_csv(records: list[dict]) -> str | None:
    """ATTRIBUTION.csv: one row per source image used (its license, author, title, url, and how
    many samples came from it), in unit order; None when no image carries attribution."""
    rows = "".join(r["attribution"] for r in records if not r["problem"])
    if not rows:
        return None
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(ATTRIBUTION_COLUMNS)
    return header.getvalue() + rows


def log_licenses(index: dict, out: str) -> None:
    if not index.get("licenses"):
        return
    log.info("synthesize: samples per license: %s; attribution for every source image in %s",
             index["licenses"], storage.join(out, ATTRIBUTION_NAME))
    if index["share_alike"]:
        shared = sum(index["licenses"][name] for name in index["share_alike"])
        log.warning("synthesize: %d of %d samples come from share-alike images (%s): what is made from them must be "
                    "shared under the same license; the registered model's description says so",
                    shared, index["counts"]["samples"], ", ".join(index["share_alike"]))


def plan(cfg: dict, catalog: Catalog, workspace: Workspace) -> list[UnitJob]:
    """One job per unit, each with the key its done marker must carry to be kept."""
    val_keys = split_keys(catalog.split_keys(), cfg["val_fraction"], cfg["seed"])
    common = {"params": params_hash(output_params(cfg)), "catalog": catalog.fingerprint(),
              "val": params_hash(sorted(val_keys))}
    job_cfg = dict(cfg)
    return [UnitJob(unit, job_cfg, val_keys, workspace, params_hash({**common, "unit": unit.fingerprint()}))
            for unit in catalog.units(int(cfg.get("unit_files", DEFAULT_UNIT_FILES)))]


def synthesize(cfg: dict, source: str | None = None, out: str | None = None, progress: bool = True,
               run_units: UnitRunner | None = None) -> dict:
    """Run the stage. `cfg` is the `synthesize` params section; `run_units` runs the units
    elsewhere (flows/synthesize.py: on Dask), else they run here on `workers` processes.
    Returns the index written."""
    source = source or cfg["source"]
    out = out or cfg.get("out", paths.SHARDS)
    endpoint_url = cfg.get("endpoint_url")
    validate(cfg)
    started = time.perf_counter()

    catalog = open_catalog(source, endpoint_url)
    workspace = Workspace.for_out(out, endpoint_url)
    jobs = plan({**cfg, "endpoint_url": endpoint_url}, catalog, workspace)
    kept = workspace.prepare({job.unit.name: job.key for job in jobs})
    log.info("synthesize: %s, %d unit(s) (%d done before), %d samples per image -> %s", source, len(jobs), len(kept),
             cfg["samples_per_image"], out)

    if run_units is None:
        if cfg.get("runner", "processes") != "processes":
            log.warning("synthesize: runner %s was not handed in (abair synthesize and the flows do): running here",
                        cfg["runner"])
        workers = max(1, min(int(cfg.get("workers", 1)), catalog.count or int(cfg.get("workers", 1))))
        records = run_units_in_processes(jobs, workers, progress, catalog.count)
    else:
        records = run_units(jobs)

    index = build_index(cfg, source, records, several_units=any(job.unit.tag for job in jobs))
    count = catalog.count if catalog.count is not None else \
        sum(r["images"] for r in records if not r["problem"]) + sum(u["images"] for u in index.get("skipped_units", []))
    check_bad_share(source, index["skipped"], count, cfg.get("max_bad_fraction"), index["counts"]["samples"],
                    index.get("skipped_units"))
    for unit in index.get("skipped_units", []):
        log.warning("synthesize: unit %s left out: %s", unit["unit"], unit["reason"])
    workspace.finish(json.dumps(index, indent=2).encode(), attribution_csv(records),
                     [r["unit"] for r in records if not r["problem"]])

    elapsed = time.perf_counter() - started
    stats, total = index["splits"], index["counts"]["samples"]
    log.info("synthesize: wrote %d samples (%d train / %d val) in %d shards to %s in %.1f s (%.1f samples/s); "
             "%d sources skipped", total, stats["train"]["samples"], stats["val"]["samples"],
             len(stats["train"]["shards"]) + len(stats["val"]["shards"]), out, elapsed, total / elapsed,
             len(index["skipped"]))
    log_licenses(index, out)
    return index
