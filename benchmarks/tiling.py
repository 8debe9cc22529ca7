"""Tiled vs whole-image inference: how far each tiling is from the whole-image result, its peak
memory and its time.

    python benchmarks/tiling.py [--out benchmarks/results] [--cases tiny:1024:256 base:512:128]

A case is SIZE:SIDE:TILE (a SIDE x SIDE image, tiles of TILE x TILE pixels). Each variant (whole,
exact, local) runs in its own process, so its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the growth of the process's peak RSS over its RSS just
before the call. Five LoRA adapters with random non-zero tensors, soft weights (merged into the
backbone by Restorer, as for any single image). Writes <out>/tiling.json and <out>/tiling.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.model_speed import cpu_model, with_adapters  # noqa: E402
from models.backbone import build_backbone  # noqa: E402
from models.restorer import Restorer  # noqa: E402

VARIANTS = ("whole", "exact", "local")
OVERLAP = 32


def test_image(side: int) -> torch.Tensor:
    """Smooth structure plus fine noise: both the global statistics and local detail matter."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, side // 16, side // 16, generator=generator)
    image = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    return (image + 0.03 * torch.randn(1, 3, side, side, generator=generator)).clamp(0, 1)


def current_rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def probe(size: str, side: int, tile: int, variant: str, device: str, out_file: str) -> dict:
    """One variant in this process: restore, save the output, report time and peak memory."""
    torch.manual_seed(0)
    model = build_backbone(size).eval().to(device)
    restorer = Restorer(model, with_adapters(model, "lora"))
    x = test_image(side).to(device)
    weights = torch.softmax(torch.randn(1, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    kwargs = {} if variant == "whole" else {"tile": tile, "tiling": variant, "overlap": OVERLAP}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    start = time.perf_counter()
    restored, _ = restorer.restore(x, mode="oracle", weights=weights, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - start
    np.save(out_file, restored.cpu().numpy())
    return {"seconds": round(seconds, 2), "peak_mib": round(peak / 2**20, 1)}


def run_case(size: str, side: int, tile: int, device: str, workdir: Path) -> dict:
    outputs, rows = {}, {}
    for variant in VARIANTS:
        out_file = workdir / f"{size}-{side}-{tile}-{variant}.npy"
        cmd = [sys.executable, __file__, "--probe", f"{size}:{side}:{tile}:{variant}", "--device", device,
               "--probe-out", str(out_file)]
        print(f"{size} {side}x{side} tile {tile}: {variant} ...", flush=True)
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows[variant] = json.loads(result.stdout.strip().splitlines()[-1])
        outputs[variant] = np.load(out_file)
    for variant in ("exact", "local"):
        diff = np.abs(outputs[variant] - outputs["whole"])
        rows[variant].update(max_abs_diff=float(f"{diff.max():.3g}"), mean_abs_diff=float(f"{diff.mean():.3g}"))
    return {"size": size, "side": side, "tile": tile, "variants": rows}


def write_report(result: dict, out_dir: Path) -> None:
    lines = ["# Tiled vs whole-image inference", "",
             f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
             f"Machine: {result['machine']}, device {result['device']}, torch {result['torch']}", "",
             "Five LoRA adapters (random non-zero tensors), soft weights merged into the backbone. "
             "`exact`: tiles inside every transformer block, MDTA's attention in two passes (sums over all "
             f"tiles, then the softmax per tile). `local`: independent overlapping tiles ({OVERLAP} px), "
             "raised-cosine blend. Peak memory: " + ("CUDA max_memory_allocated over the call."
                                                     if result["device"].startswith("cuda") else
                                                     "growth of the process's peak RSS during the call "
                                                     "(each variant in its own process)."), "",
             "| size | image | tile | variant | seconds | peak MiB | max abs diff to whole | mean abs diff |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for case in result["cases"]:
        for variant, row in case["variants"].items():
            lines.append(f"| {case['size']} | {case['side']}x{case['side']} | {case['tile']} | {variant} | "
                         f"{row['seconds']} | {row['peak_mib']} | {row.get('max_abs_diff', '-')} | "
                         f"{row.get('mean_abs_diff', '-')} |")
    lines.append("")
    (out_dir / "tiling.md").write_text("\n".join(lines))
    (out_dir / "tiling.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cases", nargs="+", default=["tiny:1024:256", "base:512:128"], help="SIZE:SIDE:TILE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        size, side, tile, variant = args.probe.split(":")
        print(json.dumps(probe(size, int(side), int(tile), variant, args.device, args.probe_out)))
        return None

    result = {"command": "python benchmarks/tiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{cpu_model()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)",
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            size, side, tile = case.split(":")
            result["cases"].append(run_case(size, int(side), int(tile), args.device, Path(tmp)))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(result, out_dir)
    print((out_dir / "tiling.md").read_text())
    return result


if __name__ == "__main__":
    main()
