"""`abair restore`: images in, restored images out, in the form they came in.

What is kept: size, bit depth (8 or 16 bit in, the same out), grayscale (restored as three equal
channels, written back as one), alpha (set aside, re-attached untouched), format (JPEG out at the
quality estimated from the input's quantisation tables). EXIF orientation is applied on reading,
so outputs are upright and carry no orientation tag. Any size: large images run in tiles under a
pixel budget (exact by default: the same pixels as whole-image inference; see models/restorer.py)
while the estimator still sees the whole image once.

The model is a registry reference (`models:/abair-restorer@champion`, `models:/abair-restorer/3`),
a local folder of components (backbone.safetensors, adapters/, estimator.safetensors) or a
downloaded pyfunc model folder.

Modes: sw, oh, pw (a weight map per pixel, from the estimator's dense head or the backbone's
segmentation head: `pw_source`) and none (the backbone alone). With `save_maps` (pw only), a picture
of the map each image was restored with is written beside it as `<output stem>.map.png`
(tasks/core/weight_maps.py: one colour per adapter over a faded copy of the input, a legend below).

What restores each float image is a backend (tasks/serve/backends: `torch`, the default, or
`onnxruntime` on a release folder's ONNX graphs); this module reads, plans, decodes, encodes and
writes the same way for both.
"""

from __future__ import annotations

import glob
import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.core import imageio, paths, storage
from tasks.core.components import load_system_dir
from tasks.core.errors import AbairError
from tasks.core.weight_maps import LEGEND_ROW, legend_strip, render_weight_map
from tasks.registry import store
from tasks.serve import backends, memory
from tasks.serve.inference import DEFAULT_MAX_PIXELS, mode_problem, needs_seg_head, planar_float_rgb, to_stored
from tasks.serve.jpeg import estimate_jpeg_quality

log = logging.getLogger(__name__)

DEFAULT_MODEL = f"models:/{store.RESTORER}@{store.CHAMPION}"
# Used when a JPEG's quantisation tables cannot be read.
DEFAULT_JPEG_QUALITY = 95
MIN_SIDE = 2
# What --save-maps adds to an output's stem: `restored/photo.jpg` gets `restored/photo.map.png`.
MAP_SUFFIX = ".map.png"


# ------------------------------------------------------------------------------------------------
# The model


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", keep_seg_head: bool = False):
    """(Restorer, description) from a registry reference or a local folder; keep_seg_head: keep
    the Phase I segmentation head (the pw mode's seg source)."""
    # torch comes in here, not on import: the CLI's parser imports this module for its defaults
    from tasks.core.device import pick_device

    torch_device = pick_device(device, where="--device")
    if spec.startswith("models:/"):
        version = store.resolve(spec)
        if version.name != store.RESTORER:
            raise AbairError(spec, f"is a {version.name} version; restoring needs an {store.RESTORER} model")
        with tempfile.TemporaryDirectory(prefix="abair-model-") as tmp:
            folder = store.download_components(version, Path(tmp) / paths.CHECKPOINTS)
            restorer = load_system_dir(folder, torch_device, keep_seg_head)
        return restorer, f"{spec} ({version.name} version {version.version})"
    path = Path(spec)
    if not path.exists():
        raise AbairError(spec, "no such model folder (and not a models:/ URI)")
    from tasks.release.bundle import is_release, load_release

    if is_release(path):   # an `abair export` folder: every file checked against its config.json first
        return load_release(path, torch_device, keep_seg_head), f"{path} (release)"
    return load_system_dir(store.components_dir(path), torch_device, keep_seg_head), str(path)


def format_weights(weights: dict[str, float]) -> str:
    """Adapters by weight, then what the adapters leave to the backbone alone and `keep` (the share
    of the input blended back): "rain 0.62, noise 0.10; backbone 0.28; keep 0.05"."""
    adapters = {n: w for n, w in weights.items() if n != "keep"}
    text = ", ".join(f"{n} {w:.2f}" for n, w in sorted(adapters.items(), key=lambda item: (-item[1], item[0])))
    if "keep" in weights:
        text += f"; backbone {max(0.0, 1.0 - sum(adapters.values())):.2f}; keep {weights['keep']:.2f}"
    return text


# ------------------------------------------------------------------------------------------------
# Reading and writing in the input's own form


@dataclass
class Decoded:
    rgb: np.ndarray              # float32 HxWx3 in [0, 1], upright
    dtype: np.dtype              # stored sample type (uint8, uint16 or float32)
    channels: int                # stored channel count (1, 3 or 4)
    gray: bool                   # stored as gray, or colour with three equal channels
    alpha: np.ndarray | None     # the stored alpha channel, upright, untouched
    orientation: int             # EXIF orientation applied (1: none)
    jpeg_quality: int | None     # estimated source quality for JPEG inputs
    quality_estimated: bool = False


