"""Fingerprint a finished default `dvc repro`: sha256 of every shard, of the training log, of the
metrics, of every checkpoint's tensors, and the headline figures. Run it in two project folders
(before and after a change that must not change the maths) and compare.

    python benchmarks/restructure_equivalence.py PROJECT_DIR > before.json
    python benchmarks/restructure_equivalence.py PROJECT_DIR --compare before.json --markdown out.md

Timing columns (img_per_s, gpu memory, seconds) are left out of the hashes: they measure the
machine, not the maths. Checkpoint tensors are hashed apart from the file bytes, because a
file's metadata holds figures (validation PSNR) besides the weights.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

TIMING_COLUMNS = {"img_per_s", "gpu_mem_gb"}
TIMING_KEYS = ("seconds", "elapsed", "time_s", "img_per_s", "images_per_s")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tsv_without_timing(path: Path) -> str:
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    kept = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]
    return sha256_bytes(json.dumps(kept, sort_keys=True).encode())


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def tensors_sha256(path: Path) -> str:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].tobytes())
    return digest.hexdigest()


def fingerprint(project: Path) -> dict:
    out: dict = {}
    for shard in sorted((project / "data/shards").glob("*")):
        out[f"shard {shard.name}"] = sha256_bytes(shard.read_bytes())
    training = project / "reports/training"
    out["pretrain.tsv (timing columns left out)"] = tsv_without_timing(training / "pretrain.tsv")
    for tsv in sorted(training.glob("estimator*.tsv")) + sorted((training / "adapters").glob("*.tsv")):
        out[f"{tsv.relative_to(training)} (timing columns left out)"] = tsv_without_timing(tsv)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    out["metrics.json (file)"] = sha256_bytes((project / "reports/metrics.json").read_bytes())
    out["metrics.json (values, timing left out)"] = sha256_bytes(json.dumps(without_timing(metrics), sort_keys=True).encode())
    for path in sorted((project / "checkpoints").rglob("*.safetensors")):
        name = str(path.relative_to(project / "checkpoints"))
        out[f"{name} (tensors)"] = tensors_sha256(path)
        out[f"{name} (file)"] = sha256_bytes(path.read_bytes())
    pretrain = json.loads((training / "pretrain.json").read_text())
    estimator = json.loads((training / "estimator.json").read_text())
    headline = {
        "Phase I val PSNR input (dB)": pretrain.get("val_psnr_input"),
        "Phase I val PSNR restored (dB)": pretrain.get("val_psnr_restored"),
        "Phase I val gain (dB)": pretrain.get("val_psnr_gain"),
        "known sets, input PSNR (dB)": metrics.get("summary/known/input/psnr"),
        "known sets, SW PSNR (dB)": metrics.get("summary/known/sw/psnr"),
        "all sets, SW PSNR (dB)": metrics.get("summary/all/sw/psnr"),
        "estimator val accuracy": estimator.get("val_accuracy"),
    }
    out.update({k: v for k, v in headline.items() if v is not None})
    return out


def markdown(before: dict, after: dict) -> str:
    lines = ["| what | before | after | same |", "|---|---|---|---|"]
    for key in sorted(set(before) | set(after), key=lambda k: (not k.startswith("shard"), k)):
        b, a = before.get(key), after.get(key)
        short = (lambda v: v[:16] if isinstance(v, str) else (f"{v:.6f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {key} | {short(b)} | {short(a)} | {'yes' if a == b else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--compare", type=Path, help="a JSON written by an earlier run of this script")
    parser.add_argument("--markdown", type=Path, help="write the before/after table here")
    args = parser.parse_args(argv)
    now = fingerprint(args.project)
    if args.compare:
        before = json.loads(args.compare.read_text())
        table = markdown(before, now)
        if args.markdown:
            args.markdown.write_text(table)
        print(table)
        return 0
    json.dump(now, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
