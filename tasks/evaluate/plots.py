"""The report's plots: the radar of the modes (the paper's Figure 1), PSNR bars per group, the
estimator's confusion matrix and input / output / target strips per set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.evaluate.run import SetResult
from tasks.evaluate.sets import GROUPS
from tasks.evaluate.tables import GROUP_TITLES, metrics_tree, mode_label, ordered_modes, ordered_sets


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _colours(modes: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    fixed = {"input": "#9e9e9e", "baseline": "#7b3294", "none": "#5d4037", "oh": "#1f77b4", "sw": "#d62728", "oracle": "#2ca02c"}
    adapters = [m for m in modes if m not in fixed]
    cmap = plt.get_cmap("Set2")
    return {**fixed, **{m: cmap(i % 8) for i, m in enumerate(adapters)}}


def plot_radar(metrics: dict, set_order: Sequence[str], path: Path) -> Path:
    """The paper's Figure 1: one axis per set, PSNR rescaled per axis (the axis' worst plotted
    mode at the inner ring, its best at the rim), one polygon per mode."""
    plt = _pyplot()
    tree = metrics_tree(metrics)
    axes_sets = [(g, s) for g in GROUPS for s in ordered_sets(tree.get(g, {}), set_order)]
    candidates = ["input", "baseline", "none", "oh", "sw", "oracle"]
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
    return _save(fig, path, 100)


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
