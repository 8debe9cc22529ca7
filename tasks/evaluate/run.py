"""Running the evaluation modes on a set, and the flat metrics dict (metrics.json) they add up to.

Modes, all on the same images:

    input            the degraded input itself
    baseline         the classical method(s) for the set's task (tasks.evaluate.baselines: dark
                     channel prior, gamma + CLAHE, NLM); the input where none exists
    none             the backbone alone
    adapter_<name>   the backbone with that one adapter
    oh, sw           the estimator's one-hot choice / soft blend (ABAIR)
    pw               pixel-wise: a weight map per image from the restorer's own source (a dense
                     estimator head or the backbone's segmentation head; Restorer mode "pw")
    oracle           the set's task adapters, uniform weights (absent when none exists)
    pw_oracle        regions sets only: mode "pw" with the true mask as the weight map (at each
                     pixel its region's adapter; the backbone alone on clean regions and on
                     degradations without an adapter; keep 0)

metrics.json has flat `<group>/<set>/<mode>/<metric>` keys plus per-group summaries, the
estimator's accuracy and the parameter counts; summary.json is its short view (DVC's metrics).
Besides the image metrics, every mode but `input` has `worse`: the share of the set's images
whose PSNR is lower than the input's by more than WORSE_DB (the design's "never makes an image
worse", measured); its summaries are the mean share over the sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tasks.core import imageio
from tasks.core.metrics import image_metrics, psnr
from tasks.core.weight_maps import resize_map
from tasks.evaluate import baselines
from tasks.evaluate.sets import GROUPS, LoadedSet, SetSpec

DECIMALS = 4
# summary.json: the served mode, compared with the degraded input.
SERVED_MODE = "sw"
# An image is "made worse" by a mode when its PSNR drops below the input's by more than this.
WORSE_DB = 0.1
# The weights of a mode_plan entry that stand for "each image's true mask as its weight map".
TRUE_MAP = "true_map"
# Per image, the share of pixels where the pw map's strongest column (an adapter, or the backbone
# alone: 1 - the adapter weights) is the true one (regions sets): whether the maps find the regions.
MAP_ACCURACY = "map_accuracy"


def rounded(value: float) -> float:
    return round(float(value), DECIMALS)


# ------------------------------------------------------------------------------------------------
# Running the modes


def adapter_names(restorer) -> list[str]:
    """Adapters the restorer can weight (its weight columns); none without an adapter bank."""
    if getattr(restorer, "bank", True) is None:
        return []
    return list(getattr(restorer, "names", []) or [])


def pixelwise_ready(restorer) -> bool:
    """Whether the restorer makes weight maps of its own (mode "pw" without weights): an estimator
    with a dense head, or a backbone that kept its segmentation head (Restorer.resolve_pw_source
    decides; a restorer without one makes none)."""
    resolve = getattr(restorer, "resolve_pw_source", None)
    if not adapter_names(restorer) or resolve is None:
        return False
    try:
        resolve()
    except ValueError:
        return False
    return True


def mode_plan(spec: SetSpec, names: list[str], has_estimator: bool, modes: Sequence[str],
              has_pw: bool = False) -> list[tuple[str, str, tuple | str | None]]:
    """(mode key, Restorer mode, weights) in report order; `input` has no restorer call.

    One adapter alone runs as Restorer mode "oh" with one-hot weights: the same function as a
    weight of 1 on that adapter, but a LoRA adapter is merged into the backbone for the pass,
    which makes it as fast as the backbone alone. An oracle with one right adapter is that same
    call (and so runs once); with several it blends them through mode "oracle". A set that names
    its own modes runs those of `modes` only. `pw` runs when
    the restorer makes its own maps (`has_pw`); `pw_oracle` on regions sets with an adapter for
    one of their degradations, its weights TRUE_MAP (each image's map from its mask)."""
    def one_hot(name: str) -> tuple[float, ...]:
        return tuple(1.0 if n == name else 0.0 for n in names)

    if spec.modes is not None:
        modes = [m for m in modes if m in spec.modes]

    plan: list[tuple[str, str, tuple | None]] = []
    if "input" in modes:
        plan.append(("input", "input", None))
    if "baseline" in modes:
        plan.append(("baseline", "baseline", None))
    if "none" in modes:
        plan.append(("none", "none", None))
    if "adapters" in modes:
        plan += [(f"adapter_{name}", "oh", one_hot(name)) for name in names]
    if has_estimator:
        plan += [(mode, mode, None) for mode in ("oh", "sw") if mode in modes]
    if has_pw and names and "pw" in modes:
        plan.append(("pw", "pw", None))
    right = [n for n in spec.task if n in names]
    if "oracle" in modes and len(right) == 1:
        plan.append(("oracle", "oh", one_hot(right[0])))
    elif "oracle" in modes and right:
        plan.append(("oracle", "oracle", tuple(1.0 / len(right) if n in right else 0.0 for n in names)))
    if "pw_oracle" in modes and spec.kind == "regions" and any(n in names for n in spec.mask_classes):
        plan.append(("pw_oracle", "pw", TRUE_MAP))
    return plan


def true_weight_map(mask: np.ndarray, classes: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The pixel-wise oracle's (K+1) x H x W weight map from a uint8 mask (bit i: classes[i] ran
    there): at each pixel its degradations' adapters share the weight uniformly (one adapter, weight
    1, where a region has one degradation, as in regions sets; the image-level oracle's rule where
    several meet); pixels without a degradation that has an adapter get none (the backbone
    alone); keep 0."""
    k = len(names)
    out = np.zeros((k + 1, *mask.shape), np.float32)
    for bit, name in enumerate(classes):
        if name in names:
            out[names.index(name)] += (mask >> bit) & 1
    present = out[:k].sum(axis=0)
    out[:k] /= np.maximum(present, 1.0)
    return out


def map_choice(weight_map: np.ndarray) -> np.ndarray:
    """Per pixel of a (K+1) x H x W map, its strongest column among the K adapters and the
    backbone alone (1 - their sum): an index in [0, K], K meaning the backbone."""
    adapters = weight_map[:-1]
    return np.concatenate([adapters, 1.0 - adapters.sum(axis=0, keepdims=True)]).argmax(axis=0)


def map_accuracy(used: np.ndarray, true: np.ndarray) -> float:
    """Share of pixels where a used map (any size, resized to the true one's) picks the true map's column."""
    return float(np.mean(map_choice(resize_map(used, *true.shape[1:])) == map_choice(true)))


@dataclass
class SetResult:
    spec: SetSpec
    images: int
    sizes: list[tuple[int, int]]
    per_image: dict[str, dict[str, list[float]]]            # mode -> metric -> values
    predictions: list[str] = field(default_factory=list)    # estimator argmax per image
    # input / output (strip_mode) / target, and when they ran: pw (its output), pw_map (the map
    # it used, (K+1) x h x w), pw_weights (its per-image mean, weights_summary), true_map
    strips: dict[str, list[np.ndarray]] = field(default_factory=dict)
    strip_mode: str | None = None
    input_psnr: list[float] = field(default_factory=list)    # per image, whether or not `input` ran
    names: list[str] = field(default_factory=list)           # the weight maps' adapter columns

    def mean(self, mode: str, metric: str) -> float:
        return float(np.mean(self.per_image[mode][metric]))

    def worse(self, mode: str) -> float | None:
        """Share of the images whose PSNR under `mode` is below the input's by more than
        WORSE_DB; None for `input` itself or without per-image figures."""
        values = self.per_image.get(mode, {}).get("psnr", [])
        if mode == "input" or not values or len(values) != len(self.input_psnr):
            return None
        return float(np.mean([v < ref - WORSE_DB for v, ref in zip(values, self.input_psnr)]))


def _batches(shapes: Sequence[tuple], batch: int) -> list[list[int]]:
    """Runs of consecutive same-size images, at most `batch` long."""
    out: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if out and len(out[-1]) < batch and shapes[out[-1][0]] == shape:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _stack(images: list[np.ndarray], device) -> torch.Tensor:
    """uint8 (or float [0, 1]) HxWx3 images -> a B x 3 x H x W float tensor in [0, 1]."""
    array = np.stack(images)
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


def baseline_outputs(loaded: LoadedSet, batch: list[int], device) -> torch.Tensor:
    """The classical baseline (tasks.evaluate.baselines) of the set's task on the batch's inputs."""
    return _stack([baselines.restore(imageio.to_float_rgb(loaded.inputs[i]), loaded.spec.task) for i in batch], device)


def _estimator_weights(restorer, done: dict, x: torch.Tensor, names: list[str], temperature):
    """The estimator's weights for a batch: from the SW (or OH) pass when one ran, else asked directly."""
    weights = (done.get(("sw", None)) or done.get(("oh", None)) or (None, None))[1]
    if weights is None and names and getattr(restorer, "estimator", None) is not None:
        with torch.no_grad():
            weights = restorer.estimator.weights(x, "sw", temperature)
    return weights


def _true_maps(loaded: LoadedSet, batch: list[int], names: list[str]) -> np.ndarray:
    """B x (K+1) x H x W: the batch's true weight maps (a regions set's masks)."""
    if loaded.masks is None:
        raise ValueError(f"set {loaded.spec.name!r} has no masks for the pixel-wise oracle")
    return np.stack([true_weight_map(loaded.masks[i], loaded.spec.mask_classes, names) for i in batch])


def _restore_call(restorer, x: torch.Tensor, mode: str, weights, true_maps, cfg: dict, temperature):
    """One Restorer.restore call of a plan entry: TRUE_MAP weights become the batch's true maps,
    and mode "pw" without weights uses evaluate.pw_source when it is set."""
    extra = {}
    if weights == TRUE_MAP:
        weights = torch.from_numpy(true_maps()).to(x.device)
    elif weights is not None:
        weights = list(weights)
    elif mode == "pw" and cfg.get("pw_source"):
        extra["pw_source"] = cfg["pw_source"]
    return restorer.restore(x, mode=mode, weights=weights, temperature=temperature,
                            max_pixels=cfg.get("max_pixels"), **extra)


def _to_image(out: torch.Tensor, j: int) -> np.ndarray:
    return imageio.to_uint8(out[j].permute(1, 2, 0).cpu().numpy())


def evaluate_set(restorer, loaded: LoadedSet, plan, cfg: dict, device, bar=None) -> SetResult:
    names = adapter_names(restorer)
    y_channel = bool(cfg.get("y_channel", False))
    temperature = cfg.get("temperature")   # None: the estimator's own (Estimator.config.temperature)
    n_strips = int(cfg.get("strips", 3))
    strip_mode = next((m for m in ("sw", "oh", "oracle", "none", "pw") if any(p[0] == m for p in plan)), None)
    per_image: dict[str, dict[str, list[float]]] = {key: {} for key, _, _ in plan}
    predictions: list[str] = []
    input_psnr: list[float] = []
    strips: dict[str, list] = {"input": [], "output": [], "target": []}
    for batch in _batches([x.shape for x in loaded.inputs], int(cfg.get("batch", 8))):
        x = _stack([loaded.inputs[i] for i in batch], device)
        y = _stack([loaded.targets[i] for i in batch], device)
        done: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        cached_maps: list[np.ndarray] = []

        def true_maps() -> np.ndarray:
            if not cached_maps:
                cached_maps.append(_true_maps(loaded, batch, names))
            return cached_maps[0]

        input_psnr.extend(float(v) for v in psnr(x, y).cpu())
        # the strips show the set's first images: this batch's share of them
        take = batch[:max(n_strips - len(strips["output"]), 0)] if strip_mode is not None else []
        for key, mode, weights in plan:
            used = None
            if mode == "input":
                out = x
            elif mode == "baseline":
                out = baseline_outputs(loaded, batch, device)
                if bar is not None:
                    bar.update(len(batch))
            else:
                call = (mode, weights)
                if call not in done:
                    done[call] = _restore_call(restorer, x, mode, weights, true_maps, cfg, temperature)
                    if bar is not None:
                        bar.update(len(batch))
                out, used = done[call]
            for metric, values in image_metrics(out, y, y_channel).items():
                per_image[key].setdefault(metric, []).extend(values)
            if key == "pw" and loaded.masks is not None and names:
                maps = used.cpu().numpy()
                per_image[key].setdefault(MAP_ACCURACY, []).extend(
                    map_accuracy(maps[j], truth) for j, truth in enumerate(true_maps()))
            if not take:
                continue
            if key == strip_mode:
                strips["output"].extend(_to_image(out, j) for j in range(len(take)))
            if key == "pw":
                _keep_pw_strips(strips, out, used, len(take), pw_column=strip_mode != "pw")
        if take:
            strips["input"].extend(loaded.inputs[i] for i in take)
            strips["target"].extend(loaded.targets[i] for i in take)
            if any(entry[2] == TRUE_MAP for entry in plan):
                strips.setdefault("true_map", []).extend(true_maps()[:len(take)])
        est_weights = _estimator_weights(restorer, done, x, names, temperature)
        if est_weights is not None:
            predictions.extend(names[int(k)] for k in est_weights[:, :len(names)].argmax(dim=1).cpu())
    return SetResult(loaded.spec, len(loaded.inputs), loaded.sizes, per_image, predictions, strips, strip_mode,
                     input_psnr, names)


def _keep_pw_strips(strips: dict, out: torch.Tensor, used: torch.Tensor, count: int, pw_column: bool) -> None:
    """The strips' pw columns for the first `count` images of a batch: its output (unless pw is
    the strip's output already), the map it used and that map's per-image mean."""
    from models.restorer import weights_summary

    summary = weights_summary(used[:count]).cpu().numpy()
    maps = used[:count].cpu().numpy()
    if pw_column:
        strips.setdefault("pw", []).extend(_to_image(out, j) for j in range(count))
    strips.setdefault("pw_map", []).extend(maps[j] for j in range(count))
    strips.setdefault("pw_weights", []).extend(summary[j] for j in range(count))


# ------------------------------------------------------------------------------------------------
# The metrics dict


def estimator_confusion(results: list[SetResult], names: list[str]) -> dict:
    """Rows: known single-adapter sets (scored) then unseen single-degradation sets (shown only)."""
    rows = []
    for res in results:
        if not res.predictions or len(res.spec.task) != 1:
            continue
        if res.spec.group == "known" and res.spec.task[0] in names:
            rows.append({"set": res.spec.name, "group": "known", "truth": res.spec.task[0],
                         "counts": [res.predictions.count(n) for n in names]})
        elif res.spec.group == "unseen":
            rows.append({"set": res.spec.name, "group": "unseen", "truth": res.spec.task[0],
                         "counts": [res.predictions.count(n) for n in names]})
    scored = [r for r in rows if r["group"] == "known"]
    correct = sum(r["counts"][names.index(r["truth"])] for r in scored)
    total = sum(sum(r["counts"]) for r in scored)
    return {"names": names, "rows": rows, "correct": correct, "total": total,
            "accuracy": correct / total if total else None}


def build_metrics(results: list[SetResult], counts: dict, confusion: dict | None) -> dict:
    """The flat metrics dict (metrics.json): keys sorted, values rounded."""
    flat: dict[str, float | int] = {}
    metric_names = sorted({m for r in results for v in r.per_image.values() for m in v})
    for res in results:
        prefix = f"{res.spec.group}/{res.spec.name}"
        flat[f"sets/{prefix}/images"] = res.images
        for mode, values in res.per_image.items():
            for metric in values:
                flat[f"{prefix}/{mode}/{metric}"] = rounded(res.mean(mode, metric))
            if (share := res.worse(mode)) is not None:
                flat[f"{prefix}/{mode}/worse"] = rounded(share)
    for scope in (*GROUPS, "all"):
        members = [r for r in results if scope == "all" or r.spec.group == scope]
        modes = {m for r in members for m in r.per_image}
        for mode in modes:
            for metric in metric_names:
                values = [r.mean(mode, metric) for r in members if metric in r.per_image.get(mode, {})]
                if values:
                    flat[f"summary/{scope}/{mode}/{metric}"] = rounded(np.mean(values))
            shares = [share for r in members if (share := r.worse(mode)) is not None]
            if shares:
                flat[f"summary/{scope}/{mode}/worse"] = rounded(np.mean(shares))
    if confusion is not None and confusion["accuracy"] is not None:
        flat["estimator/accuracy"] = rounded(confusion["accuracy"])
        flat["estimator/images"] = confusion["total"]
        for row in confusion["rows"]:
            if row["group"] == "known":
                hits = row["counts"][confusion["names"].index(row["truth"])]
                flat[f"estimator/known/{row['set']}/accuracy"] = rounded(hits / max(sum(row["counts"]), 1))
    flat["params/backbone"] = int(counts["backbone"])
    flat["params/adapters"] = int(counts["adapters"])
    flat["params/estimator"] = int(counts["estimator"])
    flat["params/total"] = int(counts["total"])
    for name, n in counts.get("per_adapter", {}).items():
        flat[f"params/adapter/{name}"] = int(n)
    return dict(sorted(flat.items()))


def summary_metrics(metrics: dict) -> dict:
    """summary.json from the flat metrics: per group (and all) the served mode's mean PSNR and
    SSIM, its PSNR gain over the degraded input and its "made worse" share (`sw_worse`: the mean
    over the sets of the share of images it left more than WORSE_DB below the input), plus the
    estimator's accuracy. What was not measured (a group without sets, no estimator, a mode left
    out) is left out."""
    summary: dict = {}
    for scope in (*GROUPS, "all"):
        served = {metric: metrics.get(f"summary/{scope}/{SERVED_MODE}/{metric}") for metric in ("psnr", "ssim")}
        entry = {f"{SERVED_MODE}_{metric}": value for metric, value in served.items() if value is not None}
        degraded = metrics.get(f"summary/{scope}/input/psnr")
        if served["psnr"] is not None and degraded is not None:
            entry[f"{SERVED_MODE}_psnr_gain"] = rounded(served["psnr"] - degraded)
        if (worse := metrics.get(f"summary/{scope}/{SERVED_MODE}/worse")) is not None:
            entry[f"{SERVED_MODE}_worse"] = worse
        if entry:
            summary[scope] = entry
    if "estimator/accuracy" in metrics:
        summary["estimator"] = {"accuracy": metrics["estimator/accuracy"]}
    return summary
