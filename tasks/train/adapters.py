"""Phase II (`adapters`): one low-rank adapter per degradation on the frozen backbone.

Each adapter learns from its degradation's paired folder when params name one (real pairs, e.g.
LOL for low light), otherwise from synthetic single-degradation patches: clean crops of the
shard set degraded on the fly. The backbone never changes (its fingerprint is checked after
every job), so adapters are independent files and adding one never touches the others. A job
whose inputs (backbone fingerprint, its own params, its data) match the existing file is skipped.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch

import degradations

from tasks.data import reader

from tasks.train import loop
from tasks.core.device import pick_device
from tasks.core.errors import AbairError
from tasks.core.metrics import psnr
from tasks.core.params import params_hash

log = logging.getLogger(__name__)

# Per-adapter knobs (overridable per degradation under `per_degradation`).
JOB_KNOBS = ("steps", "batch", "patch", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "severity",
             "loss", "seed", "data", "val_samples")
BANK_KNOBS = ("kind", "rank", "alpha", "hidden", "targets")
RUNTIME_KNOBS = ("device", "parallel", "workers", "log_every")


def adapter_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.safetensors"


def job_config(cfg: dict, name: str) -> dict:
    """The effective settings of one adapter job: bank + common knobs, then its overrides."""
    job = {k: copy.deepcopy(cfg[k]) for k in (*BANK_KNOBS, *JOB_KNOBS, *RUNTIME_KNOBS) if k in cfg and k != "data"}
    job["data"] = (cfg.get("data") or {}).get(name)
    override = (cfg.get("per_degradation") or {}).get(name) or {}
    unknown = set(override) - set(JOB_KNOBS)
    if unknown:
        raise AbairError(f"params.yaml adapters.per_degradation.{name}", f"unknown or bank-wide keys {sorted(unknown)} "
                         f"(per adapter: {', '.join(JOB_KNOBS)})")
    job.update(copy.deepcopy(override))
    return job


class SyntheticPatch:
    """Clean shard crop -> random patch -> one degradation at a random severity."""

    def __init__(self, name: str, patch: int, severity: tuple[float, float]):
        degradations.get(name)  # an unknown name fails here, not in a data worker
        self.name, self.patch, self.severity = name, patch, severity

    def __call__(self, sample: dict, rng: np.random.Generator):
        (clean,) = reader.random_patch([sample["clean"]], self.patch, rng)
        clean = clean.astype(np.float32) / 255.0
        degraded, _ = degradations.draw(clean, rng, self.name, self.severity)
        return reader.to_tensor(degraded), reader.to_tensor(clean)


class PairedPatch:
    def __init__(self, patch: int):
        self.patch = patch

    def __call__(self, sample: dict, rng: np.random.Generator):
        degraded, clean = reader.random_patch([sample["degraded"], sample["clean"]], self.patch, rng)
        return reader.to_tensor(degraded), reader.to_tensor(clean)


def validation_pairs(job: dict, name: str, shards: str, index: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out (degraded, clean) float pairs: the val split's clean crops degraded with fixed
    seeds, or every 10th pair of a paired folder (which then is not trained on)."""
    count = job.get("val_samples", 16)
    if job["data"]:
        folder = reader.PairedFolder(job["data"], check=False)
        names = folder.names[::10][:count]
        pairs = []
        for pair_name in names:
            degraded, clean = folder.load(pair_name)
            size = min(256, *degraded.shape[:2]) // 8 * 8
            pairs.append((degraded[:size, :size].astype(np.float32) / 255, clean[:size, :size].astype(np.float32) / 255))
        return pairs
    module = degradations.get(name)
    lo, hi = job["severity"]
    pairs = []
    for i, sample in enumerate(reader.read_split(reader.shard_urls(shards, "val", index))):
        if i >= count:
            break
        clean = sample["clean"].astype(np.float32) / 255.0
        rng = np.random.default_rng([job["seed"], 7919, i])
        degraded, _ = module.apply(clean, rng, float(lo + (hi - lo) * (i + 0.5) / count))
        pairs.append((degraded, clean))
    return pairs


@torch.no_grad()
def psnr_on(backbone, bank, name: str | None, pairs, device) -> float:
    values = []
    for degraded, clean in pairs:
        x = reader.to_tensor(degraded)[None].to(device)
        with bank.weights(None if name is None else torch.ones(1, 1)):
            restored = backbone(x)
        values.append(float(psnr(restored.float().clamp(0, 1), reader.to_tensor(clean)[None].to(device))))
    return float(np.mean(values))


