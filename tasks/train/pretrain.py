"""Phase I (`pretrain`): the backbone learns to restore composite degradations while an
auxiliary head segments them.

loss = restoration (L1 or Charbonnier) + seg_weight * BCE(seg logits, per-pixel class bits)
AdamW, linear warm-up then cosine, gradient clipping, EMA weights (the EMA is what is saved and
validated), bf16 autocast and channels-last on CUDA, optional torch.compile, DDP under torchrun.
A resumable state is written every `checkpoint_every` steps and on SIGTERM; a resumed run
replays exactly the batches and updates of an uninterrupted one (see tasks/train/loop.py
and tasks/data/reader.py). The loop is the shared one; this file says what Phase I is.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.core import imageio, paths, storage
from tasks.data import reader

from tasks.train import loop
from tasks.train.logs import StepLog, plot_curves, sample_grid
from tasks.core.device import pick_device
from tasks.core.errors import AbairError
from tasks.core.metrics import psnr
from tasks.core.params import params_hash
from tasks.core.storage import atomic_path

log = logging.getLogger(__name__)

# Knobs that change how the run executes, not what it learns.
RUNTIME_KNOBS = ("workers", "device", "log_every", "compile", "val_every")
VAL_CURVE_SAMPLES = 64


class PretrainSample:
    """Shard sample -> (degraded, clean, class bits) patch tensors, jointly augmented.

    With a `generator` (the shard index's record of how its samples were degraded: `redraw`), the
    stored degraded image and mask are replaced by a fresh composite draw from the sample's clean
    crop, from the stream's rng: every visit of a crop brings new degradations, seeded per
    segment, so runs stay reproducible and resumable."""

    def __init__(self, patch: int, n_classes: int, generator: dict | None = None):
        self.patch, self.n_classes, self.generator = patch, n_classes, generator

    def redraw(self, clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from degradations import composite

        gen, comp = self.generator, self.generator["composite"]
        degraded, mask, _ = composite.apply(
            clean.astype(np.float32) / 255.0, rng, gen["classes"], {k: tuple(v) for k, v in gen["severity"].items()},
            regions=tuple(comp["regions"]), degradations_per_region=tuple(comp["degradations_per_region"]),
            shape_fraction=comp["shape_fraction"], p_single=comp["p_single"], p_clean=comp["p_clean"],
            options=gen.get("options") or {})
        return imageio.to_uint8(degraded), mask

    def __call__(self, sample: dict, rng: np.random.Generator):
        if self.generator is not None:
            sample = {**sample, **dict(zip(("degraded", "mask"), self.redraw(sample["clean"], rng)))}
        degraded, clean, mask = reader.random_patch([sample["degraded"], sample["clean"], sample["mask"]], self.patch, rng)
        bits = np.unpackbits(mask[:, :, None], axis=2, bitorder="little")[:, :, :self.n_classes]
        return reader.to_tensor(degraded), reader.to_tensor(clean), torch.from_numpy(bits.transpose(2, 0, 1).astype(np.float32))


def pretrain_loss(model, degraded: torch.Tensor, clean: torch.Tensor, bits: torch.Tensor, cfg: dict):
    """Restoration loss + seg_weight x multi-label BCE on the per-pixel class bits."""
    restored, seg_logits = model(degraded, with_seg=True)
    restore_loss = loop.restoration_loss(restored.float(), clean, cfg.get("loss", "l1"))
    seg_loss = F.binary_cross_entropy_with_logits(seg_logits.float(), bits)
    return restore_loss + cfg["seg_weight"] * seg_loss, restore_loss, seg_loss


def check_replicas(model: torch.nn.Module, dist: loop.Dist) -> list[str]:
    """Every rank's weight fingerprint; DDP replicas that drifted apart are an error."""
    from models.identity import fingerprint

    mine = fingerprint(model)
    if dist.world == 1:
        return [mine]
    import torch.distributed

    everyone: list = [None] * dist.world
    torch.distributed.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise AbairError("pretrain", f"DDP replicas are out of sync: {everyone}")
    return everyone


@torch.no_grad()
def validate(model: torch.nn.Module, urls: list[str], device: torch.device, batch_size: int = 16,
             max_samples: int | None = None, keep: int = 0) -> dict:
    """Mean PSNR of the degraded inputs and of the restorations over a validation split."""
    model.eval()
    psnr_in, psnr_out, examples = [], [], []
    batch: list[dict] = []

    def flush():
        degraded = torch.stack([reader.to_tensor(s["degraded"]) for s in batch]).to(device)
        clean = torch.stack([reader.to_tensor(s["clean"]) for s in batch]).to(device)
        restored = model(degraded).float().clamp(0, 1)
        psnr_in.append(psnr(degraded, clean).cpu())
        psnr_out.append(psnr(restored, clean).cpu())
        for i in range(min(len(batch), keep - len(examples))):
            examples.append([reader.to_numpy(degraded[i]), reader.to_numpy(restored[i]), reader.to_numpy(clean[i])])
        batch.clear()

    count = 0
    for sample in reader.read_split(urls):
        if not sample["mask"].any():
            continue  # clean samples say nothing about restoration
        batch.append(sample)
        count += 1
        if len(batch) == batch_size:
            flush()
        if max_samples and count >= max_samples:
            break
    if batch:
        flush()
    if not psnr_in:
        raise AbairError(urls[0], "validation split has no degraded samples")
    p_in, p_out = torch.cat(psnr_in), torch.cat(psnr_out)
    return {"val_psnr_input": float(p_in.mean()), "val_psnr_restored": float(p_out.mean()),
            "val_psnr_gain": float((p_out - p_in).mean()), "val_samples": int(p_in.numel()), "examples": examples}


def pretrain(cfg: dict, shards: str = paths.SHARDS, out: str = paths.BACKBONE,
             state_path: str = paths.PRETRAIN_STATE, reports: str = paths.TRAINING_REPORTS,
             resume: str = "auto", stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the backbone. `cfg` is the `pretrain` params section. `resume`: auto (continue a
    matching interrupted run), always, never. `stop_after` ends the run after that many steps as
    SIGTERM would (checkpoint, no outputs), for tests and time-boxed jobs."""
    dist = loop.init_distributed(cfg.get("device", "auto"))
    device = pick_device(cfg.get("device", "auto"), dist.local_rank)
    index = reader.load_index(shards)
    if index["crop_size"] < cfg["patch"]:
        raise AbairError(f"{shards}/index.json", f"crops are {index['crop_size']} px, smaller than pretrain.patch {cfg['patch']}")
    inputs_hash = params_hash({"params": {k: v for k, v in cfg.items() if k not in RUNTIME_KNOBS},
                               "shards": index["params_hash"], "world": dist.world})
    total_steps = int(cfg["steps"])

    loop.seed_everything(cfg["seed"])
    model = build_model(cfg, len(index["classes"]), device)
    training = loop.Training(model.parameters(), cfg, device, module=model, ema_decay=cfg["ema_decay"])
    checkpoints = loop.Checkpoints(Path(state_path), cfg["checkpoint_every"], inputs_hash, stop_after)
    checkpoints.resume(training, resume, "pretrain", total_steps)
    train_model = loop.training_module(model, dist, device, cfg.get("compile"))
    loader = train_loader(cfg, shards, index)
    budget = loop.TimeBudget(cfg.get("time_budget_min"))

    run = open_run(cfg, shards, index, inputs_hash, dist, device)
    steplog = StepLog(Path(reports) / "pretrain.tsv", ["loss", "restore", "seg", "lr", "img_per_s"], run,
                      resume_step=training.step) if dist.main else None
    model.train()
    curve = LearningCurve(Path(reports) / "pretrain_val.tsv", int(cfg.get("val_every") or 0), training.step) \
        if dist.main and index["splits"]["val"]["samples"] else None
    with run if run is not None else contextlib.nullcontext():
        # in chunks of val_every steps (one chunk when off): the learning curve is measured between them
        for end in chunk_ends(training.step, total_steps, curve.every if curve else 0):
            loop.fit(training, batch_loss(train_model, cfg, device), loader.batches(training.step, end), cfg,
                     total_steps, device, steplog=steplog, desc="pretrain", progress=progress, checkpoints=checkpoints,
                     dist=dist, keep_bar=True, budget=budget)
            if training.stopped or training.budget_spent:
                break
            if curve is not None and end < total_steps:
                curve.measure(model, training.ema, shards, index, device, training.step)
                model.train()
        if training.stopped:
            result = stopped(training, run)
        else:
            # on a machine too slow for `steps` within time_budget_min, fewer steps ran
            steps = training.step
            result = {"steps": steps, "steps_planned": total_steps, "ended_by": "time_budget" if training.budget_spent else "steps",
                      "train_seconds": round(training.elapsed, 1), "final_loss": float(np.mean(training.losses[-20:])),
                      "losses": training.losses, "replica_fingerprints": check_replicas(model, dist)}
            if dist.main:
                backbone, val, examples = validate_ema(model, training.ema, shards, index, device)
                result.update(val)
                metadata = {"classes": index["classes"], "inputs_hash": inputs_hash, "shards_hash": index["params_hash"],
                            "steps": steps, **{k: round(v, 4) for k, v in val.items() if isinstance(v, float)}}
                if curve is not None:  # the same samples as every other point of the curve
                    curve.measure(model, training.ema, shards, index, device, steps)
                save_outputs(backbone, metadata, result, examples, Path(out), Path(reports), steplog, run,
                             f"Phase I ({cfg['model']['size']}, {steps} steps)", curve)
                checkpoints.path.unlink(missing_ok=True)
    loop.close_distributed()
    return result


def chunk_ends(start: int, total: int, every: int) -> list[int]:
    """Where each training chunk ends: every `every` steps after `start` (a multiple of it), then total."""
    if every <= 0:
        return [total]
    return [*range((start // every + 1) * every, total, every), total]


class LearningCurve:
    """Validation gain against Phase I steps (`val_every`): the EMA weights on the validation
    split's first VAL_CURVE_SAMPLES degraded samples, one row per measurement in a TSV, plotted
    with the loss curves. It shows whether a schedule stopped while still improving."""

    def __init__(self, path: Path, every: int, start_step: int):
        self.path, self.every = path, every
        self.rows: list[dict] = []
        if start_step > 0 and path.is_file():  # resuming: keep what the interrupted run measured
            lines = path.read_text().splitlines()[1:]
            self.rows = [dict(zip(("step", "psnr_input", "psnr_restored", "gain"), map(float, l.split("\t"))))
                         for l in lines if int(float(l.split("\t")[0])) <= start_step]
        elif path.exists():
            path.unlink()

    def measure(self, model, ema, shards: str, index: dict, device, step: int) -> None:
        ema_model = copy.deepcopy(model)
        ema.copy_to(ema_model)
        val = validate(ema_model, reader.shard_urls(shards, "val", index), device, max_samples=VAL_CURVE_SAMPLES)
        self.add(step, val)
        log.info("pretrain: step %d, val gain %+.2f dB (%d samples)", step, val["val_psnr_gain"], val["val_samples"])

    def add(self, step: int, val: dict) -> None:
        self.rows.append({"step": float(step), "psnr_input": val["val_psnr_input"],
                          "psnr_restored": val["val_psnr_restored"], "gain": val["val_psnr_gain"]})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text("step\tpsnr_input\tpsnr_restored\tgain\n" + "".join(
                f"{int(r['step'])}\t{r['psnr_input']:.4f}\t{r['psnr_restored']:.4f}\t{r['gain']:.4f}\n" for r in self.rows))

    def plot(self, out: Path, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.rows], [r["gain"] for r in self.rows], marker="o")
        ax.set_xlabel("Phase I step")
        ax.set_ylabel("validation gain over the input (dB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return out


def build_model(cfg: dict, n_classes: int, device: torch.device) -> torch.nn.Module:
    """The backbone with its segmentation head (one output per degradation class); channels-last on CUDA."""
    from models.backbone import build_backbone

    model_cfg = cfg["model"]
    model = build_backbone(model_cfg["size"], seg_classes=n_classes, prompt=model_cfg.get("prompt", False),
                           **model_cfg.get("overrides", {})).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def train_loader(cfg: dict, shards: str, index: dict) -> reader.SegmentedLoader:
    """The train split as seeded segments of `checkpoint_every` steps (what makes resuming exact)."""
    generator = None
    if cfg.get("redraw"):
        generator = index.get("generator")
        if generator is None:
            raise AbairError(storage.join(shards, "index.json"), "has no `generator` record, which pretrain.redraw "
                             "needs: re-run the synthesize stage with this version")
    stream = reader.ShardStream(reader.shard_urls(shards, "train", index),
                                PretrainSample(cfg["patch"], len(index["classes"]), generator),
                                seed=cfg["seed"], shuffle_buffer=cfg.get("shuffle_buffer", 256),
                                on_error=cfg.get("on_corrupt", "raise"))
    segment_steps = int(cfg.get("segment_steps") or cfg["checkpoint_every"])
    return reader.SegmentedLoader(stream, cfg["batch"], segment_steps, workers=cfg.get("workers", 0))


def batch_loss(model: torch.nn.Module, cfg: dict, device: torch.device):
    """The loop's loss: a batch on the device (channels-last on CUDA) through `pretrain_loss`."""

    def loss_fn(batch):
        degraded, clean, bits = (t.to(device, non_blocking=True) for t in batch)
        if device.type == "cuda":
            degraded = degraded.contiguous(memory_format=torch.channels_last)
        loss, restore_loss, seg_loss = pretrain_loss(model, degraded, clean, bits, cfg)
        return loss, {"restore": restore_loss.detach(), "seg": seg_loss.detach()}

    return loss_fn


def open_run(cfg: dict, shards: str, index: dict, inputs_hash: str, dist: loop.Dist, device: torch.device):
    """The stage's MLflow run, opened by the main process only (None elsewhere)."""
    if not dist.main:
        return None
    from tasks.core import tracking

    run = tracking.start_run("pretrain", tags={"abair.stage": "pretrain", "abair.inputs_hash": inputs_hash})
    run.log_params({**cfg, "classes": index["classes"], "shards": shards, "world_size": dist.world,
                    "effective_batch": cfg["batch"] * dist.world, "device": str(device)})
    return run


def stopped(training: loop.Training, run) -> dict:
    """A run stopped early: its state is saved, no outputs are written."""
    step = len(training.losses)
    log.warning("pretrain: stopped at step %d; `abair pretrain --resume auto` continues", step)
    if run is not None:
        run.set_tags({"abair.interrupted_at": step})
        run.end("KILLED")
    return {"interrupted": True, "step": step, "losses": training.losses}


def validate_ema(model: torch.nn.Module, ema: loop.EMA, shards: str, index: dict, device: torch.device):
    """The EMA weights (what is saved), on the CPU in float32, with their validation metrics and
    sample rows (degraded, restored, clean)."""
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model)
    val = validate(ema_model, reader.shard_urls(shards, "val", index), device, keep=6) if index["splits"]["val"]["samples"] else {}
    examples = val.pop("examples", [])
    return ema_model.to("cpu").float(), val, examples


def save_outputs(backbone: torch.nn.Module, metadata: dict, summary: dict, examples: list, out: Path, reports: Path,
                 steplog: StepLog, run, title: str, curve: LearningCurve | None = None) -> None:
    """The backbone file, pretrain.json, curves and samples, and all of it in the MLflow run."""
    from models.identity import save_backbone

    steps = summary["steps"]
    save_backbone(backbone, out, extra_metadata=metadata)
    reports.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in summary.items() if k != "losses"}
    with atomic_path(reports / "pretrain.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    curves = plot_curves(steplog.read(), ["loss", "restore", "seg", "lr"], reports / "pretrain_curves.png", title)
    artifacts = [curves, out]
    if curve is not None:
        artifacts += [curve.path, curve.plot(reports / "pretrain_gain.png", f"{title}: learning curve")]
    if examples:
        artifacts.append(sample_grid(examples, reports / "pretrain_samples.png", ["degraded", "restored", "clean"]))
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, steps)
    for artifact in artifacts:
        run.log_artifact(artifact)
    run.end()
    log.info("pretrain: %d steps, val PSNR %.2f dB -> %.2f dB (%+.2f dB); backbone -> %s", steps,
             summary.get("val_psnr_input", float("nan")), summary.get("val_psnr_restored", float("nan")),
             summary.get("val_psnr_gain", float("nan")), out)
