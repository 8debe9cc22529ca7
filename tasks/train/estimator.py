"""Phase III (`estimator`): a light network that looks at the input and weights the adapters.

Targets: one-hot for single-degradation samples (synthetic from the shard set's clean crops, or
the adapter's own paired folder) and area fractions for composite samples (the share of pixels
each adapter's degradation covers). Optional second step ("SW"): tune the estimator through the
blended restoration loss, backbone and adapters frozen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

import degradations
from degradations import composite
import torch.nn.functional as F

from tasks.core import paths
from tasks.data import reader

from tasks.train import loop
from tasks.train.logs import StepLog, plot_curves
from tasks.core.device import pick_device
from tasks.core.errors import AbairError
from tasks.core.params import params_hash
from tasks.core.storage import atomic_path
from tasks.core.components import adapter_files, file_sha256, load_bank

log = logging.getLogger(__name__)

RUNTIME_KNOBS = ("device", "workers", "log_every")


def adapter_sources(files: list[Path]) -> list[dict]:
    """name, data (paired folder or None) and synthetic severity range of every adapter file."""
    from models.adapters import read_adapter_metadata

    sources = []
    for path in files:
        meta = read_adapter_metadata(path)
        data_source = meta.get("data", "")
        sources.append({"name": meta["degradation"], "data": None if data_source.startswith("synthetic:") or not data_source else data_source,
                        "severity": json.loads(meta.get("severity", "[0.2, 1.0]")), "sha256": file_sha256(path)})
    return sources


class EstimatorSample:
    """Shard sample -> (degraded, clean, target weights over the adapters)."""

    def __init__(self, sources: list[dict], shard_classes: list[str], p_single: float, crop: int):
        self.sources, self.p_single, self.crop = sources, p_single, crop
        self.names = [s["name"] for s in sources]
        # bit i of the shard mask -> adapter column (or -1 when no adapter handles that class)
        self.column_of_bit = [self.names.index(c) if c in self.names else -1 for c in shard_classes]
        self._folders: dict[str, reader.PairedFolder] = {}
        self._pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _paired(self, source: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        folder = self._folders.get(source["name"])
        if folder is None:
            folder = self._folders[source["name"]] = reader.PairedFolder(source["data"], check=False)
        pair_name = folder.names[int(rng.integers(0, len(folder)))]
        key = (source["name"], pair_name)
        if key not in self._pairs:
            self._pairs[key] = folder.load(pair_name)
        degraded, clean = reader.random_patch(list(self._pairs[key]), self.crop, rng)
        return degraded.astype(np.float32) / 255.0, clean.astype(np.float32) / 255.0

    def __call__(self, sample: dict, rng: np.random.Generator):
        target = np.zeros(len(self.names), np.float32)
        if rng.random() < self.p_single:
            k = int(rng.integers(0, len(self.names)))
            source = self.sources[k]
            if source["data"]:
                degraded, clean = self._paired(source, rng)
            else:
                clean = sample["clean"].astype(np.float32) / 255.0
                degraded, _ = composite.draw(clean, rng, source["name"], tuple(source["severity"]))
            target[k] = 1.0
        else:
            mask = sample["mask"]
            for bit, column in enumerate(self.column_of_bit):
                if column >= 0:
                    target[column] += float(((mask >> bit) & 1).mean())
            if target.sum() == 0:
                return None  # clean, or only degradations no adapter handles
            target /= target.sum()
            degraded, clean = sample["degraded"], sample["clean"]
        return reader.to_tensor(degraded), reader.to_tensor(clean), torch.from_numpy(target)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


@torch.no_grad()
def single_degradation_accuracy(estimator, sources: list[dict], shards: str, index: dict, seed: int,
                                per_class: int, device) -> dict:
    """Argmax accuracy and confusion matrix on held-out single-degradation samples."""
    names = [s["name"] for s in sources]
    confusion = np.zeros((len(names), len(names)), np.int64)
    cleans = [sample["clean"].astype(np.float32) / 255.0 for sample, _ in
              zip(reader.read_split(reader.shard_urls(shards, "val", index)), range(per_class))]
    estimator.eval()
    for k, source in enumerate(sources):
        if source["data"]:
            folder = reader.PairedFolder(source["data"], check=False)
            held_out = folder.names[::10][:per_class]
            crop = index["crop_size"]
            inputs = [folder.load(n)[0][:crop, :crop].astype(np.float32) / 255.0 for n in held_out]
        else:
            lo, hi = source["severity"]
            inputs = [degradations.get(source["name"]).apply(c, np.random.default_rng([seed, 104729, k, i]),
                                                             lo + (hi - lo) * (i + 0.5) / len(cleans))[0]
                      for i, c in enumerate(cleans)]
        if not inputs:
            continue
        batch = torch.stack([reader.to_tensor(x) for x in inputs]).to(device)
        predicted = estimator(batch).argmax(1).cpu().numpy()
        for p in predicted:
            confusion[k, p] += 1
    total = confusion.sum()
    return {"accuracy": float(np.trace(confusion) / max(total, 1)), "confusion": confusion.tolist(), "names": names}


def train_estimator(cfg: dict, backbone_path: str = paths.BACKBONE,
                    adapters_dir: str = paths.ADAPTERS, shards: str = paths.SHARDS,
                    out: str = paths.ESTIMATOR, reports: str = paths.TRAINING_REPORTS,
                    progress: bool = True, init: str | None = None) -> dict:
    """Train the degradation estimator; `cfg` is the `estimator` params section.

    init: an estimator checkpoint to fine-tune instead of starting fresh (adding a degradation:
    the current estimator grown by one output). Its class names must be the adapters' names; its
    output order is kept, and its architecture wins over cfg's width/crops/sizes.
    """
    from models.estimator import Estimator, save_estimator

    device = pick_device(cfg.get("device", "auto"))
    index = reader.load_index(shards)
    files = adapter_files(adapters_dir)
    sources, start = starting_point(adapter_sources(files), init, adapters_dir)
    names = [s["name"] for s in sources]
    inputs_hash = params_hash({"params": {k: v for k, v in cfg.items() if k not in RUNTIME_KNOBS},
                               "adapters": [s["sha256"] for s in sources], "shards": index["params_hash"],
                               **({"init": file_sha256(init)} if init is not None else {})})
    loop.seed_everything(cfg["seed"])
    if start is not None:
        estimator = start.to(device)
    else:
        estimator = Estimator(len(names), width=cfg["width"], crops=cfg["crops"], crop_size=cfg["crop_size"],
                              view_size=cfg["view_size"], random_crops=True, class_names=names).to(device)
    stream = reader.ShardStream(reader.shard_urls(shards, "train", index),
                                EstimatorSample(sources, index["classes"], cfg["p_single"], index["crop_size"]),
                                seed=cfg["seed"], shuffle_buffer=cfg.get("shuffle_buffer", 256))
    loader = reader.SegmentedLoader(stream, cfg["batch"], segment_steps=max(cfg["steps"], 1), workers=cfg.get("workers", 0))

    from tasks.core import tracking

    with tracking.start_run("estimator", tags={"abair.stage": "estimator", "abair.inputs_hash": inputs_hash}) as run:
        run.log_params({**cfg, "adapters": names})
        reports_dir = Path(reports)
        steplog = StepLog(reports_dir / "estimator.tsv", ["loss", "lr", "img_per_s"], run)
        estimator.train()
        losses = loop.fit(loop.Training(estimator.parameters(), cfg, device), classify_loss(estimator, device),
                          loader.batches(0, cfg["steps"]), cfg, cfg["steps"], device, steplog=steplog,
                          desc="estimator", progress=progress)
        summary = {"steps": cfg["steps"], "final_loss": float(np.mean(losses[-10:]))}
        sw_log = StepLog(reports_dir / "estimator_sw.tsv", ["loss", "lr", "img_per_s"], run)
        if int(cfg.get("sw_steps", 0)) > 0:
            summary["sw_final_loss"] = tune_blend(estimator, names, files, stream, cfg, backbone_path, device,
                                                  sw_log, progress)

        estimator.to("cpu")
        val = single_degradation_accuracy(estimator, sources, shards, index, cfg["seed"], cfg.get("val_samples", 16), "cpu")
        summary["val_accuracy"] = val["accuracy"]
        save_estimator(estimator, out, extra_metadata={"inputs_hash": inputs_hash, "adapters": names,
                                                       "adapter_sha256": [s["sha256"] for s in sources],
                                                       "val_accuracy": f"{val['accuracy']:.4f}", "temperature": str(cfg["temperature"])})
        write_reports(summary, val, names, reports_dir, steplog, run, out)
    log.info("estimator: %d outputs %s, val accuracy %.3f -> %s", len(names), names, val["accuracy"], out)
    return summary


def starting_point(sources: list[dict], init: str | None, adapters_dir: str):
    """(sources, estimator to fine-tune or None): with `init`, the sources in its output order."""
    if init is None:
        return sources, None
    from models.estimator import load_estimator

    start = load_estimator(init)
    order = start.class_names or []
    if sorted(order) != sorted(s["name"] for s in sources):
        raise AbairError(init, f"has outputs {order} but the adapters in {adapters_dir} are {[s['name'] for s in sources]}")
    return sorted(sources, key=lambda s: order.index(s["name"])), start


def classify_loss(estimator, device: torch.device):
    """The loop's loss for the first step: soft cross-entropy against the target weights."""

    def loss_fn(batch):
        degraded, _, target = (t.to(device) for t in batch)
        return soft_cross_entropy(estimator(degraded), target), {}

    return loss_fn


