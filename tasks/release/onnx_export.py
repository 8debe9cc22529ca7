"""ONNX graphs of an ABAIR system, each checked against the torch model before it is kept.

    export_onnx(restorer, release / "onnx", merge=("rain",)) -> the record config.json keeps

The graphs (torch.onnx.export with dynamo=True, opset OPSET; batch, height and width dynamic):

    estimator.onnx      image B x 3 x H x W in [0, 1] -> weights B x (K+1) (the K adapter weights of
                        mode sw, then a keep column of 0), logits B x C (the K adapters, then `base`
                        with do-no-harm: mode oh is the one-hot of their argmax, all zeros when base
                        wins) and, with a dense head, weight_map B x (K+1) x h x w (mode pw).
    keep.onnx           (image, network_output) -> keep B x 1 (with a keep head only): the keep
                        head looks at the input and at what the network made of it, so it runs
                        after the restorer graph: out = keep * image + (1 - keep) * restored, with
                        the tone lock (models/tone.py) applied to `restored` before the blend (in
                        numpy: tasks/serve/backends/arrays.lock_tone; not in the graphs), at the
                        share the metadata's tone_calibration ([scale, bias] or null) maps.
    restorer.onnx       (image, weight_map B x (K+1) x h x w at any h x w) -> restored (clamped to
                        [0, 1], with the map's keep column blended in) and network (the network's
                        raw output, before clamping and keep: local tiling blends tiles of it).
                        One graph serves every mode: a 1 x 1 map is sw or oh, all zeros the
                        backbone alone, a dense map pw. The map is resized as the torch Restorer
                        does (models.restorer.map_window: bilinear to H x W, the bottom/right
                        padding to a multiple of 8 repeating the last row/column, area-averaged to
                        each level: models.adapters.base.PixelWeights).
    restorer-mix.onnx   (LoRA) (image, weights 1 x (K+1)) -> restored, network: one blend for the
                        whole batch, folded into the base weights inside the graph (the torch sw
                        path, AdapterBank.merge_mix): sw, oh and none at the backbone's own cost
                        (the map graph runs every adapter at every pixel: 1.7x slower on the
                        default system with five adapters).
    restorer_NAME.onnx  (--merge NAME, LoRA only) image -> restored, network: adapter NAME folded into
                        the base weights (AdapterBank.merge): mode oh on that adapter, with
                        constant weights.

Every graph is run with onnxruntime on CHECK_SIZES (a batch of two images: seeded uniform noise
and a smooth synthetic photo; for the restorer a random low-resolution map whose adapter weights
sum to at most one, and a constant map against the torch sw path) and compared with the torch
model; a difference over the bound stops the export and leaves no file under the graph's name.
Bounds: 1e-4 in fp32 for graphs without adapters or with LoRA (measured: under 1e-6). AdaptIR:
ADAPTIR_BOUND = 1e-2. Its frequency branch takes the phase of every spectral bin and scales it
(phase_scale), and a phase is not continuous: a bin whose value is real and negative (the DC and
Nyquist bins, that are their own conjugate) has phase pi or -pi depending on the sign its
imaginary part rounds to, which differs between torch's FFT and onnxruntime's DFT (and between
torch's own runs of different sizes), and phase_scale != 1 turns pi and -pi into different
outputs. Measured on tiny random AdaptIR systems: 1e-4 to 2e-3 on the restored image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import SIZE_MULTIPLE
from models.restorer import Restorer, map_window
from tasks.core import storage
from tasks.core.errors import AbairError

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
CHECK_SIZES = ((64, 64), (96, 136), (160, 120))
BOUND = 1e-4            # fp32, graphs without adapters and LoRA graphs
ADAPTIR_BOUND = 1e-2    # AdaptIR: the phase branch's branch cut (module docstring; measured up to 2e-3)
KIND_BOUNDS = {"lora": BOUND, "adaptir": ADAPTIR_BOUND}
SEED = 0
# The traced example's size: neither a multiple of 8 nor smaller than a crop of the default
# estimator; any size works, as no branch depends on it.
EXAMPLE_SIZE = (67, 93)
METADATA_PREFIX = "abair."
# Not restorer_<name>.onnx: that is a merged adapter's (adapter names are letters, digits, _ and -).
MIX_GRAPH = "restorer-mix.onnx"


# ------------------------------------------------------------------------------------------------
# The graphs, as modules torch.export traces


def pad_amounts(height, width) -> tuple:
    """Bottom and right padding to the next multiple of 8, written so that a traced graph knows
    the padded size is a multiple of 8 (a `-h % 8` form leaves symbolic remainders the backbone's
    shapes then carry through every level, and the export takes several times longer)."""
    return (SIZE_MULTIPLE * ((height + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE) - height,
            SIZE_MULTIPLE * ((width + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE) - width)


def run_network(backbone: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The backbone on B x 3 x H x W, padded by reflection as Backbone.forward pads images whose
    sides exceed their padding (5 px and up), without its branch on the size: the padded size is
    a multiple of 8 by its expression, so pad_to_multiple inside is a no-op that no guard decides
    and the graph holds for every size. Unclamped, cropped back to H x W."""
    h, w = image.shape[-2:]
    pad_h, pad_w = pad_amounts(h, w)
    padded = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
    return backbone(padded)[..., :h, :w]


