"""Degradation CutMix: different degradations, at different severities, in different regions of one
image, with a per-pixel bitmask of what was applied where (Phase I training data).

A sample is one of
    clean      (probability p_clean)            nothing applied, mask all zero;
    single     (p_single of the rest)           one degradation, uniform over `classes`, on the
                                                whole image;
    composite  (the rest)                       the image is partitioned into n regions, n uniform in
                                                `regions` (inclusive); the layout is smooth random
                                                blobs with probability `shape_fraction`, else
                                                rectangles (guillotine cuts). Each region gets m
                                                distinct degradations, m uniform in
                                                `degradations_per_region` (inclusive, capped at
                                                len(classes)), each with its own severity, stacked
                                                in physical order (module ORDER, then name).
Every severity is drawn uniformly from severity[name] = (lo, hi); options[name] (a dict, optional)
is passed to that degradation's apply, e.g. {"noise": {"model": ["gaussian", "camera"]}}.

A region's chain runs on the region's bounding box plus a margin of context (so blur sees real
neighbours instead of a reflected border) and only the region's own pixels are pasted back:
pixels outside every degraded region stay bit-identical to the input, and bit i of the mask
(i = classes.index(name)) is set on exactly the pixels of the regions where that degradation ran.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from . import get
from ._common import check_image, coarse_shape, upsample

MAX_CLASSES = 8  # the mask is uint8, one bit per class
CONTEXT_MARGIN = 16  # pixels of context around a region's box: covers the largest blur kernel radius
BLOB_MARGIN = 2.0  # how far a blob's forced lattice cell beats every other field there
MIN_CUT_FRACTION = 0.25  # rectangle cuts fall in the middle half of the side being cut


def apply(img: np.ndarray, rng: np.random.Generator, classes: list[str], severity: dict,
          regions: tuple[int, int] = (1, 4), degradations_per_region: tuple[int, int] = (0, 3),
          shape_fraction: float = 0.5, p_single: float = 0.3, p_clean: float = 0.05,
          options: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(degraded float32 HxWx3, mask uint8 HxW, info) for one training sample; see the module doc."""
    cv2.ipp.setUseIPP(False)   # per thread: the same bytes on every CPU (degradations/__init__.py)
    img = check_image(img)
    classes = check_classes(classes)
    ranges = check_severity_ranges(severity, classes)
    options = check_options(options, classes)
    regions = check_count_range(regions, "regions", minimum=1)
    degradations_per_region = check_count_range(degradations_per_region, "degradations_per_region", minimum=0)
    for name, p in (("shape_fraction", shape_fraction), ("p_single", p_single), ("p_clean", p_clean)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")

    height, width = img.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    if rng.random() < p_clean:
        return img.copy(), mask, {"kind": "clean", "regions": []}

    if rng.random() < p_single:
        name = classes[int(rng.integers(len(classes)))]
        degraded, record = draw(img, rng, name, ranges[name], options.get(name))
        mask[:] = class_bits(classes, [name])
        region = {"shape": "full", "bbox": [0, 0, height, width], "area": 1.0, "degradations": [record]}
        return degraded, mask, {"kind": "single", "regions": [region]}

    count = int(rng.integers(regions[0], regions[1] + 1))
    labels, shapes = region_layout(rng, height, width, count, shape_fraction)
    degraded = img.copy()
    region_info = []
    for label, shape in enumerate(shapes):
        stack = min(int(rng.integers(degradations_per_region[0], degradations_per_region[1] + 1)), len(classes))
        chosen = [classes[i] for i in rng.permutation(len(classes))[:stack]]
        steps = [(name, sample_severity(rng, ranges[name]), options.get(name, {})) for name in chosen]
        region = labels == label
        bbox = bounding_box(region)
        records = []
        if steps:
            records = degrade_region(img, degraded, region, bbox, rng, steps)
            mask[region] |= class_bits(classes, chosen)
        region_info.append({"shape": shape, "bbox": bbox, "area": float(region.mean()), "degradations": records})
    return degraded, mask, {"kind": "composite", "regions": region_info}


def apply_chain(img: np.ndarray, rng: np.random.Generator, steps) -> tuple[np.ndarray, list[dict]]:
    """Apply (name, severity) or (name, severity, options) steps to the whole image, in physical
    order (module ORDER, then name) whatever order they are given in. Returns (degraded, records)
    with one {"name", "severity", "params"} record per step, in the order applied."""
    cv2.ipp.setUseIPP(False)   # per thread, as in apply
    img = check_image(img)
    resolved = []
    for step in steps:
        name, level, *rest = step
        options = dict(rest[0]) if rest else {}
        resolved.append((get(name), name, float(level), options))
    resolved.sort(key=lambda item: (item[0].ORDER, item[1]))

    out, records = img, []
    for module, name, level, options in resolved:
        out, params = module.apply(out, rng, level, **options)  # pure: returns a new array
        records.append({"name": name, "severity": level, "params": params})
    return (out if records else img.copy()), records


def draw(img: np.ndarray, rng: np.random.Generator, name: str, bounds: tuple[float, float] = (0.0, 1.0),
         options: dict | None = None) -> tuple[np.ndarray, dict]:
    """One degradation at a severity drawn uniformly from `bounds` (drawn first, then applied,
    both from `rng`), with `options` for its apply: (degraded, its {"name", "severity", "params"}
    record). What every stage that needs "one degradation at a random severity" calls."""
    degraded, records = apply_chain(img, rng, [(name, sample_severity(rng, bounds), options or {})])
    return degraded, records[0]


def degrade_region(img: np.ndarray, out: np.ndarray, region: np.ndarray, bbox: list[int],
                   rng: np.random.Generator, steps: list) -> list[dict]:
    """Run the chain on the region's box plus context margin of `img`; paste the region into `out`."""
    height, width = region.shape
    y0, x0, y1, x1 = bbox
    cy0, cx0 = max(0, y0 - CONTEXT_MARGIN), max(0, x0 - CONTEXT_MARGIN)
    cy1, cx1 = min(height, y1 + CONTEXT_MARGIN), min(width, x1 + CONTEXT_MARGIN)
    degraded, records = apply_chain(img[cy0:cy1, cx0:cx1], rng, steps)
    inner = (slice(y0 - cy0, y1 - cy0), slice(x0 - cx0, x1 - cx0))
    target = out[y0:y1, x0:x1]
    # cv2.copyTo writes through the view (6x faster than np.copyto(where=)); the check guards
    # against a binding that would hand back a fresh array instead.
    pasted = cv2.copyTo(np.ascontiguousarray(degraded[inner]), region[y0:y1, x0:x1].view(np.uint8), target)
    if pasted is not target:
        target[...] = pasted
    return records


# ---------------------------------------------------------------- layouts


def region_layout(rng: np.random.Generator, height: int, width: int, count: int, shape_fraction: float
                  ) -> tuple[np.ndarray, list[str]]:
    """A partition of the image into `count` non-empty regions: (labels HxW uint8 in [0, count),
    shape per label, "blob" or "rect"). `count` is capped at the number of pixels."""
    count = max(1, min(count, height * width))
    if count == 1:
        return np.zeros((height, width), np.uint8), ["rect"]
    if rng.random() < shape_fraction:
        labels = blob_layout(rng, height, width, count)
        if labels is not None:
            return labels, ["blob"] * count
    return rect_layout(rng, height, width, count), ["rect"] * count


def blob_layout(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray | None:
    """Smooth random shapes: each pixel goes to the largest of `count` smooth random fields.

    Fields are drawn on a small lattice and upsampled. Each region gets one lattice node where its
    field is forced above every other, so it cannot vanish; None in the rare case one still does
    (images of a few pixels), and the caller falls back to rectangles.
    """
    side = max(4, math.ceil(math.sqrt(count)) + 1)
    fields = rng.standard_normal((side, side, count)).astype(np.float32)
    cells = rng.permutation(side * side)[:count]
    forced = fields.max() + BLOB_MARGIN
    for label, cell in enumerate(cells):
        fields[cell // side, cell % side, label] = forced
    upsampled = upsample_fields(fields, height, width)
    labels = np.argmax(upsampled, axis=2).astype(np.uint8)
    if np.count_nonzero(np.bincount(labels.ravel(), minlength=count)) < count:
        return None
    return labels


def upsample_fields(fields: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lattice (s, s, n) -> (H, W, n): bicubic to the coarse size (smooth), then bilinear (cheap)."""
    coarse_h, coarse_w = coarse_shape(height, width)
    planes = [upsample(cv2.resize(np.ascontiguousarray(fields[:, :, i]), (coarse_w, coarse_h),
                                  interpolation=cv2.INTER_CUBIC), height, width)
              for i in range(fields.shape[2])]
    return np.stack(planes, axis=2)


def rect_layout(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """Guillotine cuts: repeatedly cut a rectangle (chosen with probability by area) in two across
    its longer side (a random side if square), at 25-75% of its length."""
    rects = [(0, 0, height, width)]
    while len(rects) < count:
        areas = np.array([(y1 - y0) * (x1 - x0) if (y1 - y0) * (x1 - x0) > 1 else 0 for y0, x0, y1, x1 in rects],
                         dtype=np.float64)
        index = int(rng.choice(len(rects), p=areas / areas.sum()))
        y0, x0, y1, x1 = rects.pop(index)
        rect_h, rect_w = y1 - y0, x1 - x0
        cut_rows = rect_h > rect_w or (rect_h == rect_w and rng.random() < 0.5)
        if rect_h == 1 or rect_w == 1:
            cut_rows = rect_h > 1
        side = rect_h if cut_rows else rect_w
        fraction = rng.uniform(MIN_CUT_FRACTION, 1.0 - MIN_CUT_FRACTION)
        cut = min(max(int(round(side * fraction)), 1), side - 1)
        if cut_rows:
            rects += [(y0, x0, y0 + cut, x1), (y0 + cut, x0, y1, x1)]
        else:
            rects += [(y0, x0, y1, x0 + cut), (y0, x0 + cut, y1, x1)]
    labels = np.empty((height, width), np.uint8)
    for label, (y0, x0, y1, x1) in enumerate(rects):
        labels[y0:y1, x0:x1] = label
    return labels


# ---------------------------------------------------------------- helpers


def bounding_box(region: np.ndarray) -> list[int]:
    """[y0, x0, y1, x1) of the True pixels."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1]


def class_bits(classes: list[str], names: list[str]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << classes.index(name)
    return bits


def sample_severity(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def check_classes(classes) -> list[str]:
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty: give at least one degradation name")
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES} classes fit the uint8 mask, got {len(classes)}: {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {classes}")
    for name in classes:
        get(name)  # ValueError naming an unknown class
    return classes


def check_severity_ranges(severity: dict, classes: list[str]) -> dict[str, tuple[float, float]]:
    missing = [name for name in classes if name not in severity]
    if missing:
        raise ValueError(f"no severity range for {missing}; give severity[name] = (lo, hi) for every class")
    ranges = {}
    for name in classes:
        try:
            lo, hi = (float(v) for v in severity[name])
        except (TypeError, ValueError):
            raise ValueError(f"severity[{name!r}] must be a (lo, hi) pair, got {severity[name]!r}") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"severity[{name!r}] = ({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1")
        ranges[name] = (lo, hi)
    return ranges


def check_options(options, classes: list[str]) -> dict[str, dict]:
    """{name: options dict} for the named classes (names not in `classes` are an error)."""
    options = dict(options or {})
    unknown = [name for name in options if name not in classes]
    if unknown:
        raise ValueError(f"options for {unknown}, which are not among the classes {classes}")
    for name, value in options.items():
        if not isinstance(value, dict):
            raise ValueError(f"options[{name!r}] must be a mapping of keyword arguments, got {value!r}")
    return options


def check_count_range(bounds, what: str, minimum: int) -> tuple[int, int]:
    lo, hi = (int(v) for v in bounds)
    if not minimum <= lo <= hi:
        raise ValueError(f"{what} = {tuple(bounds)} must satisfy {minimum} <= lo <= hi")
    return lo, hi
