"""The onnxruntime backend: a release folder's ONNX graphs (tasks/release/onnx_export.py), run with
onnxruntime and numpy; neither torch nor MLflow is imported.

It runs what models.restorer.Restorer.restore runs, graph by graph:

    estimator.onnx   the weights: sw (`weights`), oh (the one-hot of the argmax of `logits`; all
                     zeros when `base` wins), pw (`weight_map`, the dense head's); none: no weights
    restorer*.onnx   the network with those weights (keep 0): whole, or on the tiles of local
                     tiling, blended as models/tiling.py blends them. A weight vector (sw, oh,
                     none) runs restorer-mix.onnx, which folds it into the base weights (LoRA), or
                     restorer_NAME.onnx where mode oh picks an adapter merged at export; a map
                     (pw, or any mode without those graphs) runs restorer.onnx, each tile fed its
                     window of the map at the tile's size (arrays.py)
    keep.onnx        keep, from the image and the clamped network output; the output is then
                     keep * image + (1 - keep) * network, as in torch, after the tone lock
                     (models/tone.py, in numpy: arrays.lock_tone) at the share read off the
                     weights, calibrated as the metadata's tone_calibration says

Exact tiling runs inside the blocks in Python, so it is refused here; --tiling auto is whole when
the image fits the tile budget (--max-pixels), else local. Images the backbone pads by repeating
the edge (smaller than their padding to a multiple of 8) are padded so here, with their map, and
the graph pads nothing. fp32 only.

Sessions: tasks/release/onnx_runtime.py (the export's checks run the same ones). Names and sizes
come from the graphs' metadata_props (tasks.release.onnx_export sets them); in a release folder
every graph is first checked against config.json's sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tasks.core.errors import AbairError
from tasks.release.onnx_runtime import new_session, onnxruntime
from tasks.serve.backends import Backend, arrays, check_precision, register

GRAPHS_DIR = "onnx"
ESTIMATOR_GRAPH = "estimator.onnx"
KEEP_GRAPH = "keep.onnx"
RESTORER_GRAPH = "restorer.onnx"
MIX_GRAPH = "restorer-mix.onnx"
MERGED_GLOB = "restorer_*.onnx"
METADATA_PREFIX = "abair."


def check_options(tiling: str, precision: str) -> None:
    if tiling == "exact":
        raise AbairError("--tiling", "exact tiling runs inside the network's blocks in Python, so the onnxruntime "
                                     "backend cannot run it: use --tiling auto or local (or --backend torch)")
    check_precision(precision)
    if precision != "fp32":
        raise AbairError("--precision", f"the onnxruntime backend runs the fp32 graphs only; {precision} runs with "
                                        "--backend torch")


def graphs_folder(model: str) -> tuple[Path, Path | None]:
    """(the folder holding the graphs, the release folder around it or None) for --model."""
    path = Path(model)
    hint = f"the onnxruntime backend needs a release folder with ONNX graphs ({GRAPHS_DIR}/{RESTORER_GRAPH}): write one " \
           "with `abair export MODEL OUT --onnx`"
    if str(model).startswith("models:/") or not path.is_dir():
        raise AbairError(model, hint)
    if (path / GRAPHS_DIR / RESTORER_GRAPH).is_file():
        return path / GRAPHS_DIR, path
    if (path / RESTORER_GRAPH).is_file():
        return path, None
    raise AbairError(model, f"no {GRAPHS_DIR}/{RESTORER_GRAPH}: {hint}")


def check_listed(release: Path | None, graphs: list[Path]) -> None:
    """In a release, every graph that runs must be listed in config.json with its sha256."""
    if release is None or not (release / "config.json").is_file():
        return
    try:
        listed = json.loads((release / "config.json").read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise AbairError(release / "config.json", f"unreadable ({exc})") from None
    for graph in graphs:
        relative = graph.relative_to(release).as_posix()
        if relative not in listed:
            raise AbairError(graph, "not listed in config.json: a release runs only the files it lists")
        digest = hashlib.sha256()
        with open(graph, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != listed[relative]:
            raise AbairError(graph, "sha256 differs from config.json's: the file changed after the export")


def metadata(session) -> dict[str, str]:
    meta = session.get_modelmeta().custom_metadata_map
    return {key[len(METADATA_PREFIX):]: value for key, value in meta.items() if key.startswith(METADATA_PREFIX)}



# What a run of the restorer graph holds in onnxruntime, in float32 values per pixel and unit of
# backbone width (memory.estimate's run_floats): measured on the default tiny system, 1024 x 1024
# whole, two images in one process: 10.7 GB peak (one image: 5.6 GB; the CPU arena grows by
# doubling), against torch's WHOLE_FLOATS of 28 (benchmarks/results/inference.md).
RUN_FLOATS = 170
# Local tiles no smaller than this (the overlap is 32 px a side).
MIN_TILE = 128

class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, folder: Path, release: Path | None, model: str, device: str = "auto"):
        optional = [folder / n for n in (ESTIMATOR_GRAPH, KEEP_GRAPH, MIX_GRAPH) if (folder / n).is_file()]
        files = [folder / RESTORER_GRAPH, *optional, *sorted(folder.glob(MERGED_GLOB))]
        check_listed(release, files)
        self.restorer = new_session(folder / RESTORER_GRAPH, device)
        meta = metadata(self.restorer)
        try:
            self.names = list(json.loads(meta["adapters"]))
            self.dim = int(meta["backbone_dim"])
        except (KeyError, ValueError):
            raise AbairError(folder / RESTORER_GRAPH, "has no abair metadata (adapters, backbone_dim): not a graph "
                                                      "of `abair export --onnx`") from None
        self.k = len(self.names)
        # graphs exported before the tone lock existed carry no such key: their systems had none
        self.tone_lock = bool(json.loads(meta.get("tone_lock", "false")))
        self.tone_calibration = json.loads(meta.get("tone_calibration", "null"))   # [scale, bias] or None
        self.estimator = new_session(folder / ESTIMATOR_GRAPH, device) if (folder / ESTIMATOR_GRAPH).is_file() else None
        self.keep = new_session(folder / KEEP_GRAPH, device) if (folder / KEEP_GRAPH).is_file() else None
        self.mix = new_session(folder / MIX_GRAPH, device) if (folder / MIX_GRAPH).is_file() else None
        self.merged = {}
        for path in sorted(folder.glob(MERGED_GLOB)):
            session = new_session(path, device)
            name = metadata(session).get("merged")
            if name in self.names:
                self.merged[name] = session
        estimator_outputs = [o.name for o in self.estimator.get_outputs()] if self.estimator is not None else []
        self.has_map = "weight_map" in estimator_outputs
        self.pw_default = json.loads(meta.get("pw_source", "null"))   # the torch Restorer's default map source
        provider = self.restorer.get_providers()[0].replace("ExecutionProvider", "")
        self.described = f"{model} (onnxruntime {onnxruntime().__version__}, {provider})"

    # -- what the command asks first ------------------------------------------------------------

    def pw_source(self, requested: str | None) -> str:
        if (requested or self.pw_default) == "seg":
            whose = "the seg weight-map source" if requested else "this system's default weight-map source (seg)"
            raise AbairError(self.described, f"{whose} runs the backbone's segmentation head, which the ONNX graphs do "
                                             "not hold: use --pw-source dense or --backend torch")
        if not self.has_map:
            raise AbairError(self.described, f"mode pw needs a dense weight map ({ESTIMATOR_GRAPH} with a weight_map "
                                             "output: an estimator with a dense head); use --backend torch")
        return "dense"

    def plan(self, height, width, max_pixels, tiling, budget, mode, pw_source):
        from tasks.serve import memory

        # whole where the image fits the tile budget, else local tiles (exact tiling is refused);
        # onnxruntime holds far more per pixel than torch (RUN_FLOATS), so where the tile budget's
        # tiles do not fit the memory budget, smaller local tiles are tried before refusing
        side = memory.tile_side(max_pixels)
        sides = [side] if side is None else \
            [side] + [s for s in (side * 3 // 4 // 8 * 8, side // 2 // 8 * 8, MIN_TILE) if MIN_TILE <= s < side]
        for tile in sides:
            try:
                return memory.plan(self.dim, height, width, tile, "local", budget, mode, self.k + 1, pw_source,
                                   run_floats=RUN_FLOATS)
            except memory.DoesNotFit as exc:
                refusal = exc
        raise refusal

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, rgb, mode, max_pixels, plan, pw_source):
        from tasks.serve.inference import Restoration

        image = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)[None]    # 1 x 3 x H x W
        h, w = image.shape[-2:]
        used = self.weights(image, mode)
        network = self.network_runner(used, mode, (h, w))
        if plan.tile is None or (h <= plan.tile and w <= plan.tile):
            out = network(image, (slice(0, h), slice(0, w)))
        else:
            out = arrays.tiled_apply(network, image, plan.tile, arrays.DEFAULT_OVERLAP)
        out = np.clip(out, 0.0, 1.0)
        if used is not None and self.keep is not None:
            # the keep head looks at the input and at what the network made of it (image level)
            keep = float(self.keep.run(None, {"image": image, "network_output": out})[0][0, 0])
            used[:, -1] = keep
        if used is not None and self.tone_lock:
            # after keep, which judges the unlocked output (models/tone.py); the estimator's calibration
            share = arrays.calibrated_tone_share(arrays.tone_free_share(used, self.names), self.tone_calibration)
            arrays.lock_tone(out, image, share)   # in place: out is np.clip's copy
        if used is not None and used[0, -1].max() > 0:
            out = arrays.lerp(out, image, float(used[0, -1].flat[0]))
        weights = {} if used is None else dict(zip([*self.names, "keep"],
                                                   used[0].reshape(self.k + 1, -1).mean(axis=1).tolist()))
        weight_map = used[0] if used is not None and used.ndim == 4 else None
        return Restoration(out[0].transpose(1, 2, 0), weights, weight_map)

    def weights(self, image: np.ndarray, mode: str) -> np.ndarray | None:
        """1 x (K+1) weights (keep 0), 1 x (K+1) x h x w in pw, None for the backbone alone."""
        if mode == "none":
            return None
        if self.estimator is None:
            raise AbairError(self.described, f"mode {mode} needs {ESTIMATOR_GRAPH}, which this release lacks")
        if mode == "pw":
            self.pw_source(None)
            return self.estimator.run(["weight_map"], {"image": image})[0].astype(np.float32)
        weights, logits = self.estimator.run(["weights", "logits"], {"image": image})
        if mode == "oh":
            # Estimator.weights(mode "oh"): one-hot of the argmax over the adapters and `base`
            weights = np.zeros((1, self.k + 1), np.float32)
            best = int(np.argmax(logits[0]))
            if best < self.k:
                weights[0, best] = 1.0
        return np.array(weights, dtype=np.float32)

    def network_runner(self, used: np.ndarray | None, mode: str, size: tuple[int, int]):
        """fn(crop, (rows, cols)) -> the network's output (unclamped) for that part of the image:
        a merged adapter's graph for oh where there is one, the mix graph for one weight vector
        (sw, oh, none: the blend folded into the base weights), else the map graph."""
        weights = np.zeros((1, self.k + 1), np.float32) if used is None else used.copy()
        weights[:, -1] = 0.0   # keep comes after the network
        if mode == "oh" and used is not None and weights[0, :self.k].max() == 1.0 \
                and self.names[int(np.argmax(weights[0, :self.k]))] in self.merged:
            merged = self.merged[self.names[int(np.argmax(weights[0, :self.k]))]]
            return lambda crop, where: self.run_network(merged, crop)
        if weights.ndim == 2 and self.mix is not None:
            return lambda crop, where: self.run_network(self.mix, crop, weights=weights)
        weight_map = weights if weights.ndim == 4 else weights[:, :, None, None]

        def run(crop: np.ndarray, where: tuple[slice, slice]) -> np.ndarray:
            window = weight_map
            if window.shape[-2:] != (1, 1) and crop.shape[-2:] != size:
                window = arrays.map_window(weight_map, size, *where, multiple=1)   # at the tile's own size
            return self.run_network(self.restorer, crop, weight_map=window)

        return run

    def run_network(self, session, image: np.ndarray, weights: np.ndarray | None = None,
                    weight_map: np.ndarray | None = None) -> np.ndarray:
        """A restorer graph on 1 x 3 x h x w (with its weights or map): `network`, h x w."""
        h, w = image.shape[-2:]
        feeds = {} if weights is None else {"weights": weights}
        if arrays.reflect_fits(h, w):
            feeds["image"] = image
            if weight_map is not None:
                feeds["weight_map"] = weight_map
            return session.run(["network"], feeds)[0]
        # the backbone pads this image by repeating its edge: so here, the map with it (at the
        # image's size first), and the graph pads nothing
        feeds["image"] = arrays.pad_edge(image)
        if weight_map is not None:
            if weight_map.shape[-2:] != (1, 1) and weight_map.shape[-2:] != (h, w):
                weight_map = arrays.map_window(weight_map, (h, w), slice(0, h), slice(0, w), multiple=1)
            feeds["weight_map"] = arrays.pad_edge(weight_map)
        return session.run(["network"], feeds)[0][..., :h, :w]


@register("onnxruntime", help="a release folder's ONNX graphs (abair export --onnx), run with onnxruntime: no torch, "
                              "no MLflow; fp32, whole images or local tiling", check=check_options)
def load(model: str, device: str = "auto", precision: str = "fp32", keep_seg_head: bool = False) -> OnnxRuntimeBackend:
    check_options("auto", precision)
    onnxruntime()
    folder, release = graphs_folder(model)
    return OnnxRuntimeBackend(folder, release, model, device)
