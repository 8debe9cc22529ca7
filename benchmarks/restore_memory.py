"""Peak memory and time of `abair restore` on one large photo, at 1, 12 and 48 megapixels.

    python benchmarks/restore_memory.py --model checkpoints
    python benchmarks/restore_memory.py --model checkpoints --sizes 1 12 --tiling exact   # one tiling

Each run is one `abair restore` process on one JPEG (a real photo tiled to the size, so the
content is photo-like), under the default memory budget (2 GB) unless --memory-budget says
otherwise. Its peak resident memory comes from the kernel (os.wait4's ru_maxrss for that very
process); the same command on a 64x64 image gives the baseline (Python, torch, the model), and
"added" is the difference: what the budget bounds. Beside it, the plan's own estimate
(tasks/serve/memory.py) and the tiling the command chose (from its output line).

Writes benchmarks/results/restore_memory.md and .json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

SIDES = {1: (1152, 864), 12: (4000, 3000), 48: (8000, 6000)}   # 4:3 photos


def photo(width: int, height: int) -> np.ndarray:
    """A photo-like BGR image of this size: scikit-image's astronaut, mirrored and tiled."""
    from skimage import data

    tile = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


def run_measured(model: str, image: Path, out: Path, extra: list[str]) -> dict:
    """One restore process; its peak RSS (kB -> bytes) from os.wait4, its wall time and output."""
    command = [sys.executable, "-m", "flows.cli", "restore", "--model", model, "--out", str(out), "--no-progress",
               "--overwrite", *extra, str(image)]
    log = out.parent / f"{image.stem}.log"
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    chosen = re.search(r", ((?:exact|local) tiles of \d+ px|whole), ~([0-9.]+ [MG]B)\)", text)
    return {"returncode": proc.returncode, "seconds": round(seconds, 1), "peak_bytes": usage.ru_maxrss * 1024,
            "tiling": chosen[1] if chosen else ("whole" if proc.returncode == 0 else None),
            "estimate": chosen[2] if chosen else None, "output": text[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 12, 48], choices=sorted(SIDES))
    parser.add_argument("--tiling", default="auto", choices=["auto", "exact", "local"])
    parser.add_argument("--memory-budget", default="2GB")
    parser.add_argument("--tag", default="")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    extra = ["--tiling", args.tiling, "--memory-budget", args.memory_budget]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        small = scratch / "small.jpg"
        cv2.imwrite(str(small), photo(64, 64), [cv2.IMWRITE_JPEG_QUALITY, 92])
        baseline = run_measured(args.model, small, scratch / "out", extra)
        if baseline["returncode"] != 0:
            raise SystemExit(f"the baseline restore failed:\n{baseline['output']}")
        print(f"baseline (64x64): peak {baseline['peak_bytes'] / 2**20:.0f} MB in {baseline['seconds']} s", flush=True)
        for size in args.sizes:
            width, height = SIDES[size]
            image = scratch / f"photo_{size}mp.jpg"
            cv2.imwrite(str(image), photo(width, height), [cv2.IMWRITE_JPEG_QUALITY, 92])
            result = run_measured(args.model, image, scratch / "out", extra)
            row = {"megapixels": round(width * height / 1e6, 1), "size": f"{width}x{height}", **result,
                   "added_bytes": result["peak_bytes"] - baseline["peak_bytes"]}
            rows.append(row)
            state = "restored" if result["returncode"] == 0 else f"refused/failed ({result['returncode']})"
            print(f"{row['size']}: {state}, {row['tiling']}, peak {row['peak_bytes'] / 2**20:.0f} MB "
                  f"(+{row['added_bytes'] / 2**20:.0f} MB, plan ~{row['estimate']}), {row['seconds']} s", flush=True)

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    info = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {memory_gb:.0f} GB RAM", "date": time.strftime("%Y-%m-%d"), "model": args.model, "tiling": args.tiling,
            "memory_budget": args.memory_budget,
            "command": "python benchmarks/restore_memory.py " + " ".join(sys.argv[1:]),
            "baseline_peak_bytes": baseline["peak_bytes"], "baseline_seconds": baseline["seconds"]}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "restore_memory" + (f"_{args.tag}" if args.tag else "")
    for row in rows:
        if row["returncode"] == 0:   # a failure's output stays in the JSON, to say why
            row.pop("output")
    (results / f"{name}.json").write_text(json.dumps({**info, "rows": rows}, indent=2))
    lines = [f"# `abair restore` memory and time per image ({args.tiling} tiling, budget {args.memory_budget})", "",
             f"{info['date']}, {info['machine']}, model `{args.model}`. Command: `{info['command']}`.", "",
             "One process per image (a JPEG, q92, of a tiled photo). *peak*: the process's peak resident memory "
             "(os.wait4); *added*: peak minus the same command's peak on a 64x64 image "
             f"({baseline['peak_bytes'] / 2**20:.0f} MB: Python, torch, the model); *plan*: "
             "tasks/serve/memory.py's estimate of the added memory; *tiling*: what the command chose.", "",
             "| image | MP | tiling | plan | peak | added | time (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        tiling = row["tiling"] if row["returncode"] == 0 else "refused"
        lines.append(f"| {row['size']} | {row['megapixels']} | {tiling} | {row['estimate'] or '-'} | "
                     f"{row['peak_bytes'] / 2**20:.0f} MB | {row['added_bytes'] / 2**20:.0f} MB | {row['seconds']} |")
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results / name}.md")


if __name__ == "__main__":
    main()
