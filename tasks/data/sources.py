"""Clean image sources for synthesis, and the interface every kind of source gives the
`synthesize` and `manifest` stages.

A source spec resolves to a `Catalog` (tasks/data/catalogs.py picks the kind): what to read, cut
into `Unit`s of work (each unit is synthesized, written and resumed on its own), which key the
train/validation split ranks, and what the manifest lists. This module holds that interface and
the loose-file kind: a local folder, an `s3://bucket/prefix`, or `samples`, the embedded default
(the colour photographs that scikit-image ships inside its wheel, so the pipeline runs with no
data and no network). GLDv2 tars are tasks/data/gldv2.py.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from tasks.core import imageio, storage

from tasks.core.errors import AbairError

SAMPLES = "samples"
# scikit-image's bundled colour photographs (no download needed). Synthetic charts and the
# second stereo view are left out: the latter would put one scene on both sides of the split.
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "stereo_motorcycle")


class SourceSkip(Exception):
    """A source image that cannot be used; counted in the report, never fatal on its own."""


@dataclass(frozen=True)
class Source:
    id: str        # stable name: `samples/astronaut`, a path relative to the folder, the S3 key, `gldv2/train/<id>`
    uri: str       # where to read it from
    version: str   # changes when the content changes (ETag, mtime, package version, a tar's md5)
    group: str = ""  # what the train/validation split keeps together (a GLDv2 landmark); "" = the image itself

    @property
    def seed_key(self) -> int:
        """A stable integer for seeding this source's samples (independent of listing order)."""
        return int(hashlib.sha256(self.id.encode()).hexdigest()[:15], 16)

    @property
    def short_hash(self) -> str:
        return hashlib.sha256(self.id.encode()).hexdigest()[:12]

    @property
    def split_key(self) -> str:
        return self.group or self.id


@dataclass(frozen=True)
class Item:
    """One image to synthesize from: its source, its encoded bytes when the unit has read them
    already (a tar member), and its attribution when the dataset publishes one."""
    source: Source
    data: bytes | None = None            # None: the worker reads `source.uri` itself
    attribution: dict | None = None      # id, landmark_id, url, author, license, title


class UnitRead(abc.ABC):
    """One pass over a unit: iterate its items; afterwards `problem` says whether the unit as a
    whole is unusable (a missing tar, an md5 mismatch) and `filtered` what was left out on purpose."""
    problem: str | None = None

    def __init__(self):
        self.filtered: dict[str, int] = {}

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Item]:
        ...


class Unit(abc.ABC):
    """A unit of synthesis work: written to its own shards, resumed as a whole. Units are plain
    picklable values, so a Dask worker on another machine can run one."""
    name: str  # names its done marker and its log lines
    tag: str   # goes into its shard names (`train-<tag>-000000.tar`); "" for a source that is one unit

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes when the unit's input does: a completed unit with the same fingerprint is kept."""

    @abc.abstractmethod
    def read(self, endpoint_url: str | None = None) -> UnitRead:
        ...


# version_of(entry) -> the version the manifest records for a file that has no published one:
# a content hash on disk (cached on size and mtime), the ETag on S3
VersionOf = Callable[[storage.Entry], str]


class Catalog(abc.ABC):
    """What a source spec resolves to, for the synthesize and manifest stages."""
    spec: str
    count: int | None = None   # candidate images, when known before reading (the bad-share denominator)

    @staticmethod
    @abc.abstractmethod
    def claims(spec: str) -> bool:
        """Whether this kind reads `spec`."""

    @abc.abstractmethod
    def units(self, unit_files: int) -> list[Unit]:
        ...

    @abc.abstractmethod
    def split_keys(self) -> list[str]:
        """What the train/validation split ranks: image ids, or the groups images belong to."""

    @abc.abstractmethod
    def manifest_files(self, version_of: VersionOf) -> list[list]:
        """[[name, size, version], ...]: what synthesis reads, one entry per file it opens."""

    def fingerprint(self) -> str:
        """Changes when something every unit depends on does (a GLDv2 CSV); part of each unit's key."""
        return ""


# ------------------------------------------------------------------------------------------------
# loose files: a folder, an S3 prefix, the built-in samples


# `kind:...`, e.g. `gldv2:/data/gldv2?split=train`: a source that is not a folder of loose images
KIND_PREFIX = re.compile(r"^[a-z][a-z0-9_]*:(?!//)")


def is_loose(spec: str) -> bool:
    """`samples`, a folder or an s3:// prefix: anything but a `kind:...` spec such as `gldv2:`."""
    return storage.is_s3(spec) or not KIND_PREFIX.match(spec)


def list_images(spec: str, endpoint_url: str | None = None) -> list[storage.Entry]:
    """The image files of a folder or S3 prefix, sorted by relative path. None is an error."""
    if not is_loose(spec):
        raise AbairError(spec, "not a folder, an s3:// prefix or `samples`: its images live inside archives, which "
                               "only `abair synthesize` reads; give evaluation sets a folder or `samples` "
                               "(evaluate.defaults.clean)")
    entries = storage.list_files(spec, imageio.IMAGE_SUFFIXES, endpoint_url)
    if not entries:
        raise AbairError(spec, f"no images found (looked for {', '.join(imageio.IMAGE_SUFFIXES)}, recursively)")
    return entries


