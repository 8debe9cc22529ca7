"""Phase I (`pretrain`): the backbone learns to restore composite degradations while an
auxiliary head segments them.

loss = restoration (L1 or Charbonnier) + seg_weight * BCE(seg logits, per-pixel class bits)
AdamW, linear warm-up then cosine, gradient clipping, EMA weights (the EMA is what is saved and
validated), bf16 autocast and channels-last on CUDA, optional torch.compile, DDP under torchrun.
A resumable state is written every `checkpoint_every` steps and on SIGTERM; a resumed run
replays exactly the batches and updates of an uninterrupted one (see tasks/data.py).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.data import reader

from tasks.train import loop
from tasks.core.device import pick_device
from tasks.core.errors import AbairError
from tasks.core.metrics import psnr
from tasks.core.params import params_hash
from tasks.core.storage import atomic_path

log = logging.getLogger(__name__)

# Knobs that change how the run executes, not what it learns.
RUNTIME_KNOBS = ("workers", "device", "log_every", "compile", "val_every")


class PretrainSample:
    """Shard sample -> (degraded, clean, class bits) patch tensors, jointly augmented."""

    def __init__(self, patch: int, n_classes: int):
        self.patch, self.n_classes = patch, n_classes

    def __call__(self, sample: dict, rng: np.random.Generator):
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
    from models.backbone import fingerprint

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


def pretrain(cfg: dict, shards: str = "data/shards", out: str = "checkpoints/backbone.safetensors",
             state_path: str = "checkpoints/pretrain.state.pt", reports: str = "reports/training",
             resume: str = "auto", stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the backbone. `cfg` is the `pretrain` params section. `resume`: auto (continue a
    matching interrupted run), always, never. `stop_after` ends the run after that many steps as
    SIGTERM would (checkpoint, no outputs), for tests and time-boxed jobs."""
    from tqdm import tqdm

    from models.backbone import build_backbone, save_backbone

    dist = loop.init_distributed(cfg.get("device", "auto"))
    device = pick_device(cfg.get("device", "auto"), dist.local_rank)
    index = reader.load_index(shards)
    classes = index["classes"]
    train_urls = reader.shard_urls(shards, "train", index)
    if index["crop_size"] < cfg["patch"]:
        raise AbairError(f"{shards}/index.json", f"crops are {index['crop_size']} px, smaller than pretrain.patch {cfg['patch']}")
    inputs_hash = params_hash({"params": {k: v for k, v in cfg.items() if k not in RUNTIME_KNOBS},
                               "shards": index["params_hash"], "world": dist.world})
    total_steps = int(cfg["steps"])
    segment_steps = int(cfg.get("segment_steps") or cfg["checkpoint_every"])

    loop.seed_everything(cfg["seed"])
    model_cfg = cfg["model"]
    model = build_backbone(model_cfg["size"], seg_classes=len(classes), prompt=model_cfg.get("prompt", False),
                           **model_cfg.get("overrides", {})).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = loop.make_optimizer(model.parameters(), cfg, device)
    ema = loop.EMA(model, cfg["ema_decay"])
    start_step, losses = 0, []

    state_file = Path(state_path)
    if resume != "never" and state_file.exists():
        state = loop.load_state(state_file)
        if state.get("inputs_hash") == inputs_hash or resume == "always":
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
            loop.set_rng_state(state["rng"])
            start_step, losses = state["step"], state["losses"]
            log.info("pretrain: resuming at step %d of %d from %s", start_step, total_steps, state_file)
        else:
            log.info("pretrain: %s belongs to other inputs; starting afresh", state_file)
    elif resume == "always":
        raise AbairError(state_file, "no training state to resume from")

    train_model = model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if cfg.get("compile"):
        train_model = torch.compile(train_model)

    stream = reader.ShardStream(train_urls, PretrainSample(cfg["patch"], len(classes)), seed=cfg["seed"],
                              shuffle_buffer=cfg.get("shuffle_buffer", 256), on_error=cfg.get("on_corrupt", "raise"))
    loader = reader.SegmentedLoader(stream, cfg["batch"], segment_steps, workers=cfg.get("workers", 0))

    run = None
    if dist.main:
        from tasks.core import tracking

        run = tracking.start_run("pretrain", tags={"abair.stage": "pretrain", "abair.inputs_hash": inputs_hash})
        run.log_params({**cfg, "classes": classes, "shards": shards, "world_size": dist.world,
                        "effective_batch": cfg["batch"] * dist.world, "device": str(device)})
    reports_dir = Path(reports)
    steplog = loop.StepLog(reports_dir / "pretrain.tsv", ["loss", "restore", "seg", "lr", "img_per_s"], run,
                               resume_step=start_step) if dist.main else None

    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", disable=not (progress and dist.main))
    last_time, interrupted = time.perf_counter(), False
    try:
        with loop.StopSignal() as stop:
            for step, (degraded, clean, bits) in loader.batches(start_step, total_steps):
                degraded, clean, bits = (t.to(device, non_blocking=True) for t in (degraded, clean, bits))
                if device.type == "cuda":
                    degraded = degraded.contiguous(memory_format=torch.channels_last)
                lr = loop.warmup_cosine(step, total_steps, cfg["warmup_steps"], cfg["lr"], cfg["min_lr"])
                loop.set_lr(optimizer, lr)
                with loop.autocast(device, cfg.get("amp", "auto")):
                    loss, restore_loss, seg_loss = pretrain_loss(train_model, degraded, clean, bits, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
                ema.update(model)
                losses.append(float(loss.detach()))

                done = step + 1
                if dist.main and (done % cfg.get("log_every", 10) == 0 or done == total_steps):
                    now = time.perf_counter()
                    metrics = {"loss": float(loss.detach()), "restore": float(restore_loss.detach()), "seg": float(seg_loss.detach()), "lr": lr,
                               "img_per_s": cfg["batch"] * dist.world * cfg.get("log_every", 10) / max(now - last_time, 1e-9)}
                    if device.type == "cuda":
                        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    last_time = now
                    steplog.write(done, metrics)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{metrics['img_per_s']:.1f}")
                bar.update(1)
                stopping = stop.requested or (stop_after is not None and done >= stop_after)
                if dist.main and (done % cfg["checkpoint_every"] == 0 or stopping) and done < total_steps:
                    loop.save_state(state_file, {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                     "ema": ema.state_dict(), "rng": loop.rng_state(),
                                                     "losses": losses, "inputs_hash": inputs_hash})
                if stopping and done < total_steps:
                    interrupted = True
                    log.warning("pretrain: stopped at step %d; `abair pretrain --resume auto` continues", done)
                    break
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    finally:
        bar.close()

    if interrupted:
        if run is not None:
            run.set_tags({"abair.interrupted_at": len(losses)})
            run.end("KILLED")
        loop.close_distributed()
        return {"interrupted": True, "step": len(losses), "losses": losses}

    summary = {"steps": total_steps, "final_loss": float(np.mean(losses[-20:])), "losses": losses,
               "replica_fingerprints": check_replicas(model, dist)}
    if dist.main:
        ema_model = copy.deepcopy(model)
        ema.copy_to(ema_model)
        val = validate(ema_model, reader.shard_urls(shards, "val", index), device, keep=6) if index["splits"]["val"]["samples"] else {}
        examples = val.pop("examples", [])
        summary.update(val)
        ema_model = ema_model.to("cpu").float()
        metadata = {"classes": classes, "inputs_hash": inputs_hash, "shards_hash": index["params_hash"],
                    "steps": total_steps, **{k: round(v, 4) for k, v in val.items() if isinstance(v, float)}}
        save_backbone(ema_model, out, extra_metadata=metadata)
        reports_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in summary.items() if k != "losses"}
        with atomic_path(reports_dir / "pretrain.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
        curves = loop.plot_curves(steplog.read(), ["loss", "restore", "seg", "lr"], reports_dir / "pretrain_curves.png",
                                      f"Phase I ({model_cfg['size']}, {total_steps} steps)")
        artifacts = [curves, Path(out)]
        if examples:
            artifacts.append(loop.sample_grid(examples, reports_dir / "pretrain_samples.png", ["degraded", "restored", "clean"]))
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, total_steps)
        for artifact in artifacts:
            run.log_artifact(artifact)
        run.end()
        state_file.unlink(missing_ok=True)
        log.info("pretrain: %d steps, val PSNR %.2f dB -> %.2f dB (%+.2f dB); backbone -> %s", total_steps,
                 val.get("val_psnr_input", float("nan")), val.get("val_psnr_restored", float("nan")),
                 val.get("val_psnr_gain", float("nan")), out)
    loop.close_distributed()
    return summary