class EstimatorGraph(nn.Module):
    def __init__(self, restorer: Restorer):
        super().__init__()
        self.estimator = restorer.estimator

    def forward(self, image: torch.Tensor):
        estimator = self.estimator
        if estimator.has_dense:
            logits, pixels = estimator.logits_and_map(image)
            return (estimator.weights_from_logits(logits), logits,
                    estimator.map_from_logits(pixels))
        logits = estimator.logits(image)
        return estimator.weights_from_logits(logits), logits


class KeepGraph(nn.Module):
    def __init__(self, restorer: Restorer):
        super().__init__()
        self.estimator = restorer.estimator

    def forward(self, image: torch.Tensor, network_output: torch.Tensor):
        return self.estimator.keep(image, network_output)


class RestorerGraph(nn.Module):
    """(image, weight map) -> (restored, network): the torch Restorer's pixel-wise path."""

    def __init__(self, restorer: Restorer):
        super().__init__()
        self.restorer = restorer

    def forward(self, image: torch.Tensor, weight_map: torch.Tensor):
        restorer = self.restorer
        k = len(restorer.names)
        h, w = image.shape[-2:]
        pad_h, pad_w = pad_amounts(h, w)
        adapters = restorer._to_bank_columns(weight_map[:, :k])
        level = F.interpolate(adapters, size=(h, w), mode="bilinear", align_corners=False)
        level = F.pad(level, (0, pad_w, 0, pad_h), mode="replicate")
        with restorer.bank.weights(level, traced=True):
            network = run_network(restorer.backbone, image)
        keep = F.interpolate(weight_map[:, k:], size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        restored = network.clamp(0.0, 1.0)
        return restored + keep * (image - restored), network


class MixGraph(nn.Module):
    """(image, weights 1 x (K+1)) -> (restored, network): one blend for the batch, folded into the
    base weights inside the graph (MergeableLayer.folded_forward): the torch sw path."""

    def __init__(self, restorer: Restorer):
        super().__init__()
        self.restorer = restorer

    def forward(self, image: torch.Tensor, weights: torch.Tensor):
        restorer = self.restorer
        k = len(restorer.names)
        with restorer.bank.weights(restorer._to_bank_columns(weights[:, :k]), traced=True, fold=True):
            network = run_network(restorer.backbone, image)
        keep = weights[:, k:, None, None].clamp(0.0, 1.0)
        restored = network.clamp(0.0, 1.0)
        return restored + keep * (image - restored), network


class MergedGraph(nn.Module):
    """image -> (restored, network) with the bank's merged adapter in the base weights."""

    def __init__(self, restorer: Restorer):
        super().__init__()
        self.backbone = restorer.backbone

    def forward(self, image: torch.Tensor):
        network = run_network(self.backbone, image)
        return network.clamp(0.0, 1.0), network


# ------------------------------------------------------------------------------------------------
# Check inputs


def check_images(height: int, width: int, seed: int = SEED) -> torch.Tensor:
    """2 x 3 x H x W: seeded uniform noise, and a smooth synthetic photo (gradients, soft
    shapes and a little texture)."""
    generator = torch.Generator().manual_seed(seed + 1000 * height + width)
    noise = torch.rand(3, height, width, generator=generator)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    photo = torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - x),
                         0.5 + 0.3 * torch.sin(6 * x + 4 * y) * torch.cos(5 * y)])
    photo = photo + 0.15 * torch.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02)
    photo = photo + 0.02 * torch.sin(40 * x) * torch.sin(33 * y)
    return torch.stack([noise, photo.clamp(0, 1)]).float()


