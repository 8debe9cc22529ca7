"""What training leaves for people and DVC: per-step logs (a TSV for DVC plots, MLflow metrics),
loss curves and sample grids."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

import numpy as np

from tasks.core.storage import atomic_path


class StepLog:
    """Per-step metrics as a TSV (DVC plots) and, when a run is given, MLflow metrics."""

    def __init__(self, path: str | Path, columns: list[str], run=None, resume_step: int | None = None):
        self.path, self.columns, self.run = Path(path), ["step", *columns], run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f, delimiter="\t") if int(r["step"]) < resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, delimiter="\t", extrasaction="ignore").writerow(
                {"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}})
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def read(self) -> dict[str, list[float]]:
        with self.path.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return {c: [float(r[c]) if r.get(c) not in (None, "") else float("nan") for r in rows] for c in self.columns}


def plot_curves(table: Mapping[str, list[float]], columns: list[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ax.plot(table["step"], table[column], lw=1.2)
        ax.set_title(column)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if column.startswith(("loss", "l1", "seg", "ce")) and min(v for v in table[column] if v == v) > 0:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def sample_grid(rows: list[list[np.ndarray]], path: str | Path, labels: list[str]) -> Path:
    """Rows of float HxWx3 images (same size) side by side, a label above each column."""
    import cv2

    from tasks.core import imageio

    tiles = [np.concatenate([imageio.to_uint8(img) for img in row], 1) for row in rows]
    grid = np.concatenate(tiles, 0)
    width = rows[0][0].shape[1]
    header = np.zeros((18, grid.shape[1], 3), np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * width + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    imageio.write_image(path, np.concatenate([header, grid], 0))
    return Path(path)
