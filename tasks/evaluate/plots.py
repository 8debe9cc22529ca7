"""The report's plots: the radar of the modes (the paper's Figure 1), PSNR bars per group, the
estimator's confusion matrix and input / output / target strips per set (with, where mode pw ran,
its output and the weight map it used, and on regions sets the true map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.core.weight_maps import colour_of, render_weight_map, resize_map
from tasks.evaluate.run import SetResult
from tasks.evaluate.sets import GROUPS
from tasks.evaluate.tables import GROUP_TITLES, metrics_tree, mode_label, ordered_modes, ordered_sets


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int, rect: tuple = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _colours(modes: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    fixed = {"input": "#9e9e9e", "baseline": "#7b3294", "none": "#5d4037", "oh": "#1f77b4", "sw": "#d62728",
             "pw": "#ff7f0e", "oracle": "#2ca02c", "pw_oracle": "#17becf"}
    adapters = [m for m in modes if m not in fixed]
    cmap = plt.get_cmap("Set2")
    return {**fixed, **{m: cmap(i % 8) for i, m in enumerate(adapters)}}


def plot_radar(metrics: dict, set_order: Sequence[str], path: Path) -> Path:
    """The paper's Figure 1: one axis per set, PSNR rescaled per axis (the axis' worst plotted
    mode at the inner ring, its best at the rim), one polygon per mode."""
    plt = _pyplot()
    tree = metrics_tree(metrics)
    axes_sets = [(g, s) for g in GROUPS for s in ordered_sets(tree.get(g, {}), set_order)]
    candidates = ["input", "baseline", "none", "oh", "sw", "pw", "oracle"]
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
    return _save(fig, path, 110)


def plot_bars(metrics: dict, group: str, set_order: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    tree = metrics_tree(metrics).get(group, {})
    sets = ordered_sets(tree, set_order)
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
    return _save(fig, path, 110)


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
    return _save(fig, path, 110)


def _centre(array: np.ndarray, side: int) -> np.ndarray:
    """The centred side x side crop of an H x W (x C) array (smaller sides kept whole)."""
    h, w = array.shape[:2]
    ch, cw = min(side, h), min(side, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return array[y0:y0 + ch, x0:x0 + cw]


def map_picture(image: np.ndarray, weight_map: np.ndarray, names: Sequence[str], side: int) -> np.ndarray:
    """The strip's picture of a (K+1) x h x w weight map over the centre crop of its uint8 input:
    the map resized to the image, both cropped alike, drawn by tasks.core.weight_maps (its legend
    is the figure's, so the colours are named once however narrow the crop)."""
    height, width = image.shape[:2]
    full = resize_map(weight_map, height, width).transpose(1, 2, 0)
    crop = _centre(image, side).astype(np.float32) / 255.0
    return render_weight_map(crop, _centre(full, side).transpose(2, 0, 1), names, legend=False)


def _weights_text(summary: np.ndarray, names: Sequence[str], shown: int = 2) -> str:
    """The largest `shown` adapter weights of a per-image summary, e.g. "rain .52, haze .20"."""
    order = np.argsort(-summary[:len(names)])[:shown]
    return ", ".join(f"{names[k]} {summary[k]:.2f}".replace(" 0.", " .") for k in order if summary[k] > 0.005) or "backbone"


def strip_columns(res: SetResult) -> list[tuple[str, str]]:
    """(strips key, title) of each column: input, the strip mode's output, pw and its map, the true
    map, target (those that exist)."""
    columns = [("input", "input"), ("output", mode_label(res.strip_mode or ""))]
    if res.strips.get("pw"):
        columns.append(("pw", mode_label("pw")))
    if res.strips.get("pw_map"):
        columns.append(("pw_map", "PW weights"))
    if res.strips.get("true_map"):
        columns.append(("true_map", "true weights"))
    return columns + [("target", "target")]


def plot_strip(res: SetResult, side: int, path: Path) -> Path:
    """Centre crops, one row per image, one column per strip_columns entry, with the PSNRs (and
    for the pw map, its per-image mean weights)."""
    plt = _pyplot()
    rows = len(res.strips["output"])
    columns = strip_columns(res)
    legend = bool(res.strips.get("pw_map"))
    row_height = 2.9 if legend else 2.6        # the map's title takes two lines
    height = row_height * rows + (0.4 if legend else 0.0)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.5 * len(columns), height), squeeze=False)
    for i in range(rows):
        for j, (column, title) in enumerate(columns):
            if column in ("pw_map", "true_map"):
                picture = map_picture(res.strips["input"][i], res.strips[column][i], res.names, side)
            else:
                picture = _centre(res.strips[column][i], side)
            ax = axes[i][j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == "input":
                title = f"{title} {res.input_psnr[i]:.2f} dB"
            elif column in ("output", "pw"):
                key = res.strip_mode if column == "output" else "pw"
                title = f"{title} {res.per_image[key]['psnr'][i]:.2f} dB"
            elif column == "pw_map":
                title = f"{title}\n{_weights_text(res.strips['pw_weights'][i], res.names)}"
            ax.set_title(title, fontsize=8)
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(color=colour_of(k), label=name) for k, name in enumerate(res.names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{res.spec.group}/{res.spec.name}", fontsize=10)
    return _save(fig, path, 100, rect=(0, 0.4 / height if legend else 0, 1, 1))


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
