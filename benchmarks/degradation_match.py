"""Do the synthetic degradations look like the real ones? Statistics of real pairs beside the same
statistics of the synthetic model applied to the real pairs' own clean targets.

    python benchmarks/degradation_match.py            # writes benchmarks/results/degradation_match.md

Pairs (../shared/data): LOL v1 (low light), PolyU (camera noise), Rain100L (rain). For each real
pair the residual r = input - target is measured; for the synthetic side the degradation runs on
the same target at severities spread over the drawn range (seeded), and the same statistics are
taken. Statistics:

    brightness ratio   mean(input) / mean(target)                  (low light: how dark)
    psnr               PSNR of the input against the target        (how strong overall)
    noise std          std of the residual's high-pass part (input minus its 3x3 box mean) x 255
    neighbour corr     correlation of the residual's high-pass part between horizontal neighbours
                       (white noise ~ -0.1 after the box filter; demosaiced / JPEG'd noise higher)
    signal slope       slope of local residual variance against local target level (noise that
                       grows with the signal: shot noise)
    streak angle       for rain: the dominant orientation of the residual's gradient structure
                       tensor, degrees from vertical
    streak cover       for rain: share of pixels brightened by more than 10/255
    across corr        correlation of the residual itself (grey) between horizontal neighbours: how wide
                       a near-vertical streak is (a one-pixel line ~0.25 after the warp, Rain100L ~0.65)
    along corr         the same between pixels 8 rows apart: how long the streaks are

Skips (exit 0) when the data is missing. No threshold or training choice is made from it: it
checks the models against physics-level statistics, and the table is committed for people to read.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("ABAIR_SHARED_DATA", ROOT.parent / "shared" / "data"))
PAIRS = {"lowlight": "train/LOLv1_subset50", "noise": "train/PolyU_part60", "rain": "bench/Rain100L"}
COUNT = 16


def _read(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def high_pass(x: np.ndarray) -> np.ndarray:
    return x - cv2.blur(x, (3, 3))


def stats(degraded: np.ndarray, clean: np.ndarray) -> dict:
    residual = degraded - clean
    hp = high_pass(residual)
    a, b = hp[:, :-1].ravel(), hp[:, 1:].ravel()
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0
    level = cv2.blur(clean.mean(2), (8, 8))[::8, ::8].ravel()
    var = cv2.blur(hp.mean(2) ** 2, (8, 8))[::8, ::8].ravel()
    slope = float(np.polyfit(level, var, 1)[0]) if level.std() > 1e-3 else 0.0
    gray = residual.mean(2)
    gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
    # streaks: the gradient is across them, so the streak direction is the tensor's minor axis
    angle = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
    centred = gray - gray.mean()
    power = max(float((centred * centred).mean()), 1e-12)
    across = float((centred[:, :-1] * centred[:, 1:]).mean()) / power
    along = float((centred[:-8] * centred[8:]).mean()) / power
    mse = float(((degraded - clean) ** 2).mean())
    return {"brightness ratio": float(degraded.mean() / max(clean.mean(), 1e-6)),
            "psnr": 10 * np.log10(1 / max(mse, 1e-12)), "noise std": float(hp.std() * 255), "neighbour corr": corr,
            "signal slope": slope * 1e4, "streak angle": float(abs(angle)), "streak cover": float((gray > 10 / 255).mean()),
            "across corr": across, "along corr": along}


def compare(name: str, folder: Path, options: dict, severity_range: tuple[float, float]) -> dict:
    """Statistics of the real pairs, of the synthetic model over the drawn severity range (spread
    evenly, one severity per pair) and at the range's lowest severity."""
    import degradations

    lo, hi = severity_range
    names = sorted(p.name for p in (folder / "input").iterdir())[:COUNT]
    real, synthetic, lowest = [], [], []
    for i, file in enumerate(names):
        degraded, clean = _read(folder / "input" / file), _read(folder / "target" / file)
        real.append(stats(degraded, clean))
        spread = lo + (hi - lo) * (i + 0.5) / len(names)
        for severity, into in ((spread, synthetic), (lo, lowest)):
            fake, _ = degradations.get(name).apply(clean, np.random.default_rng([0, i]), severity, **options)
            into.append(stats(fake, clean))
    keys = real[0].keys()
    summary = lambda rows: {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))) for k in keys}  # noqa: E731
    return {"real": summary(real), "synthetic": summary(synthetic), "lowest": summary(lowest)}


def main() -> int:
    if not DATA.is_dir():
        print(f"skipped: {DATA} is missing")
        return 0
    import yaml

    synthesize = yaml.safe_load((ROOT / "params.yaml").read_text())["synthesize"]
    options, ranges = synthesize.get("options") or {}, synthesize["severity"]
    lines = ["# Synthetic degradations against real pairs", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs. "
             f"Command: `python benchmarks/degradation_match.py`. First {COUNT} pairs of each set by name; "
             "the synthetic side degrades the same targets at severities spread over the range synthesis draws "
             "(params.yaml's `synthesize.severity` and `synthesize.options`), and at that range's lowest severity. "
             "Mean ± std over the images; see the script's docstring.", ""]
    for name, rel in PAIRS.items():
        lo, hi = ranges[name]
        result = compare(name, DATA / rel, options.get(name, {}), (lo, hi))
        lines += [f"## {name}: `{rel}`", "", f"| statistic | real | synthetic, severity {lo}-{hi} | synthetic, severity {lo} |",
                  "|---|---|---|---|"]
        for key in result["real"]:
            cells = " | ".join(f"{result[c][key][0]:.3f} ± {result[c][key][1]:.3f}" for c in ("real", "synthetic", "lowest"))
            lines.append(f"| {key} | {cells} |")
        lines.append("")
        print(name, {k: (round(result['real'][k][0], 3), round(result['synthetic'][k][0], 3)) for k in result["real"]})
    out = ROOT / "benchmarks" / "results" / "degradation_match.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