def exif_orientation(data: bytes) -> int:
    """EXIF orientation (1-8) of an encoded image, 1 when absent or unreadable."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - no EXIF reader for this format: nothing to apply
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF transform that makes the stored pixels upright (as viewers display them)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](pixels))


def is_jpeg(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jpg", ".jpeg")


def decode_image(data: bytes, name: str, max_image_pixels: int = imageio.MAX_IMAGE_PIXELS) -> Decoded:
    raw = imageio.decode(data, name, max_image_pixels)   # RGB(A), as stored: uint8 / uint16 / float
    if raw.ndim == 3 and raw.shape[2] == 2:  # gray + alpha (OpenCV usually expands it to 4)
        raw = np.stack([raw[:, :, 0]] * 3 + [raw[:, :, 1]], axis=2)
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    if min(raw.shape[:2]) < MIN_SIDE:
        raise AbairError(name, f"image is too small to restore ({raw.shape[1]}x{raw.shape[0]} px)")
    if channels not in (1, 3, 4):
        raise AbairError(name, f"{channels}-channel images are not supported (gray, RGB or RGBA)")
    orientation = exif_orientation(data)
    raw = apply_orientation(raw, orientation)
    alpha = raw[:, :, 3].copy() if channels == 4 else None
    quality, estimated = None, False
    if is_jpeg(name) or data[:2] == b"\xff\xd8":
        quality = estimate_jpeg_quality(data)
        estimated = quality is not None
        quality = quality or DEFAULT_JPEG_QUALITY
    return Decoded(rgb=planar_float_rgb(raw), dtype=raw.dtype, channels=channels, gray=imageio.is_grayscale(raw),
                   alpha=alpha, orientation=orientation, jpeg_quality=quality, quality_estimated=estimated)


def encode_like(restored: np.ndarray, source: Decoded, suffix: str, quality: int | None = None) -> bytes:
    """The restored float RGB image encoded in the source's form (bit depth, channels, alpha, format)."""
    img = restored
    if source.gray:
        gray = cv2.cvtColor(np.ascontiguousarray(img, dtype=np.float32), cv2.COLOR_RGB2GRAY)
        img = gray if source.channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    pixels = to_stored(img, source.dtype)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        if source.alpha is not None:
            pixels = np.concatenate([pixels, source.alpha[:, :, None].astype(pixels.dtype)], axis=2)
    elif source.alpha is not None:  # gray output, alpha kept: OpenCV writes gray+alpha as BGRA
        pixels = np.concatenate([np.repeat(pixels[:, :, None], 3, axis=2), source.alpha[:, :, None]], axis=2)
    suffix = suffix.lower()
    params: list[int] = []
    if suffix in (".jpg", ".jpeg"):
        if pixels.dtype != np.uint8:
            raise AbairError(suffix, "JPEG holds 8-bit images only")
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality or source.jpeg_quality or DEFAULT_JPEG_QUALITY)]
    elif suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(suffix, pixels, params)
    if not ok:
        raise AbairError(suffix, f"could not encode a {pixels.dtype} image with {pixels.shape[-1] if pixels.ndim == 3 else 1} channels")
    return buf.tobytes()


# ------------------------------------------------------------------------------------------------
# Which files, written where


@dataclass(frozen=True)
class Job:
    source: str
    target: Path


def expand(spec: str, out: Path) -> list[Job]:
    """The jobs of one input: a folder (recursive, relative layout kept), a file, or a glob."""
    path = Path(spec)
    if path.is_dir():
        entries = storage.list_files(path, imageio.IMAGE_SUFFIXES)
        if not entries:
            raise AbairError(spec, "no images in this folder")
        return [Job(e.uri, out / e.relpath) for e in entries]
    if path.is_file():
        return [Job(str(path), out / path.name)]
    if glob.has_magic(spec):
        matches = sorted(m for m in glob.glob(spec, recursive=True)
                         if Path(m).is_file() and m.lower().endswith(imageio.IMAGE_SUFFIXES))
        if not matches:
            raise AbairError(spec, "no images match this pattern")
        return [Job(m, out / Path(m).name) for m in matches]
    if path.is_symlink():
        raise AbairError(spec, "a broken symbolic link (or a loop of them)")
    raise AbairError(spec, "no such file or folder")


def map_path(target: Path) -> Path:
    """Where --save-maps writes the weight-map picture of the image restored to `target`."""
    return target.with_name(target.stem + MAP_SUFFIX)


def plan(inputs: list[str], out: str | Path, overwrite: bool = False, save_maps: bool = False) -> list[Job]:
    """Every input image and its output path; the first input that names nothing is an error."""
    jobs, problems = plan_each(inputs, out, overwrite, save_maps)
    if problems:
        raise problems[0]
    return jobs


