"""Training data: webdataset streams over shard sets (local or s3://) and paired folders.

Streams are *resampled* (each rank and worker draws shards at random, forever) and seeded by
(seed, segment, rank, worker). A training run is cut into segments of fixed length; every
segment restarts the stream with its own seed, so a run resumed at step s rebuilds exactly the
batches the uninterrupted run saw: segment s // length, minus the batches already consumed.
Augmentations draw from the same per-worker generator, never from global state.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from tasks.core import imageio, storage

from tasks.core.errors import AbairError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# shard sets

def _register_s3_scheme() -> None:
    """Let webdataset open `s3://` URLs through boto3 (webdataset ships no S3 handler)."""
    import sys
    import webdataset  # noqa: F401  (populates webdataset.gopen)

    gopen_module = sys.modules["webdataset.gopen"]

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode != "rb":
            raise ValueError(f"{url}: only reading from S3 is supported by this handler")
        bucket, key = storage.split_s3(url)
        try:
            return storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001
            raise storage._s3_error(url, exc) from None

    gopen_module.gopen_schemes["s3"] = gopen_s3


_register_s3_scheme()


def load_index(shards: str, endpoint_url: str | None = None) -> dict:
    """A shard set's index.json (written last by `synthesize`: its presence marks a complete set)."""
    uri = storage.join(shards, "index.json")
    try:
        index = json.loads(storage.read_bytes(uri, endpoint_url))
    except AbairError as exc:
        raise AbairError(uri, f"shard set index not readable ({exc.problem}); run `abair synthesize` first") from None
    except json.JSONDecodeError as exc:
        raise AbairError(uri, f"not valid JSON ({exc.msg})") from None
    if index.get("format") != "abair-shards/1":
        raise AbairError(uri, f"unknown shard set format {index.get('format')!r}")
    return index


def shard_urls(shards: str, split: str, index: dict | None = None) -> list[str]:
    index = index or load_index(shards)
    names = index["splits"].get(split, {}).get("shards", [])
    if not names:
        raise AbairError(storage.join(shards, "index.json"), f"has no `{split}` shards")
    return [storage.join(shards, name) for name in names]


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> uint8 arrays and metadata (raises AbairError naming the sample)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    missing = {"clean.png", "degraded.png", "mask.png", "json"} - set(sample)
    if missing:
        raise AbairError(where, f"sample lacks {sorted(missing)}")
    return {
        "key": sample["__key__"],
        "clean": imageio.decode(sample["clean.png"], f"{where}.clean.png"),
        "degraded": imageio.decode(sample["degraded.png"], f"{where}.degraded.png"),
        "mask": imageio.decode(sample["mask.png"], f"{where}.mask.png"),
        "meta": parse_meta(sample["json"], f"{where}.json"),
    }


def parse_meta(data: bytes, where: str) -> dict:
    try:
        meta = json.loads(data)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AbairError(where, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise AbairError(where, "sample metadata is not a JSON object")
    return meta


def read_split(urls: list[str]) -> Iterator[dict]:
    """Every sample of some shards once, in order, decoded: for validation and evaluation.
    Reads all of them in this process whatever the DDP rank (rank 0 validates alone)."""
    import webdataset as wds

    for url in urls:
        samples = iter(wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=lambda src: src,
                                      workersplitter=lambda src: src))
        while True:
            try:
                raw = next(samples)
            except StopIteration:
                break
            except AbairError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a damaged tar raises, it is this shard's problem
                raise AbairError(url, f"unreadable shard ({type(exc).__name__}: {exc.args[0] if exc.args else exc})") from None
            yield decode_sample(raw)


# ---------------------------------------------------------------------------------------------
# augmentation

