"""Phase III (`estimator`): a light network that looks at the input and weights the adapters.

Targets: one-hot for single-degradation samples (synthetic from the shard set's clean crops, or
the adapter's own paired folder) and area fractions for composite samples (the share of pixels
each adapter's degradation covers). Optional second step ("SW"): tune the estimator through the
blended restoration loss, backbone and adapters frozen.

Do no harm (`do_no_harm`, ../shared/DESIGN.md "Modes"): the targets get a `base` column (the
backbone alone): all of it for clean and barely degraded samples (`p_clean`), and the clean share
of a composite sample's pixels. Then a last step (`keep_steps`) trains the keep head alone, with
everything else frozen, to maximise each sample's PSNR of the served blend
`keep * input + (1 - keep) * restored`, where `restored` is the system's SW output (`keep_loss`).
Keep should be high exactly where the restoration hurts (a clean photo, an adapter applied where it
does not belong, a degradation no adapter knows: `keep_extra`) and near zero where it helps.

Dense head (`dense`, the pixel-wise mode's weight map): each sample also carries a per-pixel target
map at the crop's resolution (target_map_from_mask: composite samples from the shard mask, uniform
over the handled degradations present at a pixel, `base` where none is; every other sample its
image-level target everywhere), and the first step's loss adds `dense_weight` x the per-pixel soft
cross-entropy at the map's resolution (dense_cross_entropy). The map is scored against the
validation shards' masks (dense_scores: per-class IoU and per-pixel accuracy, in estimator.json).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import degradations
from degradations import composite
import torch.nn.functional as F

from tasks.core import imageio, paths
from tasks.core.metrics import psnr
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
KEEP_MSE_FLOOR = 1e-4  # the keep step's PSNR cap: 40 dB (a clean image kept within 40 dB counts as kept)
HARM_MARGIN_DB = 0.1   # "made worse": more than this below the input (the evaluation's worse share)


def adapter_sources(files: list[Path]) -> list[dict]:
    """name, data (paired folder or None) and synthetic severity range of every adapter file."""
    from models.adapters import read_adapter_metadata

    sources = []
    for path in files:
        meta = read_adapter_metadata(path)
        data_source = meta.get("data", "")
        if data_source.startswith("{"):
            data_source = json.loads(data_source)  # the mapping form of paired data (reader.paired_spec)
        elif data_source.startswith("synthetic:"):
            data_source = None
        share = reader.paired_spec(data_source)["share"] if data_source else 1.0
        sources.append({"name": meta["degradation"], "data": data_source or None, "share": share,
                        "severity": json.loads(meta.get("severity", "[0.2, 1.0]")), "sha256": file_sha256(path)})
    return sources


class EstimatorSample:
    """Shard sample -> (degraded, clean, target weights over the adapters [and `base`]).

    With `base` (do no harm) a share `p_clean` of samples is the clean crop, left as it is or
    barely degraded by one adapter's degradation at severity up to `faint`, with all the target
    on `base`; composite samples put their clean pixels' share there. Barely degraded means within
    `faint_psnr` dB of the clean crop: a low severity is not a faint degradation for every kind
    (light rain at severity 0.05 is 27-29 dB off, visible streaks), and a faint draw above that
    line is replaced by the clean crop, as labelling visible rain `base` taught the estimator
    to leave real light rain alone."""

    def __init__(self, sources: list[dict], shard_classes: list[str], p_single: float, crop: int,
                 base: bool = False, p_clean: float = 0.0, faint: float = 0.1, options: dict | None = None,
                 p_gray: float = 0.0, extra: tuple[str, ...] = (), p_extra: float = 0.0, dense: bool = False,
                 faint_psnr: float | None = None):
        self.sources, self.p_single, self.crop = sources, p_single, crop
        self.options = options or {}
        # p_gray: synthetic samples drawn from a grey copy of the crop (grey photos are not haze);
        # extra: degradations no adapter handles (JPEG, ...), drawn in the keep step only, where
        # what matters is whether the network helps, not which adapter is right
        self.p_gray, self.extra, self.p_extra = p_gray, tuple(extra), p_extra
        self.base, self.p_clean, self.faint, self.faint_psnr = base, p_clean, faint, faint_psnr
        # dense: items get a fourth member, the per-pixel target map (C x H x W, C = K [+ base])
        self.dense = dense
        self.names = [s["name"] for s in sources]
        self.column_of_bit = mask_columns(shard_classes, self.names)
        self._folders: dict[str, reader.PairedFolder] = {}
        self._pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _paired(self, source: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        folder = self._folders.get(source["name"])
        if folder is None:
            folder = self._folders[source["name"]] = reader.open_paired(source["data"], "train")
        pair_name = folder.names[int(rng.integers(0, len(folder)))]
        key = (source["name"], pair_name)
        if key not in self._pairs:
            self._pairs[key] = folder.load(pair_name)
        degraded, clean = reader.random_patch(list(self._pairs[key]), self.crop, rng)
        return degraded.astype(np.float32) / 255.0, clean.astype(np.float32) / 255.0

    def _clean(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        clean = sample["clean"].astype(np.float32) / 255.0
        if self.p_gray and rng.random() < self.p_gray:
            clean = imageio.to_grey_rgb(clean)
        return clean

    def _item(self, degraded: np.ndarray, clean: np.ndarray, target: np.ndarray, pixels: np.ndarray | None = None):
        """(degraded, clean, target[, target map]): the map is `pixels` or, when None, the
        image-level target at every pixel."""
        item = (reader.to_tensor(degraded), reader.to_tensor(clean), torch.from_numpy(target))
        if not self.dense:
            return item
        if pixels is None:
            pixels = np.broadcast_to(target[:, None, None], (len(target), *degraded.shape[:2]))
        return (*item, torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))

    def __call__(self, sample: dict, rng: np.random.Generator):
        target = np.zeros(len(self.names) + int(self.base), np.float32)
        if self.extra and rng.random() < self.p_extra:
            clean = self._clean(sample, rng)
            name = self.extra[int(rng.integers(0, len(self.extra)))]
            degraded, _ = composite.draw(clean, rng, name, (0.2, 1.0))
            target[-1] = 1.0
            return self._item(degraded, clean, target)
        if self.base and rng.random() < self.p_clean:
            clean = self._clean(sample, rng)
            degraded = clean
            if rng.random() < 0.5:
                name = self.names[int(rng.integers(0, len(self.names)))]
                degraded, _ = composite.draw(clean, rng, name, (0.0, self.faint), self.options.get(name))
                if self.faint_psnr is not None and float(psnr(reader.to_tensor(degraded)[None],
                                                              reader.to_tensor(clean)[None])[0]) < self.faint_psnr:
                    degraded = clean
            target[-1] = 1.0
            return self._item(degraded, clean, target)
        if rng.random() < self.p_single:
            k = int(rng.integers(0, len(self.names)))
            source = self.sources[k]
            if source["data"] and (source["share"] >= 1.0 or rng.random() < source["share"]):
                degraded, clean = self._paired(source, rng)
            else:
                clean = self._clean(sample, rng)
                degraded, _ = composite.draw(clean, rng, source["name"], tuple(source["severity"]),
                                             self.options.get(source["name"]))
            target[k] = 1.0
        else:
            mask = sample["mask"]
            for bit, column in enumerate(self.column_of_bit):
                if column >= 0:
                    target[column] += float(((mask >> bit) & 1).mean())
            if self.base:
                handled = [bit for bit, column in enumerate(self.column_of_bit) if column >= 0]
                touched = np.zeros(mask.shape, bool)
                for bit in handled:
                    touched |= ((mask >> bit) & 1).astype(bool)
                target[-1] = float((~touched).mean())
            if target.sum() == 0:
                return None  # clean, or only degradations no adapter handles
            target /= target.sum()
            pixels = target_map_from_mask(mask, self.column_of_bit, len(self.names), self.base) if self.dense else None
            return self._item(sample["degraded"], sample["clean"], target, pixels)
        return self._item(degraded, clean, target)


def mask_columns(shard_classes: list[str], names: list[str]) -> list[int]:
    """Bit i of a shard mask -> the adapter column of `shard_classes[i]` (-1 when no adapter handles it)."""
    return [names.index(c) if c in names else -1 for c in shard_classes]


def mask_membership(mask: np.ndarray, column_of_bit: list[int], adapters: int, base: bool) -> np.ndarray:
    """C x H x W bool (C = adapters [+ 1]): pixel p belongs to column k when the mask has a bit set
    at p whose class that adapter handles; to `base` (the last column) when it has none."""
    mask = mask if mask.ndim == 2 else mask[..., 0]
    member = np.zeros((adapters + int(base), *mask.shape), bool)
    for bit, column in enumerate(column_of_bit):
        if column >= 0:
            member[column] |= ((mask >> bit) & 1).astype(bool)
    if base:
        member[-1] = ~member[:adapters].any(axis=0)
    return member


def target_map_from_mask(mask: np.ndarray, column_of_bit: list[int], adapters: int, base: bool) -> np.ndarray:
    """C x H x W float32 per-pixel targets from a shard mask: uniform over the handled degradations
    present at each pixel, all `base` where none is; without `base` such pixels are all zero (the
    dense loss ignores them)."""
    member = mask_membership(mask, column_of_bit, adapters, base).astype(np.float32)
    count = member.sum(axis=0, keepdims=True)
    return member / np.maximum(count, 1.0)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def dense_cross_entropy(pixel_logits: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """Per-pixel soft cross-entropy at the logits' resolution (B x C x h x w), the target maps
    (B x C x H x W) area-averaged to it. A cell whose targets sum to s < 1 (partly or wholly made of
    ignored pixels: no handled degradation, no `base` column) weighs s, its targets renormalised."""
    target = F.adaptive_avg_pool2d(target_map.float(), pixel_logits.shape[-2:])
    covered = target.sum(1)
    per_cell = -(target * F.log_softmax(pixel_logits.float(), dim=1)).sum(1)   # = covered x CE of the renormalised target
    return per_cell.sum() / covered.sum().clamp_min(1e-6)


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
            folder = reader.open_paired(source["data"], "val")
            held_out = folder.names[:per_class]
            crop = index["crop_size"]
            inputs = [folder.load(n)[0][:crop, :crop].astype(np.float32) / 255.0 for n in held_out]
        else:
            lo, hi = source["severity"]
            options = ((index.get("generator") or {}).get("options") or {}).get(source["name"], {})
            inputs = [degradations.get(source["name"]).apply(c, np.random.default_rng([seed, 104729, k, i]),
                                                             lo + (hi - lo) * (i + 0.5) / len(cleans), **options)[0]
                      for i, c in enumerate(cleans)]
        if not inputs:
            continue
        batch = torch.stack([reader.to_tensor(x) for x in inputs]).to(device)
        predicted = estimator(batch).argmax(1).cpu().numpy()
        for p in predicted:
            confusion[k, p] += 1
    total = confusion.sum()
    result = {"accuracy": float(np.trace(confusion) / max(total, 1)), "confusion": confusion.tolist(), "names": names}
    if estimator.base is not None and cleans:
        # held-out clean crops: how often the backbone alone wins
        weights = estimator.weights(torch.stack([reader.to_tensor(c) for c in cleans]).to(device))
        result["clean_base_share"] = float((weights[:, :len(names)].sum(1) < 0.5).float().mean())
    return result


def predicted_columns(weight_map: torch.Tensor, height: int, width: int, base: bool) -> torch.Tensor:
    """B x H x W: each pixel's highest-weight column of a B x (K+1) x h x w weight map (adapter
    columns, then keep) resized to H x W as the Restorer resizes it (bilinear); with `base`, column K
    is the backbone alone (1 - the adapters' sum), which wins where no adapter outweighs it."""
    adapters = weight_map[:, :-1].float()
    adapters = F.interpolate(adapters, size=(height, width), mode="bilinear", align_corners=False)
    if base:
        adapters = torch.cat([adapters, 1.0 - adapters.sum(1, keepdim=True)], dim=1)
    return adapters.argmax(dim=1)


def segmentation_counts(predicted: np.ndarray, member: np.ndarray) -> dict:
    """One image's counts: per column, the intersection and the union of the pixels predicted as it
    (`predicted`, H x W column indices) and those belonging to it (`member`, C x H x W bool, see
    mask_membership); `right`: pixels whose predicted column is one they belong to, of `scored`:
    the pixels that belong to some column (without `base`, pixels no adapter handles are left out
    of every count, as they are of the loss)."""
    scored = member.any(axis=0)
    chosen = (predicted[None] == np.arange(member.shape[0])[:, None, None]) & scored[None]
    right = np.take_along_axis(member, predicted[None], axis=0)[0] & scored
    return {"intersection": (chosen & member).sum(axis=(1, 2)), "union": (chosen | member).sum(axis=(1, 2)),
            "right": int(right.sum()), "scored": int(scored.sum())}


def segmentation_scores(counts: list[dict], columns: list[str]) -> dict:
    """Per-column IoU over all the images' pixels together (None for a column no pixel was
    predicted as or belongs to), their mean over the columns that have one, and the per-pixel
    accuracy. A pixel with several degradations belongs to each of them: predicting any one is
    right for the accuracy, and it stays in the others' unions, so IoU of 1 needs single-label truth."""
    intersection = sum(c["intersection"] for c in counts)
    union = sum(c["union"] for c in counts)
    iou = {name: (float(i / u) if u > 0 else None) for name, i, u in zip(columns, intersection, union)}
    present = [v for v in iou.values() if v is not None]
    scored = sum(c["scored"] for c in counts)
    return {"iou": iou, "mean_iou": float(np.mean(present)) if present else None,
            "pixel_accuracy": float(sum(c["right"] for c in counts) / scored) if scored else None,
            "pixels": int(scored)}


@torch.no_grad()
def dense_scores(estimator, shards: str, index: dict, names: list[str], device, limit: int = 512,
                 batch: int = 16) -> dict:
    """The dense map's argmax against the masks of the validation shards (up to `limit` samples,
    every kind: clean, single and composite): segmentation_scores over the adapters [and `base`],
    and the pixel accuracy of each kind of sample apart (`by_kind`: on a single-degradation or clean
    sample the right map is one column everywhere, on a composite one it follows the regions)."""
    base = estimator.base is not None
    column_of_bit = mask_columns(index["classes"], names)
    samples = [s for s, _ in zip(reader.read_split(reader.shard_urls(shards, "val", index)), range(limit))]
    estimator.eval()
    counts, kinds = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        images = torch.stack([reader.to_tensor(s["degraded"]) for s in chunk]).to(device)
        predicted = predicted_columns(estimator.weight_map(images), *images.shape[-2:], base).cpu().numpy()
        counts += [segmentation_counts(p, mask_membership(s["mask"], column_of_bit, len(names), base))
                   for p, s in zip(predicted, chunk)]
        kinds += [str(s["meta"].get("kind", "unknown")) for s in chunk]
    columns = names + (["base"] if base else [])
    by_kind = {kind: segmentation_scores([c for c, k in zip(counts, kinds) if k == kind], columns)["pixel_accuracy"]
               for kind in sorted(set(kinds))}
    return {**segmentation_scores(counts, columns), "by_kind": by_kind, "samples": len(samples)}


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

    check_keep_target(bool(cfg.get("tone_calibration")), bool(cfg.get("keep_sees_lock", False)))
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
        # architecture from the file; the temperature from cfg, as the keep step below trains with it
        estimator = start.to(device)
        estimator.config = dataclasses.replace(estimator.config, temperature=float(cfg["temperature"]))
    else:
        # `windowed`: photos are looked at in windows of the size the estimator trains on (the shard
        # crops; the keep head: the keep step's crops), the scale it learned (models/estimator.py)
        windowed = bool(cfg.get("windowed", False))
        estimator = Estimator(len(names), width=cfg["width"], crops=cfg["crops"], crop_size=cfg["crop_size"],
                              view_size=cfg["view_size"], random_crops=True, do_no_harm=bool(cfg.get("do_no_harm", False)),
                              dense=bool(cfg.get("dense", False)),
                              window=index["crop_size"] if windowed else None,
                              keep_window=(cfg.get("keep_crop") or index["crop_size"]) if windowed else None,
                              windows=int(cfg.get("windows", 9)), tone_lock=bool(cfg.get("tone_lock", False)),
                              tone_calibration=bool(cfg.get("tone_calibration", False)),
                              temperature=float(cfg["temperature"]), class_names=names).to(device)
    do_no_harm, dense = estimator.base is not None, estimator.has_dense
    dense_weight = float(cfg.get("dense_weight", 1.0)) if dense else 0.0
    stream = reader.ShardStream(reader.shard_urls(shards, "train", index),
                                EstimatorSample(sources, index["classes"], cfg["p_single"], index["crop_size"],
                                                base=do_no_harm, p_clean=cfg.get("p_clean", 0.0),
                                                faint=cfg.get("faint_severity", 0.1), faint_psnr=cfg.get("faint_psnr"),
                                                options=(index.get("generator") or {}).get("options"),
                                                p_gray=cfg.get("p_gray", 0.0), dense=dense),
                                seed=cfg["seed"], shuffle_buffer=cfg.get("shuffle_buffer", 256))
    loader = reader.SegmentedLoader(stream, cfg["batch"], segment_steps=max(cfg["steps"], 1), workers=cfg.get("workers", 0))

    from tasks.core import tracking

    with tracking.start_run("estimator", tags={"abair.stage": "estimator", "abair.inputs_hash": inputs_hash}) as run:
        run.log_params({**cfg, "adapters": names})
        reports_dir = Path(reports)
        steplog = StepLog(reports_dir / "estimator.tsv",
                          ["loss", "lr", "img_per_s", *(["image_loss", "dense_loss"] if dense else [])], run)
        estimator.train()
        losses = loop.fit(loop.Training(estimator.parameters(), cfg, device),
                          classify_loss(estimator, device, dense_weight),
                          loader.batches(0, cfg["steps"]), cfg, cfg["steps"], device, steplog=steplog,
                          desc="estimator", progress=progress)
        summary = {"steps": cfg["steps"], "final_loss": float(np.mean(losses[-10:]))}
        sw_log = StepLog(reports_dir / "estimator_sw.tsv", ["loss", "lr", "img_per_s"], run)
        if int(cfg.get("sw_steps", 0)) > 0:
            summary["sw_final_loss"] = tune_blend(estimator, names, files, stream, cfg, backbone_path, device,
                                                  sw_log, progress)
        if do_no_harm and int(cfg.get("keep_steps", 0)) > 0:
            keep_log = StepLog(reports_dir / "estimator_keep.tsv", ["loss", "lr", "img_per_s", "keep", "keep_target",
                                                                    *(["tone_share"] if estimator.config.tone_lock else [])], run)
            summary.update(tune_keep(estimator, names, files, stream, cfg, backbone_path, device, keep_log, progress))

        estimator.to("cpu")
        val = single_degradation_accuracy(estimator, sources, shards, index, cfg["seed"], cfg.get("val_samples", 16), "cpu")
        summary["val_accuracy"] = val["accuracy"]
        summary.update({k: val[k] for k in ("clean_base_share",) if k in val})
        if dense:
            summary["dense_val"] = dense_scores(estimator, shards, index, names, "cpu")
            log.info("dense map on %d validation samples: pixel accuracy %.3f, IoU %s", summary["dense_val"]["samples"],
                     summary["dense_val"]["pixel_accuracy"] or 0.0,
                     ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in summary["dense_val"]["iou"].items()))
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