def plan_each(inputs: list[str], out: str | Path, overwrite: bool = False,
              save_maps: bool = False) -> tuple[list[Job], list[AbairError]]:
    """Every input image and its output path: folders keep their relative layout, files and
    glob matches go to `out` by name; and one error per input that names nothing to restore (the
    others go on). Refuses to overwrite an input (unless `overwrite`) and to write two outputs to
    one name (with `save_maps`, the weight-map pictures count as outputs)."""
    out = Path(out)
    jobs: list[Job] = []
    problems: list[AbairError] = []
    for spec in inputs:
        try:
            jobs += expand(spec, out)
        except AbairError as exc:
            problems.append(exc)
    seen: dict[Path, str] = {}
    sources = {Path(j.source).resolve() for j in jobs}
    for job in jobs:
        outputs = [(job.target, "restored image")] + ([(map_path(job.target), "weight map")] if save_maps else [])
        for written, what in outputs:
            target = written.resolve()
            if target in seen:
                raise AbairError(job.source, f"its {what} would be written to {written} as {seen[target]} is too "
                                             "(restore them separately)")
            seen[target] = f"{job.source}'s {what}"
            if target in sources and not overwrite:
                whose = "its" if target == Path(job.source).resolve() else f"{job.source}'s"
                raise AbairError(written, f"would be overwritten by {whose} {what} (choose another --out, or pass --overwrite)")
    return jobs, problems


# ------------------------------------------------------------------------------------------------
# The command


def restore_files(inputs: list[str], model: str = DEFAULT_MODEL, out: str | Path = "restored", mode: str = "sw",
                  device: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = False,
                  quality: int | None = None, progress: bool | None = None, echo=print, tiling: str = "auto",
                  max_image_pixels: int = imageio.MAX_IMAGE_PIXELS,
                  memory_budget: int | str | None = memory.DEFAULT_BUDGET, pw_source: str | None = None,
                  save_maps: bool = False, backend: str = backends.DEFAULT_BACKEND, precision: str = "fp32") -> dict:
    """Restore images to `out`; returns {"images": [...], "failed": [...], throughput}. One bad image
    is reported and skipped; the run then ends with an AbairError naming how many failed.
    tiling: auto (exact where it fits `memory_budget`, else local), exact or local; an image no
    tiling fits is refused before it is decoded (tasks/serve/memory.py). mode pw: `pw_source`
    (dense | seg | None: what the system has) makes the weight map; `save_maps` writes its picture
    beside each restored image (`<stem>.map.png`). backend: what restores each float image
    (tasks/serve/backends: torch, onnxruntime) at `precision` (fp32 | fp16 | bf16, as it allows)."""
    from tqdm import tqdm

    check_options(mode, pw_source, save_maps)
    if tiling not in memory.TILINGS:
        raise AbairError("--tiling", f"must be one of {', '.join(memory.TILINGS)}, got {tiling!r}")
    backend_kind = backends.get(backend)
    backend_kind.check(tiling, precision)
    try:
        budget = memory.parse_bytes(memory_budget)
    except ValueError as exc:
        raise AbairError("--memory-budget", str(exc)) from None
    jobs, problems = plan_each(inputs, out, overwrite, save_maps)
    if not jobs:
        raise AbairError(", ".join(inputs), "nothing to restore (" + "; ".join(str(p) for p in problems) + ")")
    engine = backend_kind.load(model, device=device, precision=precision, keep_seg_head=needs_seg_head(mode, pw_source))
    source_used = engine.pw_source(pw_source) if mode == "pw" else None
    for problem in problems:
        echo(f"error: {problem}")
    echo(f"model: {engine.described}; adapters: {', '.join(engine.names)}; mode {mode}"
         + (f" ({source_used} weight maps)" if source_used else ""))
    show_bar = len(jobs) > 1 if progress is None else progress
    bar = tqdm(jobs, desc="restore", unit="img", disable=not show_bar, dynamic_ncols=True)
    write = bar.write if show_bar else echo
    done, pixels = [], 0
    failed = [{"source": p.where, "error": p.problem} for p in problems]
    start = time.perf_counter()
    for job in bar:
        try:
            data = storage.read_bytes(job.source)
            declared = imageio.declared_size(data)
            if declared is not None:   # refuse what cannot fit before decoding it
                fit(engine, job.source, declared[1], declared[0], max_pixels, tiling, budget, mode, source_used)
            source = decode_image(data, job.source, max_image_pixels)
            chosen = fit(engine, job.source, *source.rgb.shape[:2], max_pixels, tiling, budget, mode, source_used)
            result = engine.restore(source.rgb, mode, max_pixels, chosen, source_used)
            encoded = encode_like(result.rgb, source, job.target.suffix, quality)
            storage.write_bytes(job.target, encoded)
            if save_maps:
                write_map(map_path(job.target), source.rgb, result.weight_map, engine.names)
        except AbairError as exc:
            failed.append({"source": job.source, "error": exc.problem})
            write(f"error: {exc}")
            continue
        h, w = source.rgb.shape[:2]
        pixels += h * w
        extra = f", jpeg q{encoded_quality(source, quality)}" if is_jpeg(job.target) else ""
        extra += f", map -> {map_path(job.target)}" if save_maps else ""
        extra += f", {chosen.describe()}" if chosen.tile is not None else ""   # last: benchmarks read it there
        write(f"{job.source}: restored -> {job.target} ({describe_weights(mode, result.weights)}{extra})")
        done.append({"source": job.source, "target": str(job.target), "weights": result.weights, "size": [w, h],
                     "orientation": source.orientation, "tiling": chosen.tiling, "memory_estimate": chosen.estimate,
                     **({"pw_source": source_used} if source_used else {}),
                     **({"weight_map": str(map_path(job.target))} if save_maps else {})})
    bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    summary = {"images": done, "failed": failed, "seconds": seconds, "images_per_s": len(done) / seconds,
               "megapixels_per_s": pixels / 1e6 / seconds}
    if len(jobs) > 1:
        echo(f"restored {len(done)} images ({pixels / 1e6:.2f} MP) in {seconds:.1f} s: "
             f"{summary['images_per_s']:.2f} images/s, {summary['megapixels_per_s']:.2f} MP/s")
    if failed:
        raise AbairError(f"{len(failed)} of {len(jobs) + len(problems)} images", "could not be restored (errors above)")
    return summary


