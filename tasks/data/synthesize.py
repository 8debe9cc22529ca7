"""The `synthesize` stage: clean sources -> webdataset shards of (clean, degraded, mask, json).

Each sample is a random crop degraded by the composite ("degradation CutMix") generator. A
sample depends only on (seed, source id, index), so runs are reproducible whatever the worker
count, and shards are byte-identical across runs (fixed tar mtimes, ordered writes).
Layout of a shard set:

    OUT/train-000000.tar ...   OUT/val-000000.tar ...   OUT/index.json (written last)
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.core import imageio, paths, storage

from tasks.core.errors import AbairError
from tasks.core.params import params_hash
from tasks.data.sources import Source, SourceSkip, list_sources, load_source, split_sources

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_FORMAT = "abair-shards/1"
MAX_CLASSES = 8  # the mask is one uint8 bit per class
# Settings that change how the work runs, not what it writes.
# Not hashed into index.json: how the run executes, where it reads and writes, and the size
# limit (whose effect, a skipped source, index.json lists by name).
NOT_IN_OUTPUT = ("workers", "endpoint_url", "out", "source", "max_image_pixels", "max_bad_fraction")


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
    out = np.clip((clean ** 2.2) * gain, 0.0, 1.0) ** (1 / 2.2)
    lo, hi = variation.get("soften", (0.0, 0.0))
    sigma = rng.uniform(lo, hi)
    if sigma > 0.05:
        out = cv2.GaussianBlur(out, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return np.round(out.astype(np.float32) * 255.0) / 255.0


def make_sample(clean_source: np.ndarray, source: Source, index: int, cfg: dict) -> tuple[str, dict, np.ndarray, str]:
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
    members = {
        "clean.png": imageio.encode_png(clean),
        "degraded.png": imageio.encode_png(degraded),
        "mask.png": imageio.encode_png(mask),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return key, members, mask, info["kind"]


def synthesize_source(job: tuple[Source, dict]) -> SourceResult:
    """Worker: load one source image and make all of its samples."""
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the process pool
    source, cfg = job
    try:
        clean_source = load_source(source, max(cfg["min_size"], cfg["crop_size"]), cfg.get("endpoint_url"),
                                   cfg.get("max_image_pixels", imageio.MAX_IMAGE_PIXELS))
    except SourceSkip as skip:
        return SourceResult(source.id, [], skip_reason=str(skip))
    n_classes = len(cfg["classes"])
    class_pixels = np.zeros(n_classes, np.int64)
    kinds: Counter = Counter()
    samples = []
    for index in range(cfg["samples_per_image"]):
        key, members, mask, kind = make_sample(clean_source, source, index, cfg)
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


@dataclass
class Tally:
    """What the samples written so far add up to: per split, per class, per kind, and the skips."""
    classes: int
    stats: dict = field(default_factory=lambda: {split: {"samples": 0, "sources": []} for split in ("train", "val")})
    kinds: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)

    def __post_init__(self):
        self.class_pixels = np.zeros(self.classes, np.int64)

    def add(self, result: SourceResult, split: str) -> None:
        self.stats[split]["samples"] += len(result.samples)
        self.stats[split]["sources"].append(result.source_id)
        self.class_pixels += result.class_pixels
        self.kinds.update(result.kinds)

    @property
    def total(self) -> int:
        return self.stats["train"]["samples"] + self.stats["val"]["samples"]


class ShardSink:
    """One webdataset ShardWriter per split, writing into `staging`; a shard leaves staging (for
    the output folder, or uploaded to S3) only once closed, complete and non-empty, and only while
    the run has not failed."""

    def __init__(self, staging: Path, out: str, cfg: dict, endpoint_url: str | None):
        import webdataset as wds

        self.out, self.endpoint_url, self.failed, self.uploaded = out, endpoint_url, False, []
        self.writers = {split: wds.ShardWriter(str(staging / f"{split}-%06d.tar"), maxcount=cfg["shard_maxcount"],
                                               post=self._publisher(split), verbose=0, mtime=0.0)
                        for split in ("train", "val")}

    def _publisher(self, split: str):
        def publish(local_shard: str) -> None:
            if self.failed or self.writers[split].count == 0:
                os.unlink(local_shard)
                return
            if storage.is_s3(self.out):
                storage.upload_file(local_shard, storage.join(self.out, Path(local_shard).name), self.endpoint_url)
                os.unlink(local_shard)
            self.uploaded.append(Path(local_shard).name)
        return publish

    def write(self, split: str, samples) -> None:
        for key, members in samples:
            self.writers[split].write({"__key__": key, **members})

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def run_sources(jobs: list, workers: int, progress: bool, sink: ShardSink, split_of: dict, tally: Tally) -> None:
    """Synthesize every source (in `workers` forked processes) and write its samples in order."""
    from tqdm import tqdm

    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(synthesize_source, jobs) if pool else map(synthesize_source, jobs)
        bar = tqdm(results, total=len(jobs), desc="synthesize", unit="image", disable=not progress)
        for result in bar:
            if result.skip_reason:
                tally.skipped.append({"source": result.source_id, "reason": result.skip_reason})
                log.warning("skipped %s: %s", result.source_id, result.skip_reason)
                continue
            split = split_of[result.source_id]
            sink.write(split, result.samples)
            tally.add(result, split)
            bar.set_postfix(samples=tally.total, skipped=len(tally.skipped))
    except BaseException:
        sink.failed = True
        raise
    finally:
        if pool:
            pool.terminate()
        sink.close()


def check_bad_share(source: str, skipped: list[dict], count: int, max_bad_fraction: float | None, samples: int) -> None:
    """Bad sources are counted, never fatal one by one: the run fails only when nothing usable is
    left, or, with `max_bad_fraction` set, when a larger share of the sources was bad."""
    reasons = dict(Counter(s["reason"].split(" (")[0] for s in skipped))
    if samples == 0:
        raise AbairError(source, f"no usable images ({len(skipped)} skipped: {reasons})")
    if max_bad_fraction is not None and len(skipped) > float(max_bad_fraction) * count:
        raise AbairError(source, f"{len(skipped)} of {count} sources are bad, more than synthesize.max_bad_fraction "
                                 f"{float(max_bad_fraction):g} allows ({reasons})")


def generator(cfg: dict) -> dict:
    """How the samples were degraded: what training stages need to draw more of the same
    (Phase I's `redraw`, the adapters' and the estimator's synthetic samples)."""
    return {"classes": list(cfg["classes"]), "severity": {k: list(v) for k, v in cfg["severity"].items()},
            "composite": dict(cfg["composite"]), "options": dict(cfg.get("options") or {})}


def build_index(cfg: dict, source: str, tally: Tally, uploaded: list[str]) -> dict:
    stats = tally.stats
    for split in ("train", "val"):
        stats[split]["shards"] = sorted(n for n in uploaded if n.startswith(split)) if stats[split]["samples"] else []
    pixels_total = tally.total * cfg["crop_size"] ** 2
    return {
        "format": SHARD_FORMAT,
        "classes": list(cfg["classes"]),
        "crop_size": cfg["crop_size"],
        "generator": generator(cfg),
        "seed": cfg["seed"],
        "source": source,
        "params_hash": params_hash({k: v for k, v in cfg.items() if k not in NOT_IN_OUTPUT}),
        "splits": stats,
        "counts": {"samples": tally.total, "sources_used": len(stats["train"]["sources"]) + len(stats["val"]["sources"]),
                   "sources_skipped": len(tally.skipped), "kinds": dict(sorted(tally.kinds.items()))},
        "pixel_fractions": {c: round(float(n) / pixels_total, 6) for c, n in zip(cfg["classes"], tally.class_pixels)},
        "skipped": tally.skipped,
    }


def synthesize(cfg: dict, source: str | None = None, out: str | None = None,
               progress: bool = True) -> dict:
    """Run the stage. `cfg` is the `synthesize` params section; returns the index written."""
    source = source or cfg["source"]
    out = out or cfg.get("out", paths.SHARDS)
    endpoint_url = cfg.get("endpoint_url")
    validate(cfg)
    started = time.perf_counter()

    sources = list_sources(source, endpoint_url)
    train, val = split_sources(sources, cfg["val_fraction"], cfg["seed"])
    log.info("synthesize: %d source images from %s (%d train, %d val), %d samples each -> %s",
             len(sources), source, len(train), len(val), cfg["samples_per_image"], out)

    local_out_ctx = storage.atomic_dir(out) if not storage.is_s3(out) else tempfile.TemporaryDirectory(prefix="abair-shards-")
    with local_out_ctx as staging:
        staging = Path(staging)
        sink = ShardSink(staging, out, cfg, endpoint_url)
        split_of = {s.id: "train" for s in train} | {s.id: "val" for s in val}
        tally = Tally(len(cfg["classes"]))
        jobs = [(s, {**cfg, "endpoint_url": endpoint_url}) for s in sources]
        run_sources(jobs, max(1, min(int(cfg.get("workers", 1)), len(jobs))), progress, sink, split_of, tally)
        check_bad_share(source, tally.skipped, len(sources), cfg.get("max_bad_fraction"), tally.total)
        index = build_index(cfg, source, tally, sink.uploaded)
        index_bytes = json.dumps(index, indent=2).encode()
        if storage.is_s3(out):
            storage.write_bytes(storage.join(out, INDEX_NAME), index_bytes, endpoint_url)  # last: marks the set complete
        else:
            (staging / INDEX_NAME).write_bytes(index_bytes)

    elapsed = time.perf_counter() - started
    stats = index["splits"]
    log.info("synthesize: wrote %d samples (%d train / %d val) in %d shards to %s in %.1f s (%.1f samples/s); "
             "%d sources skipped", tally.total, stats["train"]["samples"], stats["val"]["samples"],
             len(stats["train"]["shards"]) + len(stats["val"]["shards"]), out, elapsed, tally.total / elapsed,
             len(tally.skipped))
    return index
