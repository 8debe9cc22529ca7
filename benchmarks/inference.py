"""CPU inference speed and memory of `abair restore`, side by side in one run on the same images.

    python benchmarks/inference.py --model checkpoints                 # the trained tiny system
    python benchmarks/inference.py --model checkpoints --baseline-commit e466fd5 --quick

Paths, each one `abair restore` process per (system, image size), on the same images:
  - `torch eager (before)`: the code of `--baseline-commit` (the commit before the CPU work),
    checked out into a temporary folder (`git worktree`): today's `abair restore` as users had it;
  - `torch (now)`: this checkout's `abair restore`, its defaults (cache-sized exact tiles on CPU,
    channels-last, MDTA on pixel rows: models/tiling.py, models/backbone.py);
  - `onnxruntime`: this checkout's `abair restore --backend onnxruntime` on a release exported
    with `abair export --onnx` (the export is not timed): its auto tiling runs local tiles beyond
    the tile budget (--max-pixels, 512 x 512), so a 1024 x 1024 image differs from the torch
    paths as local tiling does; `onnxruntime, whole` (--max-pixels 0) runs it whole;
  - `torch bf16 (now)`: `--precision bf16` where torch supports it on this CPU, with its error.
Systems: `tiny` (the trained system given by --model) and `base` (the 26M Restormer backbone with
the same adapters and estimator layout, random weights: time and memory do not depend on the
weights). Sizes: 256x256 (8 images per process; `base` 2) and 1024x1024 (2 images; `base` one
image, once, and only `before` and `now`: each takes minutes).

Per row: images/s from the command's own summary (the restore loop, model loaded: what a batch
costs per image), the process's wall time (what one command costs, startup and model load
included), the peak resident memory of the process (os.wait4), and how far its outputs are from
the `torch eager (before)` outputs of the same images (max difference in 8-bit levels, share of
identical pixels: the tolerance is 1 level and 99.9%).

Writes benchmarks/results/inference.md and .json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
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

from benchmarks._machine import cpu_name  # noqa: E402
from benchmarks.restore_memory import photo  # noqa: E402

BASELINE_COMMIT = "e466fd5"   # the last commit before the CPU inference work
SIZES = {"256": (256, 256, 8), "1024": (1024, 1024, 2)}
TOLERANCE_LEVELS, TOLERANCE_IDENTICAL = 1, 0.999


def write_images(folder: Path, side: int, count: int) -> list[Path]:
    """`count` different photo-like PNGs of side x side (windows of a tiled photo)."""
    folder.mkdir(parents=True, exist_ok=True)
    big = photo(side * 2, side * 2)
    paths = []
    for i in range(count):
        y, x = (i * 97) % side, (i * 61) % side
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), big[y:y + side, x:x + side])
        paths.append(path)
    return paths


def base_system(folder: Path, like: Path) -> Path:
    """A `base` system (random weights, seeded) with the adapters and estimator layout of `like`."""
    import torch

    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.identity import save_backbone
    from tasks.core.components import load_system_dir

    torch.manual_seed(0)
    tiny = load_system_dir(like)
    backbone = build_backbone("base")
    save_backbone(backbone, folder / "backbone.safetensors")
    bank = AdapterBank(backbone, tiny.bank.kind, tiny.bank.options)
    (folder / "adapters").mkdir(parents=True, exist_ok=True)
    for name in tiny.bank.names:
        bank.add(name)
        for parameter in bank.parameters_of(name):
            torch.nn.init.normal_(parameter, std=0.02)
        bank.save(name, folder / "adapters" / f"{name}.safetensors")
    shutil.copy(like / "estimator.safetensors", folder / "estimator.safetensors")
    return folder


def run_restore(code: Path, model: Path, images: list[Path], out: Path, extra: list[str]) -> dict:
    """One `abair restore` process of the code at `code`: wall time, peak RSS, images/s."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "flows.cli", "restore", "--model", str(model), "--out", str(out),
               "--no-progress", *extra, *map(str, images)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=code, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    output = log.read_text()
    code_ = os.waitstatus_to_exitcode(status)
    if code_ != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code_}):\n{output[-3000:]}")
    summary = re.search(r"restored (\d+) images .* in ([0-9.]+) s: ([0-9.]+) images/s", output)
    loop = float(summary[2]) if summary else None
    return {"wall_s": round(seconds, 2), "loop_s": loop, "images": len(images),
            "images_per_s": round(len(images) / loop, 3) if loop else round(len(images) / seconds, 3),
            "peak_mb": round(usage.ru_maxrss / 1024), "output_tail": output[-600:]}


def compare(out: Path, reference: Path, images: list[Path]) -> dict:
    """Max difference (8-bit levels) and share of identical samples against the reference outputs."""
    worst, identical, total = 0, 0, 0
    for image in images:
        a = cv2.imread(str(out / image.name), cv2.IMREAD_UNCHANGED).astype(np.int16)
        b = cv2.imread(str(reference / image.name), cv2.IMREAD_UNCHANGED).astype(np.int16)
        diff = np.abs(a - b)
        worst = max(worst, int(diff.max()))
        identical += int((diff == 0).sum())
        total += diff.size
    share = identical / total
    return {"max_levels": worst, "identical": round(share, 6),
            "within_tolerance": worst <= TOLERANCE_LEVELS and share >= TOLERANCE_IDENTICAL}


