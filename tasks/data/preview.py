"""`abair preview`: a contact sheet of every degradation at three severities, and composite
samples next to their masks in colour (one colour per class, mixed where classes overlap).

With real pairs (`--real noise=FOLDER ...`): one row per pair set, a native-resolution crop of a
real degraded image and of its target, then the synthetic model applied to that same target at
three severities (with the synthesis options, e.g. both noise models): what the model must
resemble, side by side with what it makes."""

from __future__ import annotations

import cv2
import numpy as np

from tasks.core import imageio
from tasks.data.sources import Source, load_source

SEVERITIES = (0.33, 0.66, 1.0)
# Distinct colours (RGB) for up to 8 mask bits.
CLASS_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                          (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)], np.float32) / 255.0


def mask_to_colour(mask: np.ndarray, n_classes: int) -> np.ndarray:
    bits = np.unpackbits(mask[:, :, None], axis=2, bitorder="little")[:, :, :n_classes].astype(np.float32)
    count = bits.sum(2, keepdims=True)
    colour = bits @ CLASS_COLOURS[:n_classes] / np.maximum(count, 1.0)
    return np.where(count > 0, colour, 0.08).astype(np.float32)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = imageio.to_uint8(tile).copy()
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 18), (0, 0, 0), -1)
    cv2.putText(tile, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def contact_sheet(classes: list[str], severity: dict, composite_cfg: dict, tile: int = 160,
                  seed: int = 0, composite_samples: int = 4) -> np.ndarray:
    import degradations
    from degradations import composite

    photo = load_source(Source("samples/astronaut", "samples:astronaut", ""), tile)
    clean = cv2.resize(photo, (2 * tile, 2 * tile), interpolation=cv2.INTER_AREA)[tile // 2:tile // 2 + tile, tile // 2:tile // 2 + tile]
    clean = np.ascontiguousarray(clean)
    rows = []
    for name in degradations.names():
        row = [_label(clean, name)]
        for severity_value in SEVERITIES:
            degraded, _ = degradations.get(name).apply(clean, np.random.default_rng(seed), severity_value)
            row.append(_label(degraded, f"{name} s={severity_value:.2f}"))
        rows.append(np.concatenate(row, 1))
    rng = np.random.default_rng(seed)
    comp_row = []
    while len(comp_row) < 2 * composite_samples:
        degraded, mask, info = composite.apply(clean, rng, classes, severity, **composite_cfg)
        if info["kind"] != "composite":
            continue
        applied = sorted({d["name"] for r in info["regions"] for d in r["degradations"]})
        comp_row += [_label(degraded, "composite"), _label(mask_to_colour(mask, len(classes)), "+".join(applied))]
    per_row = 4
    comp_rows = [np.concatenate(comp_row[i:i + per_row], 1) for i in range(0, len(comp_row), per_row)]
    legend = np.zeros((22, 4 * tile, 3), np.uint8)
    x = 4
    for i, name in enumerate(classes):
        colour = tuple(int(c) for c in (CLASS_COLOURS[i] * 255))
        cv2.rectangle(legend, (x, 5), (x + 12, 17), colour, -1)
        cv2.putText(legend, name, (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
        x += 20 + 9 * len(name)
    return np.concatenate(rows + comp_rows + [legend], 0)


def real_rows(pairs: dict[str, str], options: dict, tile: int = 160, seed: int = 0) -> list[np.ndarray]:
    """Per {degradation: paired folder}: [real input | its target | synthetic on that target x3]."""
    import degradations
    from tasks.data.reader import PairedFolder

    rows = []
    for name, folder in pairs.items():
        module = degradations.get(name)
        paired = PairedFolder(folder, check=False)
        degraded, clean = paired.load(paired.names[0])
        h, w = clean.shape[:2]
        y0, x0 = max(h - tile, 0) // 2, max(w - tile, 0) // 2
        crop = lambda image: np.ascontiguousarray(  # noqa: E731 - native resolution: noise stays visible
            cv2.resize(image[y0:y0 + tile, x0:x0 + tile], (tile, tile), interpolation=cv2.INTER_NEAREST)
            .astype(np.float32) / 255.0)
        real, target = crop(degraded), crop(clean)
        row = [_label(real, f"real {name}"), _label(target, "its target")]
        for severity_value in SEVERITIES:
            synthetic, _ = module.apply(target, np.random.default_rng(seed), severity_value, **options.get(name, {}))
            row.append(_label(synthetic, f"synthetic s={severity_value:.2f}"))
        rows.append(np.concatenate(row, 1))
    return rows


def write_preview(out: str, cfg: dict, seed: int = 0, real: dict[str, str] | None = None) -> np.ndarray:
    comp = cfg["composite"]
    composite_cfg = dict(regions=tuple(comp["regions"]), degradations_per_region=tuple(comp["degradations_per_region"]),
                         shape_fraction=comp["shape_fraction"], p_single=0.0, p_clean=0.0)
    sheet = contact_sheet(cfg["classes"], {k: tuple(v) for k, v in cfg["severity"].items()}, composite_cfg, seed=seed)
    if real:
        rows = real_rows(real, cfg.get("options") or {}, seed=seed)
        width = max(sheet.shape[1], *(r.shape[1] for r in rows))
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))  # noqa: E731
        sheet = np.concatenate([pad(sheet), *(pad(r) for r in rows)], 0)
    imageio.write_image(out, sheet)
    return sheet