def train_adapter(cfg: dict, name: str, backbone_path: str = "checkpoints/backbone.safetensors",
                  shards: str = "data/shards", out_dir: str = "checkpoints/adapters",
                  reports: str = "reports/training/adapters", parent_run_id: str | None = None,
                  force: bool = False, progress: bool = True) -> dict:
    """Train (or skip, when up to date) the adapter for one degradation; returns its summary."""
    from models.adapters import AdapterBank, read_adapter_metadata
    from models.backbone import fingerprint, load_backbone

    job = job_config(cfg, name)
    if name not in degradations.names() and not job["data"]:
        # A user's own degradation needs its paired folder; library names can be synthesised.
        raise AbairError("params.yaml adapters.degradations", f"unknown degradation {name!r} and no paired folder "
                         f"for it in adapters.data; known: {degradations.names()}")
    device = pick_device(job.get("device", "auto"))
    backbone = load_backbone(backbone_path)
    backbone.drop_seg_head()
    backbone_fp = fingerprint(backbone)
    if job["data"]:
        folder = reader.PairedFolder(job["data"])
        data_fingerprint = params_hash(folder.fingerprint)
    else:
        index = reader.load_index(shards)
        data_fingerprint = index["params_hash"]
    inputs_hash = params_hash({"job": {k: v for k, v in job.items() if k not in RUNTIME_KNOBS},
                               "backbone": backbone_fp, "data": data_fingerprint})
    out = adapter_path(out_dir, name)
    if out.exists() and not force:
        try:
            if read_adapter_metadata(out).get("inputs_hash") == inputs_hash:
                log.info("adapter %s: up to date (%s), not retrained", name, out)
                return {"name": name, "skipped": True, "path": str(out), "inputs_hash": inputs_hash}
        except Exception:  # noqa: BLE001 - an unreadable old file is simply replaced
            pass

    loop.seed_everything(job["seed"])
    bank = AdapterBank(backbone, kind=job["kind"], targets=job["targets"], rank=job["rank"], alpha=job["alpha"],
                       hidden=job.get("hidden", 8))
    bank.add(name)
    bank.freeze_backbone()
    backbone.to(device)
    parameters = bank.parameters_of(name)

    if job["data"]:
        held_out = set(folder.names[::10]) if len(folder) >= 10 else set()
        train_folder = copy.copy(folder)
        train_folder.names = [n for n in folder.names if n not in held_out]
        stream = reader.PairedStream(train_folder, PairedPatch(job["patch"]), seed=job["seed"])
    else:
        stream = reader.ShardStream(reader.shard_urls(shards, "train", index),
                                  SyntheticPatch(name, job["patch"], tuple(job["severity"])), seed=job["seed"])
    loader = reader.SegmentedLoader(stream, job["batch"], segment_steps=max(job["steps"], 1), workers=job.get("workers", 0))

    from tasks.core import tracking

    with tracking.start_run(f"adapter {name}", parent_run_id=parent_run_id,
                            tags={"abair.stage": "adapters", "abair.adapter": name, "abair.inputs_hash": inputs_hash}) as run:
        run.log_params({**job, "backbone_fingerprint": backbone_fp, "trainable_parameters": sum(p.numel() for p in parameters)})
        steplog = loop.StepLog(Path(reports) / f"{name}.tsv", ["loss", "lr", "img_per_s"], run)
        ones = torch.ones(job["batch"], 1)

        def loss_fn(batch):
            degraded, clean = (t.to(device, non_blocking=True) for t in batch)
            with bank.weights(ones[: degraded.shape[0]]):
                restored = backbone(degraded)
            return loop.restoration_loss(restored.float(), clean, job.get("loss", "l1")), {}

        backbone.train()
        losses = loop.fit(loss_fn, parameters, job, loader.batches(0, job["steps"]), job["steps"], device,
                              steplog, desc=f"adapter {name}", progress=progress)
        backbone.eval()
        if fingerprint(backbone) != backbone_fp:
            raise AbairError(backbone_path, f"the backbone changed while training adapter {name} (it must stay frozen)")
        pairs = validation_pairs(job, name, shards, index if not job["data"] else None)
        val = {}
        if pairs:
            val = {"val_psnr_input": float(np.mean([float(psnr(reader.to_tensor(d)[None], reader.to_tensor(c)[None])) for d, c in pairs])),
                   "val_psnr_backbone": psnr_on(backbone, bank, None, pairs, device),
                   "val_psnr_adapter": psnr_on(backbone, bank, name, pairs, device)}
        metadata = {"inputs_hash": inputs_hash, "data": job["data"] or f"synthetic:{name}",
                    "severity": json.dumps(job["severity"]), "steps": str(job["steps"]),
                    **{k: f"{v:.4f}" for k, v in val.items()}}
        bank.save(name, out, degradation=name, extra_metadata=metadata)
        curves = loop.plot_curves(steplog.read(), ["loss", "lr"], Path(reports) / f"{name}_curves.png",
                                      f"Phase II adapter: {name} ({job['kind']}, rank {job['rank']})")
        run.log_metrics({"final_loss": float(np.mean(losses[-10:])), **val}, job["steps"])
        run.log_artifact(out)
        run.log_artifact(curves)
    log.info("adapter %s: %d steps, loss %.4f; val PSNR input %.2f, backbone %.2f, adapter %.2f dB -> %s", name,
             job["steps"], float(np.mean(losses[-10:])), val.get("val_psnr_input", float("nan")),
             val.get("val_psnr_backbone", float("nan")), val.get("val_psnr_adapter", float("nan")), out)
    return {"name": name, "skipped": False, "path": str(out), "inputs_hash": inputs_hash, "losses": losses, **val}


def prune_adapters(cfg: dict, out_dir: str | Path) -> list[str]:
    """Delete adapter files for degradations no longer listed in params."""
    removed = []
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        if path.stem not in cfg["degradations"]:
            path.unlink()
            removed.append(path.stem)
    return removed