def classify_loss(estimator, device: torch.device, dense_weight: float = 0.0):
    """The loop's loss for the first step: soft cross-entropy against the target weights, plus
    `dense_weight` x the dense map's per-pixel one when the batch carries target maps."""

    def loss_fn(batch):
        degraded, target = batch[0].to(device), batch[2].to(device)
        if not dense_weight or len(batch) < 4:
            return soft_cross_entropy(estimator.logits(degraded), target), {}
        image_logits, pixel_logits = estimator.logits_and_map(degraded)
        image_loss = soft_cross_entropy(image_logits, target)
        dense_loss = dense_cross_entropy(pixel_logits, batch[3].to(device))
        return image_loss + dense_weight * dense_loss, {"image_loss": float(image_loss.detach()),
                                                        "dense_loss": float(dense_loss.detach())}

    return loss_fn


def tune_blend(estimator, names: list[str], files: list[Path], stream: reader.ShardStream, cfg: dict,
               backbone_path: str, device: torch.device, steplog: StepLog, progress: bool) -> float:
    """The SW step: tune the estimator through the restoration it blends (the estimator learns
    which blend restores best), backbone and adapters frozen. Returns the final loss."""
    sw_steps = int(cfg["sw_steps"])
    backbone, bank, backbone_fp = frozen_system(backbone_path, files, device)
    sw_cfg = {**cfg, "lr": cfg["sw_lr"], "warmup_steps": 0, "steps": sw_steps}
    sw_loader = reader.SegmentedLoader(stream, cfg["batch"], segment_steps=sw_steps, workers=cfg.get("workers", 0))
    stream.seed = cfg["seed"] + 1
    losses = loop.fit(loop.Training(estimator.parameters(), sw_cfg, device),
                      blended_loss(estimator, backbone, bank, names, estimator.config.temperature, device),
                      sw_loader.batches(0, sw_steps), sw_cfg, sw_steps, device, steplog=steplog, desc="estimator sw",
                      progress=progress)
    check_frozen(backbone, backbone_fp, backbone_path, "SW")
    return float(np.mean(losses[-10:]))