def random_map(batch: int, k: int, height: int, width: int, seed: int = SEED) -> torch.Tensor:
    """B x (K+1) x h x w: adapter weights in [0, 1] summing to at most one per pixel, keep in [0, 0.5]."""
    generator = torch.Generator().manual_seed(seed + 7)
    raw = torch.rand(batch, k + 1, height, width, generator=generator)
    adapters = raw[:, :k] / (raw[:, :k].sum(1, keepdim=True) + torch.rand(batch, 1, height, width, generator=generator))
    return torch.cat([adapters, 0.5 * raw[:, k:]], dim=1)


def constant_weights(batch: int, k: int, seed: int = SEED) -> torch.Tensor:
    """B x (K+1), the same row for the whole batch (so the LoRA torch path merges the blend)."""
    generator = torch.Generator().manual_seed(seed + 11)
    raw = torch.rand(k + 2, generator=generator)
    row = torch.cat([raw[:k] / raw[:k + 1].sum(), 0.4 * raw[k + 1:]])
    return row[None].expand(batch, -1).contiguous()


# ------------------------------------------------------------------------------------------------
# One graph: trace, name, check, keep


@dataclass
class GraphSpec:
    file: str
    role: str
    module: nn.Module
    inputs: dict[str, str]                    # input name -> shape, as the README and card show it
    outputs: dict[str, str]
    dynamic: dict[str, dict[int, str]]        # input name -> {axis: dimension name}
    example: tuple
    cases: Callable[[int, int], list[tuple[str, tuple, dict[str, torch.Tensor]]]]   # (label, inputs, expected outputs)
    bound: float
    metadata: dict[str, str] = field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def export_onnx(restorer: Restorer, out_dir: Path, merge: Sequence[str] = (),
                sizes: Sequence[tuple[int, int]] = CHECK_SIZES, log: Callable[[str], None] = print) -> dict:
    """Write the graphs of `restorer` (estimator.onnx, keep.onnx with a keep head, restorer.onnx,
    restorer-mix.onnx for LoRA, restorer_NAME.onnx per merged adapter) to `out_dir`, each checked
    with onnxruntime against the torch model on `sizes`; returns the record (exporter, opset,
    versions, per graph its file (relative to `out_dir`), role, inputs, outputs, sha256 and check
    figures). A check over its bound is an AbairError naming the graph, and that graph is not left
    under its name (those written before it are: the caller writes into a temporary folder).
    The restorer is moved to the CPU and put in eval mode."""
    modules = _onnx_modules()
    if restorer.bank is None or not restorer.names:
        raise AbairError("--onnx", "the system has no adapters: there is no restorer graph to export")
    merge = list(dict.fromkeys(merge or ()))
    for name in merge:
        if name not in restorer.names:
            raise AbairError("--merge", f"{name!r} is not an adapter of this system ({', '.join(restorer.names)})")
        if not restorer.bank.kind.mergeable:
            raise AbairError("--merge", f"{name}: {restorer.bank.kind.name} adapters are not mergeable (not linear in "
                                        "the layer's input): only LoRA folds into the base weights")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    restorer = restorer.to("cpu").eval()
    common = system_metadata(restorer)
    graphs = []
    # the graphs hold the network and the caller's keep blend; the tone lock runs after them in the
    # runtime (tasks/serve/backends/arrays.lock_tone), as the estimator's keep does: checked without it
    with restorer.without_tone_lock():
        for spec in graph_specs(restorer, merge):
            graphs.append(export_graph(spec, out_dir, sizes, {**common, **spec.metadata}, log))
    return {"exporter": EXPORTER, "opset": OPSET, "torch": torch.__version__,
            "onnx": modules["onnx"].__version__, "onnxruntime": modules["onnxruntime"].__version__,
            "onnxscript": modules["onnxscript"].__version__,
            "adapters": list(restorer.names), "weight_columns": list(restorer.weight_names),
            "kind": restorer.bank.kind.name, "map_size": _map_size(restorer),
            "check_inputs": "a batch of two per size: seeded uniform noise and a smooth synthetic photo; restorer graphs "
                            "also with a random low-resolution weight map (adapter weights summing to at most one, keep "
                            "in [0, 0.5]) and a constant one (against the torch sw path)",
            "graphs": graphs}