def check_options(mode: str, pw_source: str | None, save_maps: bool) -> None:
    """The mode's options, checked before anything loads: one AbairError naming the flag."""
    problem = mode_problem(mode, pw_source)
    if problem is not None:
        raise AbairError(f"--{problem[0].replace('_', '-')}", problem[1])
    if save_maps and mode != "pw":
        # sw and oh use one weight vector per image (printed on its line): there is no map to draw
        raise AbairError("--save-maps", f"draws the pixel-wise weight maps of --mode pw; mode {mode} has none")


def describe_weights(mode: str, weights: dict[str, float]) -> str:
    """What an image's line says it was restored with; in pw the map's mean over the image."""
    if mode == "none":
        return "the backbone alone"
    return f"{'mean weights' if mode == 'pw' else 'weights'}: {format_weights(weights)}"


def write_map(path: Path, rgb: np.ndarray, weight_map: np.ndarray, names: list[str]) -> None:
    """The weight-map picture (tasks/core/weight_maps.render_weight_map) of one image, as a PNG
    written under a temporary name and renamed into place, like the restored image."""
    try:
        encoded = imageio.encode_png(map_picture(rgb, weight_map, names), compression=3)
    except AbairError:
        raise AbairError(path, f"could not encode a {rgb.shape[1]}x{rgb.shape[0]} weight-map picture") from None
    storage.write_bytes(path, encoded)


def map_picture(rgb: np.ndarray, weight_map: np.ndarray, names: list[str], rows: int = 256) -> np.ndarray:
    """render_weight_map's picture, (H + legend) x W x 3 uint8, of a (K+1) x h x w map at any
    resolution, drawn `rows` image rows at a time: each band resizes its rows of the map as the
    Restorer applies it (bilinear: models.restorer.map_window), so neither an image-sized map nor the
    picture's float temporaries (about 4 (2K + 13) bytes per pixel) are ever held whole."""
    import torch

    from models.restorer import map_window

    height, width = rgb.shape[:2]
    low = torch.from_numpy(np.ascontiguousarray(weight_map, dtype=np.float32))[None]
    picture = np.empty((height + LEGEND_ROW, width, 3), np.uint8)
    for top in range(0, height, rows):
        band = slice(top, min(top + rows, height))
        window = map_window(low, (height, width), band, slice(0, width), multiple=1)[0].numpy()
        picture[band] = render_weight_map(rgb[band], window, names, legend=False)
    picture[height:] = legend_strip(names, width)
    return picture


def fit(engine: backends.Backend, name: str, height: int, width: int, max_pixels: int | None, tiling: str,
        budget: int | None, mode: str = "sw", pw_source: str | None = None) -> memory.Plan:
    """The memory plan for one image (tasks/serve/memory.py, as the backend plans it), or the
    AbairError naming it."""
    try:
        return engine.plan(height, width, max_pixels, tiling, budget, mode, pw_source)
    except memory.DoesNotFit as exc:
        raise AbairError(name, str(exc)) from None


def encoded_quality(source: Decoded, quality: int | None) -> str:
    if quality is not None:
        return f"{quality}"
    return f"{source.jpeg_quality}" + (" as estimated" if source.quality_estimated else " (default)")