def frozen_system(backbone_path: str, files: list[Path], device: torch.device):
    """(backbone, adapter bank, backbone fingerprint): the trained system, frozen, in eval mode."""
    from models.identity import fingerprint, load_backbone

    backbone = load_backbone(backbone_path)
    backbone.drop_seg_head()
    bank = load_bank(backbone, files)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.to(device).eval()
    return backbone, bank, fingerprint(backbone)


def check_frozen(backbone, backbone_fp: str, backbone_path: str, step: str) -> None:
    from models.identity import fingerprint

    if fingerprint(backbone) != backbone_fp:
        raise AbairError(backbone_path, f"the backbone changed during the {step} step (it must stay frozen)")


def tune_keep(estimator, names: list[str], files: list[Path], stream: reader.ShardStream, cfg: dict,
              backbone_path: str, device: torch.device, steplog: StepLog, progress: bool) -> dict:
    """The keep step, everything but the keep head (and the tone calibration, if any) frozen. The frozen
    system restores `keep_samples` samples once (keep_cache); the heads then train on that cache for
    `keep_steps` minibatch steps (cheap: no network runs), towards each sample's PSNR of what is
    served: the tone lock (when the system has one and `keep_sees_lock`) and then the keep blend
    (keep_loss). A share
    `keep_holdout` of the cache is held out and scored (keep_report)."""
    backbone, bank, backbone_fp = frozen_system(backbone_path, files, device)
    for p in estimator.parameters():
        p.requires_grad_(False)
    stream = copy.copy(stream)
    stream.transform = copy.copy(stream.transform)
    stream.transform.extra = tuple(cfg.get("keep_extra") or ())
    stream.transform.p_extra = float(cfg.get("p_keep_extra", 0.0))
    stream.transform.p_clean = float(cfg.get("keep_p_clean", stream.transform.p_clean))
    stream.transform.p_gray = float(cfg.get("keep_p_gray", stream.transform.p_gray))
    stream.transform.dense = False  # the keep head is image-level: no target maps to build
    stream.seed = cfg["seed"] + 2
    cache = keep_cache(estimator, backbone, bank, names, estimator.config.temperature, cfg.get("keep_crop"),
                       stream, int(cfg.get("keep_samples", 1024)), cfg["batch"], device, progress,
                       float(cfg.get("p_keep_misapplied", 0.0)), cfg["seed"])
    check_frozen(backbone, backbone_fp, backbone_path, "keep")
    held = max(1, int(round(len(cache.features) * float(cfg.get("keep_holdout", 0.2)))))
    order = torch.randperm(len(cache.features), generator=torch.Generator().manual_seed(cfg["seed"]))
    val, train = order[:held], order[held:]
    heads = KeepHeads.of(estimator, sees_lock=bool(cfg.get("keep_sees_lock", False)))
    params = heads.parameters()
    for p in params:
        p.requires_grad_(True)
    keep_steps, keep_batch = int(cfg["keep_steps"]), int(cfg.get("keep_batch", 64))
    keep_cfg = {**cfg, "lr": cfg.get("keep_lr", cfg["lr"]), "warmup_steps": 0, "steps": keep_steps, "grad_clip": 0}
    picks = torch.Generator().manual_seed(cfg["seed"] + 3)
    batches = ((step, train[torch.randint(0, len(train), (keep_batch,), generator=picks)]) for step in range(keep_steps))
    heads.to(device)
    loss_fn = keep_loss(heads, cache, harm_weight=float(cfg.get("keep_harm_weight", 0.0)))
    losses = loop.fit(loop.Training(params, keep_cfg, device), loss_fn, batches, keep_cfg, keep_steps, device,
                      steplog=steplog, desc="estimator keep", progress=progress)
    for p in estimator.parameters():
        p.requires_grad_(True)
    report = keep_report(heads, cache.subset(val))
    calibration = estimator.tone_calibration
    if calibration is not None:
        report["tone_calibration"] = {"scale": float(calibration.scale), "bias": float(calibration.bias)}
    log.info("keep step: held-out %d samples, PSNR input %.2f, network %.2f, served %.2f, best keep %.2f dB; "
             "served worse than input on %.0f%%%s%s", held, report["psnr_input"], report["psnr_network"],
             report["psnr_served"], report["psnr_best"], 100 * report["worse_share"],
             "" if report.get("tone_share_mean") is None else f"; mean tone share {report['tone_share_mean']:.2f}",
             "" if calibration is None else f"; tone calibration scale {float(calibration.scale):.2f} "
                                            f"bias {float(calibration.bias):.2f}")
    return {"keep_final_loss": float(np.mean(losses[-10:])), "keep_val": report}