def _onnx_modules() -> dict:
    found = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            found[name] = __import__(name)
        except ModuleNotFoundError:
            raise AbairError("--onnx", f"ONNX export needs {name} (pip install -e \".[onnx]\")") from None
    return found


def _map_size(restorer: Restorer) -> list[int] | None:
    estimator = restorer.estimator
    return list(estimator.map_size) if estimator is not None and estimator.has_dense else None


def system_metadata(restorer: Restorer) -> dict[str, str]:
    """What every graph carries in its metadata_props: enough for a runtime without config.json
    (tasks/serve/backends/onnxruntime_backend.py reads it)."""
    estimator = restorer.estimator
    try:
        pw_source = restorer.resolve_pw_source()
    except ValueError:   # neither a dense head nor a segmentation head: no mode pw
        pw_source = None
    return {"adapters": json.dumps(list(restorer.names)), "k": str(len(restorer.names)), "pw_source": json.dumps(pw_source),
            "weight_columns": json.dumps(list(restorer.weight_names)), "kind": restorer.bank.kind.name,
            "map_size": json.dumps(_map_size(restorer)),
            "keep_head": json.dumps(estimator is not None and estimator.keep_head is not None),
            "tone_lock": json.dumps(bool(restorer.tone_lock)),
            "tone_calibration": json.dumps(None if estimator is None or estimator.tone_calibration is None else
                                           [float(estimator.tone_calibration.scale), float(estimator.tone_calibration.bias)]),
            "backbone_dim": str(restorer.backbone.config.dim),
            "opset": str(OPSET), "exporter": f"{EXPORTER}, torch {torch.__version__}"}