def tune_blend(estimator, names: list[str], files: list[Path], stream: reader.ShardStream, cfg: dict,
               backbone_path: str, device: torch.device, steplog: StepLog, progress: bool) -> float:
    """The SW step: tune the estimator through the restoration it blends (the estimator learns
    which blend restores best), backbone and adapters frozen. Returns the final loss."""
    from models.identity import fingerprint, load_backbone

    sw_steps = int(cfg["sw_steps"])
    backbone = load_backbone(backbone_path)
    backbone.drop_seg_head()
    bank = load_bank(backbone, files)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone_fp = fingerprint(backbone)
    backbone.to(device).eval()
    sw_cfg = {**cfg, "lr": cfg["sw_lr"], "warmup_steps": 0, "steps": sw_steps}
    sw_loader = reader.SegmentedLoader(stream, cfg["batch"], segment_steps=sw_steps, workers=cfg.get("workers", 0))
    stream.seed = cfg["seed"] + 1
    losses = loop.fit(loop.Training(estimator.parameters(), sw_cfg, device),
                      blended_loss(estimator, backbone, bank, names, cfg["temperature"], device),
                      sw_loader.batches(0, sw_steps), sw_cfg, sw_steps, device, steplog=steplog, desc="estimator sw",
                      progress=progress)
    if fingerprint(backbone) != backbone_fp:
        raise AbairError(backbone_path, "the backbone changed during the SW step (it must stay frozen)")
    return float(np.mean(losses[-10:]))


def blended_loss(estimator, backbone, bank, names: list[str], temperature: float, device: torch.device):
    """The loop's loss for the SW step: restoration loss of the blend the estimator's softmax picks."""
    columns = [bank.names.index(n) for n in names]

    def loss_fn(batch):
        degraded, clean, _ = (t.to(device) for t in batch)
        weights = torch.softmax(estimator(degraded).float() / temperature, dim=1)
        bank_weights = weights.new_zeros(weights.shape[0], len(bank))
        bank_weights[:, columns] = weights
        with bank.weights(bank_weights):
            restored = backbone(degraded)
        return loop.restoration_loss(restored.float(), clean), {}

    return loss_fn


def write_reports(summary: dict, val: dict, names: list[str], reports: Path, steplog: StepLog, run, out: str) -> None:
    """estimator.json (summary + confusion matrix), the loss curves, and both in the MLflow run."""
    reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(reports / "estimator.json") as tmp:
        tmp.write_text(json.dumps({**summary, "confusion": val["confusion"], "names": names}, indent=2))
    curves = plot_curves(steplog.read(), ["loss", "lr"], reports / "estimator_curves.png", "Phase III estimator")
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, summary["steps"])
    run.log_artifact(out)
    run.log_artifact(curves)