def check_keep_target(calibrated: bool, sees_lock: bool) -> None:
    """A tone calibration learns from the locked result, so the keep loss must count the lock."""
    if calibrated and not sees_lock:
        raise AbairError("estimator", "tone_calibration is learned from the locked result: it needs keep_sees_lock")


class KeepHeads:
    """What the keep step trains: the keep head and, if there is one, the tone calibration of the
    rule's share (models/tone.py); without `tone_lock` there is no lock."""

    def __init__(self, keep_head: torch.nn.Module, tone_calibration: torch.nn.Module | None = None,
                 tone_lock: bool = False):
        self.keep_head, self.tone_calibration = keep_head, tone_calibration
        self.tone_lock = bool(tone_lock or tone_calibration is not None)

    @classmethod
    def of(cls, estimator, sees_lock: bool = True) -> "KeepHeads":
        """The estimator's heads; `sees_lock` False: the loss counts the network's unlocked output
        (estimator.keep_sees_lock), which a tone calibration cannot learn from."""
        check_keep_target(estimator.tone_calibration is not None, sees_lock)
        return cls(estimator.keep_head, estimator.tone_calibration, estimator.config.tone_lock and sees_lock)

    def parameters(self) -> list:
        calibration = self.tone_calibration.parameters() if self.tone_calibration is not None else ()
        return [*self.keep_head.parameters(), *calibration]

    def to(self, device):
        self.keep_head.to(device)
        if self.tone_calibration is not None:
            self.tone_calibration.to(device)
        return self

    def __call__(self, features: torch.Tensor, rule_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep B, tone share B or None) for cached features and the rule's shares."""
        keep = torch.sigmoid(self.keep_head(features).float())[:, 0]
        if not self.tone_lock:
            return keep, None
        share = rule_share.to(keep)
        return keep, (self.tone_calibration(share) if self.tone_calibration is not None else share)