def graph_specs(restorer: Restorer, merge: Sequence[str]) -> list[GraphSpec]:
    k = len(restorer.names)
    bound = KIND_BOUNDS.get(restorer.bank.kind.name, BOUND)   # a kind not measured yet: the strict bound
    estimator = restorer.estimator
    example = torch.rand(2, 3, *EXAMPLE_SIZE, generator=torch.Generator().manual_seed(SEED))
    image_axes = {0: "batch", 2: "height", 3: "width"}
    image_shape = "batch x 3 x height x width"
    specs = []

    if estimator is not None:
        outputs = {"weights": f"batch x {k + 1}", "logits": f"batch x {estimator.num_outputs + int(estimator.base is not None)}"}
        if estimator.has_dense:
            outputs["weight_map"] = f"batch x {k + 1} x {estimator.map_size[0]} x {estimator.map_size[1]}"

        def estimator_cases(h, w):
            images = check_images(h, w)
            expected = {"weights": estimator.weights(images, "sw"), "logits": estimator.logits(images)}
            if estimator.has_dense:
                expected["weight_map"] = estimator.weight_map(images)
            return [("images", (images,), expected)]

        specs.append(GraphSpec("estimator.onnx", "estimator: adapter weights (sw), logits (oh)"
                               + (", per-pixel weight map (pw)" if estimator.has_dense else ""),
                               EstimatorGraph(restorer), {"image": image_shape}, outputs, {"image": image_axes},
                               (example,), estimator_cases, BOUND, {"graph": "estimator"}))

        if estimator.keep_head is not None:
            def keep_cases(h, w):
                images = check_images(h, w)
                network, _ = restorer.restore(images, mode="none")
                return [("images", (images, network), {"keep": estimator.keep(images, network)})]

            specs.append(GraphSpec("keep.onnx", "keep: the share of the input blended back, from the input and the "
                                   "network's output", KeepGraph(restorer),
                                   {"image": image_shape, "network_output": image_shape}, {"keep": "batch x 1"},
                                   {"image": image_axes, "network_output": image_axes},
                                   (example, example.flip(-1)), keep_cases, BOUND, {"graph": "keep"}))

    def restorer_cases(h, w):
        images = check_images(h, w)
        low = random_map(2, k, 3 + h // 40, 4 + w // 40)
        restored, _ = restorer.restore(images, mode="pw", weights=low)
        adapters = restorer._to_bank_columns(low[:, :k])
        window = map_window(adapters, (h, w), slice(0, h), slice(0, w), SIZE_MULTIPLE)
        with torch.no_grad(), restorer.bank.weights(window):
            network = restorer.backbone(images)
        constant = constant_weights(2, k)
        sw, _ = restorer.restore(images, mode="sw", weights=constant)
        return [("pw map", (images, low), {"restored": restored, "network": network}),
                ("constant map", (images, constant[:, :, None, None]), {"restored": sw})]

    specs.append(GraphSpec("restorer.onnx", "restorer: any weight map (sw and oh as a 1 x 1 map, pw, none as zeros)",
                           RestorerGraph(restorer), {"image": image_shape, "weight_map": f"batch x {k + 1} x map_height x map_width"},
                           {"restored": image_shape, "network": image_shape},
                           {"image": image_axes, "weight_map": {0: "batch", 2: "map_height", 3: "map_width"}},
                           (example, random_map(2, k, 5, 7)), restorer_cases, bound, {"graph": "restorer"}))

    if restorer.bank.kind.mergeable:
        def mix_cases(h, w):
            images = check_images(h, w)
            constant = constant_weights(1, k)
            sw, _ = restorer.restore(images, mode="sw", weights=constant.expand(2, -1))
            one_hot = torch.tensor([[0.0] * (k - 1) + [1.0, 0.0]])
            oh, _ = restorer.restore(images, mode="oh", weights=one_hot.expand(2, -1))
            return [("sw", (images, constant), {"restored": sw}), ("oh", (images, one_hot), {"restored": oh})]

        specs.append(GraphSpec(MIX_GRAPH, "restorer with one blend for the batch folded into the base weights (sw, oh, "
                               "none at the backbone's own cost)", MixGraph(restorer),
                               {"image": image_shape, "weights": f"1 x {k + 1}"},
                               {"restored": image_shape, "network": image_shape}, {"image": image_axes},
                               (example, constant_weights(1, k)), mix_cases, bound, {"graph": "restorer_mix"}))

    for name in merge:
        def merged_cases(h, w, name=name):
            images = check_images(h, w)
            one_hot = torch.tensor([[float(n == name) for n in restorer.names] + [0.0]] * 2)
            restored, _ = restorer.restore(images, mode="oh", weights=one_hot)
            return [("images", (images,), {"restored": restored})]

        specs.append(GraphSpec(f"restorer_{name}.onnx", f"restorer with adapter {name} merged (mode oh on {name})",
                               MergedGraph(restorer), {"image": image_shape},
                               {"restored": image_shape, "network": image_shape}, {"image": image_axes},
                               (example,), merged_cases, bound, {"graph": "restorer_merged", "merged": name},
                               context=lambda name=name: merged(restorer, name)))
    return specs


@contextlib.contextmanager
def merged(restorer: Restorer, name: str):
    restorer.bank.merge(name)
    try:
        yield
    finally:
        restorer.bank.unmerge()


def export_graph(spec: GraphSpec, out_dir: Path, sizes, metadata: dict[str, str], log) -> dict:
    """Trace, name and check one graph; it goes under its name only once its checks pass."""
    import onnx

    start = time.perf_counter()
    final = out_dir / spec.file
    with storage.atomic_path(final) as tmp:
        # the graph is written while the context holds (a merged adapter); the checks run after,
        # on the torch model as it serves
        with spec.context(), torch.no_grad():
            model = trace(spec)
            name_dimensions(model, spec)
            onnx.helper.set_model_props(model, {METADATA_PREFIX + key: value for key, value in metadata.items()})
            model.doc_string = f"ABAIR {spec.role}"
            onnx.save_model(model, str(tmp))
        traced_s = time.perf_counter() - start
        checks = check_graph(spec, tmp, sizes)
        worst = max(checks, key=lambda c: c["max_abs_diff"])
        if not worst["passed"]:
            raise AbairError(final, f"differs from the torch model by {worst['max_abs_diff']:.2e} at "
                                    f"{worst['size'][0]}x{worst['size'][1]} ({worst['worst_output']}; bound "
                                    f"{spec.bound:.0e}): export stopped")
    log(f"{final}: exported in {traced_s:.0f} s, checked on {', '.join(f'{h}x{w}' for h, w in sizes)}: "
        f"max |difference| {worst['max_abs_diff']:.1e} (bound {spec.bound:.0e})")
    return {"file": spec.file, "role": spec.role,
            "inputs": [f"{name}: {shape}" for name, shape in spec.inputs.items()],
            "outputs": [f"{name}: {shape}" for name, shape in spec.outputs.items()],
            "bytes": final.stat().st_size, "sha256": _sha256(final), "bound": spec.bound, "checks": checks,
            "seconds": round(time.perf_counter() - start, 1)}


def trace(spec: GraphSpec):
    """The ModelProto of spec.module (its exporter chatter kept off stdout)."""
    dynamic = {name: {axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic[name]} if name in spec.dynamic else None
               for name in spec.inputs}
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(spec.module.eval(), spec.example, dynamo=True, dynamic_shapes=dynamic,
                                    input_names=list(spec.inputs), output_names=list(spec.outputs),
                                    opset_version=OPSET, optimize=True, verbose=False)
    return program.model_proto


def name_dimensions(model, spec: GraphSpec) -> None:
    """The exporter names dynamic dimensions s0, s53...; give them the names the README uses
    (batch, height, width, map_height, map_width), in expressions too."""
    inputs = {value.name: value for value in model.graph.input}
    renames: dict[str, str] = {}
    for name, axes in spec.dynamic.items():
        dims = inputs[name].type.tensor_type.shape.dim
        for axis, label in axes.items():
            if dims[axis].dim_param and re.fullmatch(r"s\d+", dims[axis].dim_param):
                renames.setdefault(dims[axis].dim_param, label)
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)


def check_graph(spec: GraphSpec, path: Path, sizes) -> list[dict]:
    """Per size: the largest absolute difference between onnxruntime's outputs and the torch
    model's, over every case and output."""
    from tasks.release.onnx_runtime import new_session

    session = new_session(path, device="cpu")
    names = [output.name for output in session.get_outputs()]
    checks = []
    for h, w in sizes:
        per_output: dict[str, float] = {}
        with torch.no_grad():
            cases = spec.cases(h, w)
        for label, inputs, expected in cases:
            feeds = {name: tensor.detach().float().contiguous().numpy() for name, tensor in zip(spec.inputs, inputs)}
            got = dict(zip(names, session.run(None, feeds)))
            for output, reference in expected.items():
                difference = float(np.abs(got[output] - reference.float().numpy()).max())
                if not math.isfinite(difference):
                    difference = math.inf
                per_output[f"{output} ({label})" if len(cases) > 1 else output] = difference
        worst = max(per_output, key=per_output.get)
        checks.append({"size": [h, w], "max_abs_diff": per_output[worst], "bound": spec.bound,
                       "passed": per_output[worst] <= spec.bound, "worst_output": worst,
                       "outputs": {key: float(f"{value:.3g}") for key, value in per_output.items()}})
    return checks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