def random_patch(arrays: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random crop of `size` from every array (HxW or HxWxC), then the same one of the
    8 dihedral transforms (flips and 90 degree rotations)."""
    height, width = arrays[0].shape[:2]
    if height < size or width < size:
        raise AbairError("data", f"patch {size} is larger than the sample ({width}x{height})")
    y0 = int(rng.integers(0, height - size + 1))
    x0 = int(rng.integers(0, width - size + 1))
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        a = np.rot90(a[y0:y0 + size, x0:x0 + size], k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 or float HxWx3 -> float32 3xHxW in [0, 1]."""
    if img.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def to_numpy(img: torch.Tensor) -> np.ndarray:
    """float 3xHxW -> float32 HxWx3."""
    return img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# streams

def stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class ShardStream(IterableDataset):
    """An endless, seeded stream over a shard set: `transform(sample, rng)` -> item or None."""

    def __init__(self, urls: list[str], transform: Callable, seed: int, shuffle_buffer: int = 256,
                 on_error: str = "raise"):
        super().__init__()
        self.urls, self.transform, self.seed = list(urls), transform, seed
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.segment = 0
        self.errors = 0

    def _handler(self, exc: Exception) -> bool:
        if self.on_error == "skip":
            self.errors += 1
            log.warning("skipping unreadable shard data (%s)", exc)
            return True
        if isinstance(exc, AbairError):
            raise exc
        # webdataset appends the shard's stream and URL to the exception's args
        url = next((a for a in reversed(exc.args) if isinstance(a, str) and a.endswith(".tar")), "shard")
        raise AbairError(url, f"unreadable shard ({type(exc).__name__}: {exc.args[0] if exc.args else exc})") from exc

    def __iter__(self) -> Iterator:
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        seed = stream_seed(self.seed, self.segment, rank, worker)
        rng = np.random.default_rng(seed)
        samples = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=self._handler),
            wds.shuffle(self.shuffle_buffer, initial=min(64, self.shuffle_buffer), seed=seed),
        )
        for raw in samples:
            try:
                item = self.transform(decode_sample(raw), rng)
            except AbairError as exc:
                if not self._handler(exc):
                    raise
                continue
            if item is not None:
                yield item


class MixedStream(IterableDataset):
    """Items from several streams: each next item comes from stream i with probability shares[i]
    (seeded per segment, like the streams themselves)."""

    def __init__(self, streams: list[IterableDataset], shares: list[float], seed: int):
        super().__init__()
        total = float(sum(shares))
        self.streams, self.shares, self.seed = streams, [s / total for s in shares], seed
        self.segment = 0

    def __iter__(self) -> Iterator:
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng(stream_seed(self.seed, self.segment, rank, worker))
        iterators = []
        for stream in self.streams:
            stream.segment = self.segment
            iterators.append(iter(stream))
        while True:
            yield next(iterators[int(rng.choice(len(iterators), p=self.shares))])


def open_paired(spec, split: str = "all", check: bool = False, where: str = "paired data") -> PairedFolder:
    """The pairs of a paired-data spec (see `paired_spec`), on one side of its held-out split.
    The short form (a folder) holds out every 10th pair by name."""
    full = paired_spec(spec, where)
    if full["holdout"] is not None:
        return PairedFolder(full["paths"], check=check, split=split, holdout=full["holdout"], group=full["group"])
    folder = PairedFolder(full["paths"][0], check=check)
    if split != "all" and len(folder) >= 10:
        held = set(folder.names[::10])
        folder.names = [n for n in folder.names if (n in held) == (split == "val")]
    return folder


class SegmentedLoader:
    """Batches for steps [start, total): restarts the stream at every segment boundary."""

    def __init__(self, dataset: IterableDataset, batch_size: int, segment_steps: int, workers: int = 0):
        self.dataset, self.batch_size, self.segment_steps, self.workers = dataset, batch_size, segment_steps, workers

    def batches(self, start_step: int, total_steps: int) -> Iterator[tuple[int, object]]:
        step = start_step
        while step < total_steps:
            segment = step // self.segment_steps
            self.dataset.segment = segment
            loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                                persistent_workers=False, pin_memory=torch.cuda.is_available())
            batches = iter(loader)
            # Resuming mid-segment: replay (and drop) what the interrupted run already consumed.
            for _ in range(step - segment * self.segment_steps):
                next(batches)
            end = min((segment + 1) * self.segment_steps, total_steps)
            for batch in itertools.islice(batches, end - step):
                yield step, batch
                step += 1
            del batches, loader


# ---------------------------------------------------------------------------------------------
# paired folders

SPLITS = ("all", "train", "val")
GROUPS = {
    # what a held-out split keeps together: one image, or every shot of one scene
    # (PolyU's `camera_ISO..._scene_N` names: all but the last `_N`)
    "image": lambda name: Path(name).stem,
    "scene": lambda name: Path(name).stem.rsplit("_", 1)[0],
}


def held_out(name: str, holdout: float, group: str = "image") -> bool:
    """Whether a pair is in the held-out (validation) part: a stable hash of its group key, so the
    split never changes when pairs are added and every stage that asks agrees."""
    import hashlib

    key = GROUPS[group](name)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < holdout


