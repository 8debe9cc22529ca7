"""The clean-source manifest: what images the `synthesize` stage would read, by content.

`abair manifest` writes data/source_manifest.json on every `dvc repro` (an always-changed stage);
the file only changes when an image is added, removed or edited, and only then is `synthesize`
(and everything after it) stale. The scheduled retraining compares manifests to end early when
nothing is new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.core import imageio, storage

from tasks.data.sources import SAMPLES, list_sources


def _content_version(uri: str) -> str:
    digest = hashlib.sha256()
    with open(uri, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def source_manifest(source: str, endpoint_url: str | None = None) -> dict:
    """{source, files: [[id, size, version]], hash}: versions are content hashes on disk and
    ETags on S3, so touching or copying a file changes nothing."""
    if source == SAMPLES:
        files = [[s.id, 0, s.version] for s in list_sources(source)]
    else:
        entries = storage.list_files(source, imageio.IMAGE_SUFFIXES, endpoint_url)
        files = [[e.relpath, e.size, e.version if storage.is_s3(source) else _content_version(e.uri)] for e in entries]
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
