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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import degradations
from degradations import composite

from tasks.core import imageio, paths
from tasks.data import reader

from tasks.train import loop
from tasks.train.logs import StepLog, plot_curves
from tasks.core.device import pick_device
from tasks.core.errors import AbairError
from tasks.core.metrics import psnr
from tasks.core.params import params_hash

log = logging.getLogger(__name__)

# Per-adapter knobs (overridable per degradation under `per_degradation`).
JOB_KNOBS = ("steps", "batch", "patch", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "severity",
             "loss", "seed", "data", "val_samples", "p_clean")
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


def synthetic_options(index: dict | None, name: str) -> dict:
    """The options the shard set's generator gave `name` (e.g. the noise models it mixes)."""
    return dict(((index or {}).get("generator") or {}).get("options", {}).get(name, {}))


class SyntheticPatch:
    """Clean shard crop -> random patch -> one degradation at a random severity; or, with
    probability `p_clean`, the clean patch (half of them grey) as both input and target."""

    def __init__(self, name: str, patch: int, severity: tuple[float, float], options: dict | None = None,
                 p_clean: float = 0.0):
        degradations.get(name)  # an unknown name fails here, not in a data worker
        self.name, self.patch, self.severity, self.options, self.p_clean = name, patch, severity, options or {}, p_clean

    def __call__(self, sample: dict, rng: np.random.Generator):
        (clean,) = reader.random_patch([sample["clean"]], self.patch, rng)
        clean = clean.astype(np.float32) / 255.0
        if self.p_clean and rng.random() < self.p_clean:
            clean = imageio.to_grey_rgb(clean) if rng.random() < 0.5 else clean
            return reader.to_tensor(clean), reader.to_tensor(clean)
        degraded, _ = composite.draw(clean, rng, self.name, self.severity, self.options)
        return reader.to_tensor(degraded), reader.to_tensor(clean)


class PairedPatch:
    """A random patch of a pair; or, with probability `p_clean`, its target as input and target."""

    def __init__(self, patch: int, p_clean: float = 0.0):
        self.patch, self.p_clean = patch, p_clean

    def __call__(self, sample: dict, rng: np.random.Generator):
        degraded, clean = reader.random_patch([sample["degraded"], sample["clean"]], self.patch, rng)
        if self.p_clean and rng.random() < self.p_clean:
            degraded = clean
        return reader.to_tensor(degraded), reader.to_tensor(clean)