def paired_spec(spec, where: str = "paired data") -> dict:
    """A paired-data spec in full: {"paths": [...], "holdout", "group", "share"}.

    A folder (str) is the short form: one folder, every 10th pair by name held out (holdout None),
    only real pairs (share 1). The mapping form names several folders, a held-out share by
    stable hash of `group` ("image" or "scene"), and `share`, the part of an adapter's training
    samples drawn from these pairs (the rest synthetic)."""
    if isinstance(spec, (str, Path)):
        return {"paths": [str(spec)], "holdout": None, "group": "image", "share": 1.0}
    if not isinstance(spec, dict) or "paths" not in spec:
        raise AbairError(where, f"must be a folder or a mapping with `paths`, got {spec!r}")
    unknown = set(spec) - {"paths", "holdout", "group", "share"}
    if unknown:
        raise AbairError(where, f"unknown keys {sorted(unknown)} (paths, holdout, group, share)")
    paths = [spec["paths"]] if isinstance(spec["paths"], str) else [str(p) for p in spec["paths"]]
    share = float(spec.get("share", 1.0))
    group = spec.get("group", "image")
    if spec.get("holdout", 0.0) is None and len(paths) == 1:  # the short form, spelled out
        return {"paths": paths, "holdout": None, "group": group, "share": share}
    holdout = float(spec.get("holdout") or 0.0)
    if not paths or not 0.0 <= holdout < 1.0 or not 0.0 < share <= 1.0 or group not in GROUPS:
        raise AbairError(where, f"needs paths, 0 <= holdout < 1, 0 < share <= 1 and group in {sorted(GROUPS)}; got {spec!r}")
    return {"paths": paths, "holdout": holdout, "group": group, "share": share}


class PairedFolder:
    """`ROOT/input/NAME` degraded, `ROOT/target/NAME` clean, same names. Checked up front: a
    missing partner, a size mismatch or an unreadable file is one error naming the file.

    `root` may be a list of folders (their pairs named `I/NAME`, I the folder's position) and
    `split` ("train" or "val") keeps one side of the held-out split (see `held_out`)."""

    def __init__(self, root: str | Path | list, endpoint_url: str | None = None, check: bool = True,
                 split: str = "all", holdout: float = 0.0, group: str = "image"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        roots = [str(r) for r in root] if isinstance(root, (list, tuple)) else [str(root)]
        self.root = roots[0] if len(roots) == 1 else roots
        self.endpoint_url = endpoint_url
        self._where: dict[str, tuple[str, str]] = {}
        sizes = []
        for i, folder in enumerate(roots):
            inputs = {e.relpath: e for e in storage.list_files(storage.join(folder, "input"), imageio.IMAGE_SUFFIXES, endpoint_url)}
            targets = {e.relpath: e for e in storage.list_files(storage.join(folder, "target"), imageio.IMAGE_SUFFIXES, endpoint_url)}
            if not inputs:
                raise AbairError(storage.join(folder, "input"), "no images found")
            for name in sorted(set(inputs) ^ set(targets)):
                side, other = ("input", "target") if name in inputs else ("target", "input")
                raise AbairError(storage.join(folder, side, name), f"has no partner in {other}/")
            for name in sorted(inputs):
                key = name if len(roots) == 1 else f"{i}/{name}"
                if split != "all" and held_out(name, holdout, group) != (split == "val"):
                    continue
                self._where[key] = (folder, name)
                sizes.append(f"{key}:{inputs[name].size}:{targets[name].size}")
        self.names = sorted(self._where)
        if not self.names:
            raise AbairError(", ".join(roots), f"no pairs in the {split!r} split (holdout {holdout}, by {group})")
        self.fingerprint = "|".join(sizes)
        if check:
            for name in self.names:
                self.load(name)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(degraded, clean) as uint8 RGB."""
        folder, relpath = self._where[name]
        pair = []
        for side in ("input", "target"):
            uri = storage.join(folder, side, relpath)
            raw = imageio.decode(storage.read_bytes(uri, self.endpoint_url), uri)
            pair.append(imageio.to_uint8(imageio.to_float_rgb(raw)) if raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] != 3 else raw)
        if pair[0].shape != pair[1].shape:
            raise AbairError(storage.join(folder, "input", relpath),
                             f"size {pair[0].shape[1]}x{pair[0].shape[0]} differs from its target's {pair[1].shape[1]}x{pair[1].shape[0]}")
        return pair[0], pair[1]


class PairedStream(IterableDataset):
    """An endless, seeded stream of random patches from a paired folder."""

    def __init__(self, folder: PairedFolder, transform: Callable, seed: int):
        super().__init__()
        self.folder, self.transform, self.seed = folder, transform, seed
        self.segment = 0

    def __iter__(self) -> Iterator:
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng(stream_seed(self.seed, self.segment, rank, worker))
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        while True:
            name = self.folder.names[int(rng.integers(0, len(self.folder)))]
            if name not in cache:
                cache[name] = self.folder.load(name)
            degraded, clean = cache[name]
            item = self.transform({"key": name, "clean": clean, "degraded": degraded, "mask": None, "meta": {}}, rng)
            if item is not None:
                yield item
