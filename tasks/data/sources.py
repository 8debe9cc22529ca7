"""Clean image sources for synthesis: a local folder, an `s3://bucket/prefix`, or `samples`.

`samples` is the embedded default: the colour photographs that scikit-image ships inside its
wheel, so the pipeline runs with no data and no network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    id: str        # stable name: `samples/astronaut`, a path relative to the folder, or the S3 key
    uri: str       # where to read it from
    version: str   # changes when the content changes (ETag, mtime, package version)

    @property
    def seed_key(self) -> int:
        """A stable integer for seeding this source's samples (independent of listing order)."""
        return int(hashlib.sha256(self.id.encode()).hexdigest()[:15], 16)

    @property
    def short_hash(self) -> str:
        return hashlib.sha256(self.id.encode()).hexdigest()[:12]


def list_sources(spec: str, endpoint_url: str | None = None) -> list[Source]:
    """Every candidate image of a source spec, sorted by id. An empty source is an error."""
    if spec == SAMPLES:
        import skimage

        return [Source(f"samples/{name}", f"samples:{name}", skimage.__version__) for name in SAMPLE_PHOTOS]
    entries = storage.list_files(spec, imageio.IMAGE_SUFFIXES, endpoint_url)
    if not entries:
        raise AbairError(spec, f"no images found (looked for {', '.join(imageio.IMAGE_SUFFIXES)}, recursively)")
    return [Source(e.relpath, e.uri, e.version) for e in entries]


def load_source(source: Source, min_size: int, endpoint_url: str | None = None,
                max_image_pixels: int = imageio.MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one source as float32 RGB; raise SourceSkip(reason) if it is unusable."""
    if source.uri.startswith("samples:"):
        import skimage.data

        raw = getattr(skimage.data, source.uri.split(":", 1)[1])()
        if isinstance(raw, tuple):  # stereo_motorcycle returns (left, right, disparity)
            raw = raw[0]
    else:
        try:
            raw = imageio.decode(storage.read_bytes(source.uri, endpoint_url), source.uri, max_image_pixels)
        except AbairError as exc:
            raise SourceSkip(exc.problem) from None
    height, width = raw.shape[:2]
    if min(height, width) < min_size:
        raise SourceSkip(f"too small ({width}x{height}, need at least {min_size} on each side)")
    if imageio.is_grayscale(raw):
        raise SourceSkip("grayscale only")
    return imageio.to_float_rgb(raw)


def split_sources(sources: list[Source], val_fraction: float, seed: int) -> tuple[list[Source], list[Source]]:
    """Split by source image, never by crop. Ranking by a seeded hash keeps each image's side
    stable when others are added or removed."""
    if not 0.0 <= val_fraction < 1.0:
        raise AbairError("synthesize.val_fraction", f"must be in [0, 1), got {val_fraction}")
    ranked = sorted(sources, key=lambda s: hashlib.sha256(f"{seed}:{s.id}".encode()).hexdigest())
    n_val = int(round(val_fraction * len(sources)))
    if val_fraction > 0 and len(sources) >= 2:
        n_val = min(max(n_val, 1), len(sources) - 1)
    val_ids = {s.id for s in ranked[:n_val]}
    train = [s for s in sources if s.id not in val_ids]
    val = [s for s in sources if s.id in val_ids]
    return train, val