def checkout(commit: str, folder: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(folder), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


def export_release(model: Path, folder: Path) -> Path | None:
    """`abair export --onnx` of a components folder (None, with the reason printed, if it fails)."""
    command = [sys.executable, "-m", "flows.cli", "export", str(model), "--out", str(folder), "--onnx", "--force"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"onnx export of {model} failed: {(proc.stdout + proc.stderr)[-1500:]}", flush=True)
        return None
    print(f"exported {model} -> {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def bf16_supported() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                                                 lambda: False)())


def seconds_per_image(row: dict) -> float:
    """The restore loop's seconds per image (the whole command's when it printed no summary: one image)."""
    return (row["loop_s"] if row.get("loop_s") else row["wall_s"]) / row["images"]


def write_report(result: dict, stem: Path) -> None:
    """stem.json and stem.md from {machine info..., "rows": [...]} (also: --report-only stem.json)."""
    rows = result["rows"]
    for row in rows:
        before = next((r for r in rows if r["system"] == row["system"] and r["size"] == row["size"]
                       and r["path"] == "torch eager (before)"), None)
        if before is not None:
            row["speedup_loop"] = round(seconds_per_image(before) / seconds_per_image(row), 2)
            row["speedup_wall"] = round(before["wall_s"] / row["wall_s"], 2)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# CPU inference: `abair restore`, before and now, torch and onnxruntime", "",
             f"{result['date']}, {result['machine']}, torch {result['torch']} ({result['threads']} threads). "
             f"Command: `{result['command']}`. Before = commit {result['baseline_commit']}.", "",
             "One `abair restore` process per row on the same PNG images (photo-like). *s/image*: the "
             "command's restore loop per image (model loaded; with one image, the whole command); *wall*: the "
             "whole command, startup and model load included; *peak*: the process's peak resident memory; "
             "*speed-up*: s/image of `torch eager (before)` over this row's, on the same images (wall-time ratio "
             "in brackets); *max diff / identical*: its outputs against `before`'s (tolerance: "
             f"{TOLERANCE_LEVELS} level, {TOLERANCE_IDENTICAL:.1%} identical). `base` has random weights "
             "(speed does not depend on them).", "",
             "| system | image | path | images | s/image | wall (s) | peak | speed-up | max diff | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = f"{row['speedup_loop']}x ({row['speedup_wall']}x)" if "speedup_loop" in row else "-"
        diff = f"{row['max_levels']} levels" if "max_levels" in row else "-"
        same = f"{row['identical']:.4%}" if "identical" in row else "-"
        lines.append(f"| {row['system']} | {row['size']} | {row['path']} | {row['images']} | "
                     f"{seconds_per_image(row):.2f} | {row['wall_s']} | {row['peak_mb']} MB | {speed} | {diff} | {same} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints", help="the trained tiny system (a components folder)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--systems", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--paths", nargs="+", default=["before", "now", "onnxruntime", "onnxruntime_whole", "bf16"],
                        choices=["before", "now", "onnxruntime", "onnxruntime_whole", "bf16"])
    parser.add_argument("--release", help="an `abair export --onnx` release of --model (skips exporting the tiny system)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--report-only", help="rewrite the .md of an earlier run's .json")
    args = parser.parse_args(argv)
    if args.report_only:
        stem = Path(args.report_only).with_suffix("")
        write_report(json.loads(Path(args.report_only).read_text()), stem)
        print(f"wrote {stem}.md")
        return 0

    model = Path(args.model).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="abair-inference-") as scratch:
        scratch = Path(scratch)
        old = checkout(args.baseline_commit, scratch / "before") if "before" in args.paths else None
        try:
            systems = {"tiny": model}
            if "base" in args.systems:
                systems["base"] = base_system(scratch / "base", model)
            releases = {}
            if {"onnxruntime", "onnxruntime_whole"} & set(args.paths):
                for name in args.systems:
                    releases[name] = Path(args.release) if name == "tiny" and args.release else \
                        export_release(systems[name], scratch / f"release_{name}")
            paths = {"before": ("torch eager (before)", old, []), "now": ("torch (now)", ROOT, []),
                     "onnxruntime": ("onnxruntime", ROOT, ["--backend", "onnxruntime"]),
                     "onnxruntime_whole": ("onnxruntime, whole", ROOT, ["--backend", "onnxruntime", "--max-pixels", "0"]),
                     "bf16": ("torch bf16 (now)", ROOT, ["--precision", "bf16"])}
            if "bf16" in args.paths and not bf16_supported():
                print("bf16: not supported by torch on this CPU: skipped", flush=True)
                args.paths = [p for p in args.paths if p != "bf16"]
            for system in args.systems:
                for size in args.sizes:
                    side, _, count = SIZES[size]
                    keys = args.paths
                    if system == "base":
                        # base costs about 18x tiny per pixel: 2 images at 256 px, and one at 1024 px
                        # with the torch paths only (each takes minutes)
                        count = 2 if size == "256" else 1
                        if size == "1024":
                            keys = [k for k in keys if k in ("before", "now")]
                    images = write_images(scratch / f"images_{size}_{count}", side, count)
                    reference = None
                    for key in keys:
                        label, code, extra = paths[key]
                        target = releases.get(system) if key.startswith("onnxruntime") else systems[system]
                        if target is None:
                            continue
                        out = scratch / f"out_{system}_{size}_{key}"
                        result = run_restore(code, target, images, out, extra)
                        row = {"system": system, "size": f"{side}x{side}", "path": label, **result}
                        if key == "before":
                            reference = out
                        elif reference is not None:
                            row.update(compare(out, reference, images))
                        row.pop("output_tail")
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            if old is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    import torch

    info = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {memory_gb:.0f} GB RAM",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "model": args.model, "baseline_commit": args.baseline_commit,
            "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "inference" + (f"_{args.tag}" if args.tag else "")
    write_report({**info, "rows": rows}, results / name)
    print(f"wrote {results / name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