def sample_sources() -> list[Source]:
    import skimage

    return [Source(f"samples/{name}", f"samples:{name}", skimage.__version__) for name in SAMPLE_PHOTOS]


def list_sources(spec: str, endpoint_url: str | None = None) -> list[Source]:
    """Every candidate image of a loose source spec, sorted by id. An empty source is an error."""
    if spec == SAMPLES:
        return sample_sources()
    return [Source(e.relpath, e.uri, e.version) for e in list_images(spec, endpoint_url)]


class LooseUnitRead(UnitRead):
    def __init__(self, sources: tuple[Source, ...]):
        super().__init__()
        self.sources = sources

    def __iter__(self) -> Iterator[Item]:
        return (Item(source) for source in self.sources)


@dataclass(frozen=True)
class LooseUnit(Unit):
    """`unit_files` loose images (each worker reads its own image)."""
    name: str
    tag: str
    sources: tuple[Source, ...]

    def fingerprint(self) -> str:
        return hashlib.sha256(repr([(s.id, s.version) for s in self.sources]).encode()).hexdigest()[:16]

    def read(self, endpoint_url: str | None = None) -> UnitRead:
        return LooseUnitRead(self.sources)


class LooseCatalog(Catalog):
    """A folder, an S3 prefix or `samples`: units of `unit_files` images in id order, split by image."""

    def __init__(self, spec: str, endpoint_url: str | None = None):
        self.spec, self.endpoint_url = spec, endpoint_url
        # listed once: the sources and the manifest come from the same listing
        self.entries = [] if spec == SAMPLES else list_images(spec, endpoint_url)
        self.count = len(SAMPLE_PHOTOS) if spec == SAMPLES else len(self.entries)

    @functools.cached_property
    def sources(self) -> list[Source]:
        return sample_sources() if self.spec == SAMPLES else [Source(e.relpath, e.uri, e.version) for e in self.entries]

    @staticmethod
    def claims(spec: str) -> bool:
        return is_loose(spec)

    def units(self, unit_files: int) -> list[Unit]:
        if unit_files < 1:
            raise AbairError("params.yaml synthesize.unit_files", f"must be >= 1, got {unit_files}")
        chunks = [tuple(self.sources[i:i + unit_files]) for i in range(0, len(self.sources), unit_files)]
        # one unit keeps today's shard names (train-000000.tar); several carry their unit's name
        names = [f"files-{i:06d}" for i in range(len(chunks))]
        return [LooseUnit(name, name if len(chunks) > 1 else "", chunk) for name, chunk in zip(names, chunks)]

    def split_keys(self) -> list[str]:
        return [s.split_key for s in self.sources]

    def manifest_files(self, version_of: VersionOf) -> list[list]:
        if self.spec == SAMPLES:
            return [[s.id, 0, s.version] for s in self.sources]
        return [[e.relpath, e.size, version_of(e)] for e in self.entries]

    def fingerprint(self) -> str:
        return self.spec


def load_source(source: Source, min_size: int, endpoint_url: str | None = None,
                max_image_pixels: int = imageio.MAX_IMAGE_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode one source as float32 RGB (from `data` when its bytes were read already); raise
    SourceSkip(reason) if it is unusable."""
    if source.uri.startswith("samples:"):
        import skimage.data

        raw = getattr(skimage.data, source.uri.split(":", 1)[1])()
        if isinstance(raw, tuple):  # stereo_motorcycle returns (left, right, disparity)
            raw = raw[0]
    else:
        try:
            encoded = data if data is not None else storage.read_bytes(source.uri, endpoint_url)
            raw = imageio.decode(encoded, source.uri, max_image_pixels)
        except AbairError as exc:
            raise SourceSkip(exc.problem) from None
    height, width = raw.shape[:2]
    if min(height, width) < min_size:
        raise SourceSkip(f"too small ({width}x{height}, need at least {min_size} on each side)")
    if imageio.is_grayscale(raw):
        raise SourceSkip("grayscale only")
    return imageio.to_float_rgb(raw)


def split_keys(keys: list[str], val_fraction: float, seed: int) -> frozenset[str]:
    """The keys held out for validation. Ranking by a seeded hash keeps each key's side stable
    when others are added or removed; a split with two keys or more has one on each side."""
    if not 0.0 <= val_fraction < 1.0:
        raise AbairError("synthesize.val_fraction", f"must be in [0, 1), got {val_fraction}")
    keys = sorted(set(keys))
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_val = int(round(val_fraction * len(keys)))
    if val_fraction > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    return frozenset(ranked[:n_val])


def split_sources(sources: list[Source], val_fraction: float, seed: int) -> tuple[list[Source], list[Source]]:
    """Split by source image (or by its group), never by crop."""
    val_keys = split_keys([s.split_key for s in sources], val_fraction, seed)
    train = [s for s in sources if s.split_key not in val_keys]
    val = [s for s in sources if s.split_key in val_keys]
    return train, val
