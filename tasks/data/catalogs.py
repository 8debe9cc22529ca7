"""Which kind of source a spec names: the one place that knows every kind.

A kind is a `Catalog` class (tasks/data/sources.py) with `claims(spec)`; the first kind that
claims a spec reads it. Adding a kind is one module with its Catalog and Unit classes, and one
entry in KINDS.
"""

from __future__ import annotations

from tasks.data.gldv2 import GldCatalog
from tasks.data.sources import Catalog, LooseCatalog

# GLDv2 tars (`gldv2:ROOT?...`); loose files (a folder, an s3:// prefix, `samples`) claim the rest
KINDS: tuple[type[Catalog], ...] = (GldCatalog, LooseCatalog)


def open_catalog(spec: str, endpoint_url: str | None = None) -> Catalog:
    """The catalog of a source spec: listed (and, for GLDv2, its md5 files read) but no image read."""
    kind = next(kind for kind in KINDS if kind.claims(spec))
    return kind(spec, endpoint_url)