def validation_pairs(job: dict, name: str, shards: str, index: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out (degraded, clean) float pairs: the val split's clean crops degraded with fixed
    seeds, or the held-out pairs of its paired data (which are not trained on)."""
    count = job.get("val_samples", 16)
    if job["data"]:
        folder = reader.open_paired(job["data"], "val", where=f"params.yaml adapters.data.{name}")
        names = folder.names[:count]
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
        degraded, _ = module.apply(clean, rng, float(lo + (hi - lo) * (i + 0.5) / count), **synthetic_options(index, name))
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


@dataclass
class TrainingData:
    """What an adapter learns from: the training side of its paired data, the shard set's clean
    crops degraded on the fly, or both (a paired-data `share` under 1)."""

    folder: reader.PairedFolder | None
    index: dict | None
    share: float = 1.0

    @classmethod
    def of(cls, job: dict, shards: str, name: str) -> "TrainingData":
        if not job["data"]:
            return cls(None, reader.load_index(shards))
        where = f"params.yaml adapters.data.{name}"
        spec = reader.paired_spec(job["data"], where)
        folder = reader.open_paired(spec, "train", check=True, where=where)
        if spec["share"] < 1.0:
            return cls(folder, reader.load_index(shards), spec["share"])
        return cls(folder, None)

    @property
    def fingerprint(self) -> str:
        parts = []
        if self.folder is not None:
            parts.append(params_hash(self.folder.fingerprint))
        if self.index is not None:
            parts.append(self.index["params_hash"])
        return parts[0] if len(parts) == 1 else params_hash(parts + [self.share])


def up_to_date(out: Path, inputs_hash: str) -> bool:
    """The adapter file exists and was trained from these inputs."""
    from models.adapters import read_adapter_metadata

    if not out.exists():
        return False
    try:
        return read_adapter_metadata(out).get("inputs_hash") == inputs_hash
    except Exception:  # noqa: BLE001 - an unreadable old file is simply replaced
        return False


def train_adapter(cfg: dict, name: str, backbone_path: str = paths.BACKBONE,
                  shards: str = paths.SHARDS, out_dir: str = paths.ADAPTERS,
                  reports: str = paths.ADAPTER_REPORTS, parent_run_id: str | None = None,
                  force: bool = False, progress: bool = True) -> dict:
    """Train (or skip, when up to date) the adapter for one degradation; returns its summary."""
    from models.adapters import AdapterBank, AdapterOptions, load_kind_modules
    from models.identity import fingerprint, load_backbone

    job = job_config(cfg, name)
    if name not in degradations.names() and not job["data"]:
        # A user's own degradation needs its paired folder; library names can be synthesised.
        raise AbairError("params.yaml adapters.degradations", f"unknown degradation {name!r} and no paired folder "
                         f"for it in adapters.data; known: {degradations.names()}")
    device = pick_device(job.get("device", "auto"))
    backbone = load_backbone(backbone_path)
    backbone.drop_seg_head()
    backbone_fp = fingerprint(backbone)
    data = TrainingData.of(job, shards, name)
    inputs_hash = params_hash({"job": {k: v for k, v in job.items() if k not in RUNTIME_KNOBS},
                               "backbone": backbone_fp, "data": data.fingerprint})
    out = adapter_path(out_dir, name)
    if not force and up_to_date(out, inputs_hash):
        log.info("adapter %s: up to date (%s), not retrained", name, out)
        return {"name": name, "skipped": True, "path": str(out), "inputs_hash": inputs_hash}

    loop.seed_everything(job["seed"])
    load_kind_modules(cfg.get("kind_modules") or ())
    bank = AdapterBank(backbone, job["kind"], AdapterOptions.from_params(job))
    bank.add(name)
    bank.freeze_backbone()
    backbone.to(device)
    parameters = bank.parameters_of(name)
    loader = train_loader(job, name, shards, data)

    from tasks.core import tracking

    with tracking.start_run(f"adapter {name}", parent_run_id=parent_run_id,
                            tags={"abair.stage": "adapters", "abair.adapter": name, "abair.inputs_hash": inputs_hash}) as run:
        run.log_params({**job, "backbone_fingerprint": backbone_fp, "trainable_parameters": sum(p.numel() for p in parameters)})
        steplog = StepLog(Path(reports) / f"{name}.tsv", ["loss", "lr", "img_per_s"], run)
        backbone.train()
        losses = loop.fit(loop.Training(parameters, job, device), adapter_loss(backbone, bank, job, device),
                          loader.batches(0, job["steps"]), job, job["steps"], device, steplog=steplog,
                          desc=f"adapter {name}", progress=progress)
        backbone.eval()
        if fingerprint(backbone) != backbone_fp:
            raise AbairError(backbone_path, f"the backbone changed while training adapter {name} (it must stay frozen)")
        val = validate_adapter(backbone, bank, name, validation_pairs(job, name, shards, data.index), device)
        bank.save(name, out, degradation=name, extra_metadata=adapter_metadata(job, name, inputs_hash, val))
        curves = plot_curves(steplog.read(), ["loss", "lr"], Path(reports) / f"{name}_curves.png",
                             f"Phase II adapter: {name} ({job['kind']}, rank {job['rank']})")
        run.log_metrics({"final_loss": float(np.mean(losses[-10:])), **val}, job["steps"])
        run.log_artifact(out)
        run.log_artifact(curves)
    log.info("adapter %s: %d steps, loss %.4f; val PSNR input %.2f, backbone %.2f, adapter %.2f dB -> %s", name,
             job["steps"], float(np.mean(losses[-10:])), val.get("val_psnr_input", float("nan")),
             val.get("val_psnr_backbone", float("nan")), val.get("val_psnr_adapter", float("nan")), out)
    return {"name": name, "skipped": False, "path": str(out), "inputs_hash": inputs_hash, "losses": losses, **val}


def train_loader(job: dict, name: str, shards: str, data: TrainingData) -> reader.SegmentedLoader:
    """The job's patches: from the training side of its paired data, synthetic ones, or both
    (a share of each)."""
    streams, shares = [], []
    if data.folder is not None:
        streams.append(reader.PairedStream(data.folder, PairedPatch(job["patch"], job.get("p_clean", 0.0)), seed=job["seed"]))
        shares.append(data.share)
    if data.index is not None:
        streams.append(reader.ShardStream(reader.shard_urls(shards, "train", data.index),
                                          SyntheticPatch(name, job["patch"], tuple(job["severity"]),
                                                         synthetic_options(data.index, name), job.get("p_clean", 0.0)),
                                          seed=job["seed"]))
        shares.append(1.0 - data.share if data.folder is not None else 1.0)
    stream = streams[0] if len(streams) == 1 else reader.MixedStream(streams, shares, seed=job["seed"])
    return reader.SegmentedLoader(stream, job["batch"], segment_steps=max(job["steps"], 1), workers=job.get("workers", 0))


def adapter_loss(backbone, bank, job: dict, device: torch.device):
    """The loop's loss: the backbone with this job's adapter at full weight, against the clean patch."""
    ones = torch.ones(job["batch"], 1)

    def loss_fn(batch):
        degraded, clean = (t.to(device, non_blocking=True) for t in batch)
        with bank.weights(ones[: degraded.shape[0]]):
            restored = backbone(degraded)
        return loop.restoration_loss(restored.float(), clean, job.get("loss", "l1")), {}

    return loss_fn


def validate_adapter(backbone, bank, name: str, pairs, device: torch.device) -> dict:
    """Held-out PSNR of the input, of the backbone alone and with the adapter ({} without pairs)."""
    if not pairs:
        return {}
    return {"val_psnr_input": float(np.mean([float(psnr(reader.to_tensor(d)[None], reader.to_tensor(c)[None])) for d, c in pairs])),
            "val_psnr_backbone": psnr_on(backbone, bank, None, pairs, device),
            "val_psnr_adapter": psnr_on(backbone, bank, name, pairs, device)}


def adapter_metadata(job: dict, name: str, inputs_hash: str, val: dict) -> dict:
    """What the adapter file records beyond the bank's own: its inputs, data, severity, steps, scores."""
    data = job["data"]
    return {"inputs_hash": inputs_hash,
            "data": (json.dumps(data, sort_keys=True) if isinstance(data, dict) else data) if data else f"synthetic:{name}",
            "severity": json.dumps(job["severity"]), "steps": str(job["steps"]),
            **{k: f"{v:.4f}" for k, v in val.items()}}


def prune_adapters(cfg: dict, out_dir: str | Path) -> list[str]:
    """Delete adapter files for degradations no longer listed in params."""
    removed = []
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        if path.stem not in cfg["degradations"]:
            path.unlink()
            removed.append(path.stem)
    return removed
