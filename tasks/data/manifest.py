"""The clean-source manifest: what the `synthesize` stage would read, by content.

`abair manifest` writes data/source_manifest.json on every `dvc repro` (an always-changed stage);
the file only changes when a source file is added, removed or edited, and only then is
`synthesize` (and everything after it) stale. The scheduled retraining compares manifests to end
early when nothing is new.

Its cost grows with the number of entries, never with the bytes: one entry per loose image, one
per GLDv2 tar (its version the published md5, read from the md5 file) plus the CSVs. A loose
local file's version is a content hash, recomputed only when its size or mtime changed (a cache
outside git and DVC's outputs: $ABAIR_CACHE_DIR, default .abair-cache/); on S3 it is the ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tasks.core import storage

from tasks.data.catalogs import open_catalog

CACHE_ENV = "ABAIR_CACHE_DIR"
DEFAULT_CACHE = ".abair-cache"


def content_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


class ContentHashes:
    """Content hashes of local files, kept on (size, mtime): a touched file is hashed again (and
    comes out the same), an unchanged one is not read at all. One JSON file per source spec under
    the cache folder; a missing or unreadable cache only costs a full hash."""

    def __init__(self, source: str, folder: Path | None = None):
        folder = folder or cache_dir()
        self.path = folder / "content-hashes" / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.seen: dict[str, list] = {}

    def version(self, entry: storage.Entry) -> str:
        """ETag on S3; on disk the content hash, from the cache while size and mtime match."""
        if entry.uri.startswith(storage.S3_PREFIX):
            return entry.version
        cached = self.known.get(entry.uri)
        if cached and cached[0] == entry.size and cached[1] == entry.version:
            digest = cached[2]
        else:
            digest = content_hash(entry.uri)
        self.seen[entry.uri] = [entry.size, entry.version, digest]
        return digest

    def save(self) -> None:
        """Keep what this listing saw (files gone since drop out); written only when it changed."""
        if self.seen == self.known or not self.seen and not self.path.exists():
            return
        try:
            with storage.atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.seen, separators=(",", ":")))
        except OSError:
            pass   # a read-only cache folder: the next run hashes again


def source_manifest(source: str, endpoint_url: str | None = None, cache: Path | None = None) -> dict:
    """{source, files: [[name, size, version]], hash}: versions are content hashes on disk, ETags
    on S3 and published md5s for GLDv2 tars, so touching or copying a file changes nothing."""
    catalog = open_catalog(source, endpoint_url)
    hashes = ContentHashes(source, cache)
    files = catalog.manifest_files(hashes.version)
    hashes.save()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"source": source, "files": files, "hash": digest}


def write_manifest(manifest: dict, out: str | Path) -> bool:
    """Write the manifest if it differs from what is there; returns whether it changed."""
    out = Path(out)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if out.exists() and out.read_text() == text:
        return False
    with storage.atomic_path(out) as tmp:
        tmp.write_text(text)
    return True


def read_manifest(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
