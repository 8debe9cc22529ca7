"""Real photos, restored whole as a user would: `abair restore` on folders, scored against targets.

    python benchmarks/real_photos.py --model models:/abair-restorer@champion --tag default
    python benchmarks/real_photos.py --model checkpoints --tag default --limit 4   # a quick look

For each set below, the inputs are written as PNG into a scratch folder (lossless, so the score is
the restoration's and not a JPEG re-encode of the output), `abair restore` runs on the folder in a
subprocess (the served mode, whole images, the CLI's own tiling), and every output is compared
with its target: PSNR of the input and of the output, the share of images made worse than the
input by more than 0.1 dB, and what the estimator chose (the weights `abair restore` prints).
The classical method a user would reach for (tasks/evaluate/baselines.py, chosen by the set's
task: non-local means for noise, gamma + CLAHE for low light, none for the rest) runs on the same
inputs.

Sets (all from ../shared/data; none of it is training data of the default profile; the held-out
parts of the `real` profile's training pairs are chosen by the same rule as its training):

    polyu          real camera noise: PolyU pairs (mean of many shots as target), held-out scenes
    lol            real low light: LOL v1 pairs, held-out images
    rain100l       real rain: Rain100L pairs, the first N by name
    gopro          real motion blur: the 2 GoPro pairs
    cbsd68_s15/25/50  Gaussian noise on CBSD68 photos (fixed seed), sigma 15/25/50
    classic5_q20   JPEG quality 20 on Classic5 (grayscale)
    gray_blur      Classic5 with a Gaussian blur (a dim grayscale photo that is not low light)
    clean          clean landmark photos as they are: restoring them must not change them

Writes benchmarks/results/real_photos_<tag>.md and .json with the machine, the model and the
time per set. Skips (exit 0, a message) when ../shared/data is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.core import imageio  # noqa: E402
from tasks.core.metrics import psnr  # noqa: E402

DATA = Path(os.environ.get("ABAIR_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORSE_DB = 0.1
LINE = re.compile(r"^(?P<source>.+): restored -> (?P<target>.+) \(weights: (?P<weights>[^)]*)\)")


def _pairs(folder: Path, names: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    names = names if names is not None else sorted(p.name for p in (folder / "input").iterdir())
    out = []
    for name in names:
        degraded = _read(folder / "input" / name)
        clean = _read(folder / "target" / name)
        out.append((Path(name).stem, degraded, clean))
    return out


def score(image: np.ndarray, target: np.ndarray) -> float:
    """PSNR (dB) of two float32 HxWx3 [0, 1] images: the project's one PSNR (tasks/core/metrics.py)."""
    import torch

    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    return float(psnr(as_tensor(image), as_tensor(target))[0])


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"{path}: unreadable")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _synthetic(folder: Path, count: int, degrade, gray: bool = False) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for i, path in enumerate(sorted(folder.iterdir())[:count]):
        clean = _read(path)
        if gray:
            clean = np.repeat(cv2.cvtColor(clean, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
        degraded = degrade(clean.astype(np.float32) / 255.0, np.random.default_rng([0, i]))
        out.append((path.stem, imageio.to_uint8(degraded), clean))
    return out


def build_sets(limit: int | None) -> dict[str, dict]:
    """{set: {"task": [...], "items": [(name, degraded uint8, clean uint8)]}}."""
    from degradations import blur, jpeg, noise
    from tasks.data import reader

    n = lambda default: min(default, limit) if limit else default  # noqa: E731
    polyu = reader.open_paired({"paths": [str(DATA / "train/PolyU_part60")], "holdout": 0.25, "group": "scene"}, "val")
    lol = reader.open_paired({"paths": [str(DATA / "train/LOLv1_subset50"), str(DATA / "train/LOLv1_more70")],
                              "holdout": 0.2, "group": "image"}, "val")
    sets = {
        "polyu": {"task": ["noise"], "items": [(Path(k).stem, *polyu.load(k)) for k in polyu.names[:n(12)]]},
        "lol": {"task": ["lowlight"], "items": [(Path(k).stem.replace("/", "_"), *lol.load(k)) for k in lol.names[:n(12)]]},
        "rain100l": {"task": ["rain"], "items": _pairs(DATA / "bench/Rain100L",
                                                       sorted(p.name for p in (DATA / "bench/Rain100L/input").iterdir())[:n(12)])},
        "gopro": {"task": ["blur"], "items": _pairs(DATA / "bench/GoPro_samples")[:n(2)]},
    }
    for sigma in (15, 25, 50):
        sets[f"cbsd68_s{sigma}"] = {"task": ["noise"], "items": _synthetic(
            DATA / "bench/CBSD68", n(8), lambda x, rng, s=sigma: noise.apply(x, rng, s / 50.0)[0])}
    sets["classic5_q20"] = {"task": ["jpeg"], "items": _synthetic(
        DATA / "bench/Classic5", n(5), lambda x, rng: jpeg.apply(x, rng, 0.8)[0], gray=True)}
    sets["gray_blur"] = {"task": ["blur"], "items": _synthetic(
        DATA / "bench/Classic5", n(5), lambda x, rng: blur.apply(x, rng, 0.4)[0], gray=True)}
    sets["clean"] = {"task": [], "items": _synthetic(DATA / "clean/landmarks", n(6), lambda x, rng: x)}
    # pairs the restorer's size rule would crop: keep everything a multiple of 8 so sizes match
    return sets


def parse_weights(text: str) -> dict[str, float]:
    """"rain 0.62, noise 0.10; backbone 0.28; keep 0.05" -> {rain: 0.62, ..., keep: 0.05}."""
    out = {}
    for part in re.split(r"[,;]", text):
        match = re.fullmatch(r"(\w+) ([0-9.]+)", part.strip())   # not "jpeg q90" nor "local tiles of 512 px"
        if match:
            out[match[1]] = float(match[2])
    return out


def run_set(model: str, name: str, spec: dict, scratch: Path, extra: list[str]) -> dict:
    inputs, outputs = scratch / name / "input", scratch / name / "output"
    inputs.mkdir(parents=True)
    for key, degraded, _ in spec["items"]:
        cv2.imwrite(str(inputs / f"{key}.png"), cv2.cvtColor(degraded, cv2.COLOR_RGB2BGR))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "restore", "--model", model, "--out", str(outputs),
                           "--no-progress", *extra, str(inputs)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"abair restore failed on {name} ({proc.returncode}):\n{proc.stderr[-3000:]}")
    chosen = {}
    for line in proc.stdout.splitlines():
        match = LINE.match(line)
        if match:
            chosen[Path(match["source"]).stem] = parse_weights(match["weights"])
    baseline = _baseline(spec["task"])
    rows = []
    for key, degraded, clean in spec["items"]:
        restored = _read(outputs / f"{key}.png")
        target = clean.astype(np.float32) / 255.0
        row = {"image": key, "input": score(degraded.astype(np.float32) / 255.0, target),
               "abair": score(restored.astype(np.float32) / 255.0, target)}
        if baseline is not None:
            row["baseline"] = score(np.clip(baseline(degraded.astype(np.float32) / 255.0), 0, 1).astype(np.float32), target)
        weights = chosen.get(key, {})
        adapters = {k: v for k, v in weights.items() if k not in ("backbone", "keep")}
        row["keep"] = weights.get("keep")
        row["top"] = max(adapters, key=adapters.get) if adapters and max(adapters.values()) > weights.get("backbone", 0) else "backbone"
        rows.append(row)
    return {"task": spec["task"], "seconds": round(seconds, 1), "images": rows, **summarise(rows)}


def _baseline(task: list[str]):
    """The classical method a user would reach for, as the evaluation's `baseline` mode runs it."""
    from tasks.evaluate import baselines

    return lambda x: baselines.restore(x, task)


def summarise(rows: list[dict]) -> dict:
    summary = {key: float(np.mean([r[key] for r in rows])) for key in ("input", "abair", "baseline") if key in rows[0]}
    summary["worse_share"] = float(np.mean([r["abair"] < r["input"] - WORSE_DB for r in rows]))
    summary["worst_change_db"] = float(min(r["abair"] - r["input"] for r in rows))
    keeps = [r["keep"] for r in rows if r["keep"] is not None]
    summary["keep_mean"] = float(np.mean(keeps)) if keeps else None
    tops = [r["top"] for r in rows]
    summary["top"] = {t: tops.count(t) for t in sorted(set(tops))}
    return summary


def markdown(results: dict, info: dict) -> str:
    lines = [f"# Real photos, restored whole with `abair restore` ({info['tag']})", "",
             f"Model `{info['model']}`, {info['date']}, {info['machine']}. Command: `{info['command']}`.", "",
             "PSNR in dB against the target, mean over the set's images; *worse*: share of images more than "
             f"{WORSE_DB} dB below their input; *worst*: the largest drop (negative) or the smallest gain; "
             "*top*: the estimator's choice (the highest adapter weight, or `backbone` when the backbone-alone "
             "share is higher), counted; *keep*: mean share of the input blended back.", "",
             "| set | images | input | ABAIR (sw) | baseline | worse | worst | keep | top | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        base = f"{r['baseline']:.2f}" if "baseline" in r else "-"
        keep = f"{r['keep_mean']:.2f}" if r["keep_mean"] is not None else "-"
        top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
        lines.append(f"| {name} | {len(r['images'])} | {r['input']:.2f} | {r['abair']:.2f} | {base} | "
                     f"{r['worse_share']:.0%} | {r['worst_change_db']:+.2f} | {keep} | {top} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/abair-restorer@champion")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per set")
    parser.add_argument("--sets", nargs="*", default=None, help="only these sets")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("restore_args", nargs="*", help="after --: extra `abair restore` options")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is missing (see ../shared/data/README.md)")
        return 0
    sets = build_sets(args.limit)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets}
    results = {}
    with tempfile.TemporaryDirectory(prefix="abair-real-") as scratch:
        for name, spec in sets.items():
            results[name] = run_set(args.model, name, spec, Path(scratch), args.restore_args)
            r = results[name]
            print(f"{name:14s} input {r['input']:6.2f}  abair {r['abair']:6.2f}  "
                  f"{'baseline %6.2f  ' % r['baseline'] if 'baseline' in r else ''}worse {r['worse_share']:.0%}  "
                  f"worst {r['worst_change_db']:+.2f}  top {r['top']}  ({r['seconds']:.0f} s)", flush=True)
    info = {"tag": args.tag, "model": args.model, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"real_photos_{args.tag}.json").write_text(json.dumps({"info": info, "sets": results}, indent=1))
    (out / f"real_photos_{args.tag}.md").write_text(markdown(results, info))
    print(f"wrote {out / f'real_photos_{args.tag}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