@dataclass
class KeepCache:
    """The keep step's samples, restored once: `features` N x 2F (the input's and the network
    output's, what the heads read), `moments` N x 6 (keep_moments: the served error for any keep
    and tone share), `rule_share` N (the tone lock's share read off the weights, tone_free_share)."""
    features: torch.Tensor
    moments: torch.Tensor
    rule_share: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, rows: torch.Tensor) -> "KeepCache":
        return KeepCache(self.features[rows], self.moments[rows], self.rule_share[rows])


@torch.no_grad()
def keep_cache(estimator, backbone, bank, names: list[str], temperature: float, crop: int | None,
               stream: reader.ShardStream, samples: int, batch: int, device: torch.device, progress: bool,
               p_misapplied: float = 0.0, seed: int = 0) -> KeepCache:
    """What the keep step's heads see and what their loss needs (KeepCache) for `samples` samples
    of `stream` restored by the frozen system in SW mode. The restoration runs on each sample's
    central `crop`. A share `p_misapplied` is restored with one adapter drawn at random instead of
    the estimator's blend: what an adapter does to an image it was not made for, which the
    estimator's own (mostly right) choices on synthetic samples rarely show, and which keep must
    recognise."""
    from tqdm import tqdm

    from models.tone import lock_tone, tone_free_share

    columns = [bank.names.index(n) for n in names]
    draws = torch.Generator().manual_seed(seed + 4)
    estimator.eval()
    loader = reader.SegmentedLoader(stream, batch, segment_steps=10 ** 9)
    features, moments, shares = [], [], []
    steps = -(-samples // batch)
    for _, batch in tqdm(loader.batches(0, steps), total=steps, desc="estimator keep cache",
                         unit="batch", disable=not progress, leave=False):
        degraded, clean = batch[0].to(device).float(), batch[1].to(device).float()
        weights = estimator.weights(degraded, "sw", temperature)
        if p_misapplied > 0:
            misapplied = torch.rand(len(weights), generator=draws) < p_misapplied
            drawn = F.one_hot(torch.randint(0, len(names), (len(weights),), generator=draws), weights.shape[1])
            weights = torch.where(misapplied[:, None].to(weights.device), drawn.to(weights), weights)
        if crop:
            h, w = degraded.shape[-2:]
            y0, x0 = max(h - crop, 0) // 2, max(w - crop, 0) // 2
            degraded, clean = (t[:, :, y0:y0 + crop, x0:x0 + crop] for t in (degraded, clean))
        bank_weights = weights.new_zeros(weights.shape[0], len(bank))
        bank_weights[:, columns] = weights[:, :len(names)]
        with bank.weights(bank_weights):
            restored = backbone(degraded).float().clamp(0, 1)
        # the lock's correction at share 1 (keep_moments), for a system served with the lock
        correction = lock_tone(restored.clone(), degraded, restored.new_ones(len(restored), 1)) - restored \
            if estimator.config.tone_lock else None
        features.append(estimator.keep_features(degraded, restored).cpu())
        moments.append(keep_moments(degraded, restored, clean, correction).cpu())
        shares.append(tone_free_share(weights, names)[:, 0].cpu())
    estimator.train()
    return KeepCache(torch.cat(features)[:samples], torch.cat(moments)[:samples], torch.cat(shares)[:samples])


def keep_moments(degraded: torch.Tensor, restored: torch.Tensor, clean: torch.Tensor,
                 correction: torch.Tensor | None = None) -> torch.Tensor:
    """B x 6 mean products (uu, dd, ee, ud, ue, de) of u = degraded - restored, d = `correction`
    (the tone lock's at share 1; zero without) and e = restored - clean. What is served for keep k
    and tone share s, k * degraded + (1 - k) * (restored + s d), is off the clean image by
    e + k u + t d with t = (1 - k) s, so its MSE, a quadratic form in (k, t) of these six, is exact
    for every keep and share without the images (keep_moments is taken before the lock's clamp to
    [0, 1], which the served output then applies)."""
    u = (degraded - restored).flatten(1)
    e = (restored - clean).flatten(1)
    d = torch.zeros_like(u) if correction is None else correction.flatten(1)
    return torch.stack([(u * u).mean(1), (d * d).mean(1), (e * e).mean(1), (u * d).mean(1), (u * e).mean(1),
                        (d * e).mean(1)], dim=1)


def served_mse(moments: torch.Tensor, keep: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    """B: the MSE of what is served at keep `keep` and tone share `share` (None: no lock)."""
    uu, dd, ee, ud, ue, de = moments.unbind(1)
    error = uu * keep.pow(2) + 2 * ue * keep + ee   # in this order: the keep step's sums before the lock, bit for bit
    if share is not None:
        t = (1 - keep) * share
        error = error + t.pow(2) * dd + 2 * t * de + 2 * keep * t * ud
    return error.clamp_min(0.0)


def keep_loss(heads, cache: KeepCache, floor: float = KEEP_MSE_FLOOR, harm_weight: float = 0.0,
              harm_margin_db: float = HARM_MARGIN_DB):
    """The loop's loss for the keep step (batches are index tensors into the cache): the mean over
    samples of log10(MSE + floor) of what is served (the tone lock at the rule's share, calibrated
    where the estimator has a tone calibration, then the keep blend), i.e. minus each sample's PSNR (to a cap of -10 log10(floor) dB).
    The mean PSNR over images is what the evaluation reports and what a user sees one photo at a
    time, so every image weighs alike in dB: a clean photo the network spoils (keep should go to 1)
    counts as much as a degraded one it repairs (keep to 0).

    `harm_weight` adds, per sample, that weight times the dB by which the served result falls more
    than `harm_margin_db` below its input: a photo made worse is a failure a user sees, a gain
    missed is not, so where the head cannot tell the two apart it should lean to keeping. At 0
    the loss is the plain mean; the penalty is zero wherever keep 1 is reachable, so it only moves
    keep up. `keep_target` logs the mean of each sample's best keep (optimal_keep) at the share used."""
    device = next(iter(heads.parameters())).device
    margin = harm_margin_db / 10.0  # log10 units of MSE

    def loss_fn(rows):
        feats, moments = cache.features[rows].to(device), cache.moments[rows].to(device)
        keep, share = heads(feats, cache.rule_share[rows].to(device))
        served = torch.log10(served_mse(moments, keep, share) + floor)
        loss = served.mean()
        if harm_weight > 0:
            given = torch.log10(served_mse(moments, torch.ones_like(keep)) + floor)
            loss = loss + harm_weight * F.relu(served - given - margin).mean()
        logged = {"keep": float(keep.detach().mean()),
                  "keep_target": float(optimal_keep(moments, None if share is None else share.detach()).mean())}
        if share is not None:
            logged["tone_share"] = float(share.detach().mean())
        return loss, logged

    return loss_fn


@torch.no_grad()
def keep_report(heads, cache: KeepCache, worse_db: float = HARM_MARGIN_DB) -> dict:
    """Held-out samples' mean PSNR (dB, capped as in the loss) of the input (keep 1), the network
    (keep 0, tone lock as served), the served result and the best keep, the share served worse than
    its input, and the mean keep and tone share (None without a lock)."""
    device = next(iter(heads.parameters())).device
    keep, share = heads(cache.features.to(device), cache.rule_share.to(device))
    keep = keep.cpu()
    share = None if share is None else share.cpu()

    def served_psnr(k: torch.Tensor) -> torch.Tensor:
        return -10 * torch.log10(served_mse(cache.moments, k, share) + KEEP_MSE_FLOOR)

    ones = torch.ones(len(keep))
    served, given = served_psnr(keep), served_psnr(ones)
    return {"samples": len(keep), "psnr_input": float(given.mean()), "psnr_network": float(served_psnr(0 * ones).mean()),
            "psnr_served": float(served.mean()), "psnr_best": float(served_psnr(optimal_keep(cache.moments, share)).mean()),
            "worse_share": float((served < given - worse_db).float().mean()), "keep_mean": float(keep.mean()),
            "tone_share_mean": None if share is None else float(share.mean())}


def optimal_keep(moments: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    """B: the keep in [0, 1] minimising served_mse at tone share `share`; 1 when the served result
    does not depend on keep (the network and its lock changed nothing)."""
    uu, dd, _, ud, ue, de = moments.unbind(1)
    if share is None:
        a, b = uu, ue
    else:
        # error = (e + s d) + k (u - s d)
        a = uu - 2 * share * ud + share.pow(2) * dd
        b = ue + share * ud - share * de - share.pow(2) * dd
    best = (-b / a.clamp_min(1e-12)).clamp(0.0, 1.0)
    return torch.where(a > 1e-10, best, torch.ones_like(best))


def blended_loss(estimator, backbone, bank, names: list[str], temperature: float, device: torch.device):
    """The loop's loss for the SW step: restoration loss of the blend the estimator's softmax picks."""
    columns = [bank.names.index(n) for n in names]

    def loss_fn(batch):
        degraded, clean = batch[0].to(device), batch[1].to(device)
        weights = estimator.weights(degraded, "sw", temperature)[:, :len(names)]
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
    dense = summary.get("dense_val") or {}
    flat = {**{k: v for k, v in summary.items() if isinstance(v, float)},
            **{f"dense_{k}": v for k, v in dense.items() if isinstance(v, float)},
            **{f"dense_iou_{k}": v for k, v in (dense.get("iou") or {}).items() if v is not None}}
    run.log_metrics(flat, summary["steps"])
    run.log_artifact(out)
    run.log_artifact(curves)
