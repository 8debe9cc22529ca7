"""Google Landmarks Dataset v2 as published: a source read straight out of its tars.

The spec: `gldv2:ROOT?split=train&subset=clean&tars=0-99`, ROOT a folder or `s3://bucket/prefix`
in the dataset's published layout (github.com/cvdfoundation/google-landmark):

    ROOT/train/images_000.tar ... images_499.tar      (index/: 000-099, test/: 000-019)
    ROOT/md5sum/train/md5.images_000.txt ...          (or beside the tars, where download-dataset.sh leaves them)
    ROOT/train.csv, train_clean.csv, train_attribution.csv, index.csv, index_image_to_landmark.csv, test.csv
                                                      (or under ROOT/metadata/, as on the dataset's bucket)

Inside a tar, image `abcdef0123456789` is `a/b/c/abcdef0123456789.jpg`. Options:
- `split`: train (default), index or test;
- `subset`: `clean` keeps the ids listed in train_clean.csv (train only); `all` (default) every id
  of the split's CSV;
- `tars`: which tars, e.g. `0-99` or `0-9,20,30-39` (default: every tar that is there or has a
  published md5 file; one that has an md5 file but no tar is reported as missing).

One unit of work per tar: it is read once, front to back (one GET on S3), its JPEGs handed out as
they stream and its md5 computed on the way, then compared with the published one. A tar that is
missing, has no published md5, does not match it, or is not a readable tar is unusable as a whole
(the stage discards what it made from it and reports it). Every image carries its attribution
(id, landmark_id, url, author, license, title, when the CSVs have them); the train/validation
split is by landmark, so no landmark is on both sides.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qsl

from tasks.core import storage
from tasks.core.errors import AbairError
from tasks.data.sources import Catalog, Item, Source, Unit, UnitRead, VersionOf

log = logging.getLogger(__name__)

SCHEME = "gldv2:"
SPLITS = ("train", "index", "test")
SUBSETS = ("all", "clean")
OPTIONS = ("split", "subset", "tars")
TAR_NAME = re.compile(r"^images_(\d{3})\.tar$")
MD5_NAME = re.compile(r"^md5\.images_(\d{3})\.txt$")
MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
# index and test images: "All images in the index/test set have CC-0 or Public Domain licenses"
PUBLIC_DOMAIN = "CC0 or public domain"
ATTRIBUTION_FIELDS = ("id", "landmark_id", "url", "author", "license", "title")


# ------------------------------------------------------------------------------------------------
# the spec


@dataclass(frozen=True)
class GldSpec:
    root: str
    split: str = "train"
    subset: str = "all"
    tars: tuple[int, ...] | None = None   # None: every tar there or published


def parse_tars(text: str, where: str) -> tuple[int, ...]:
    """`0-99`, `0-9,20,30-39` -> sorted tar numbers."""
    numbers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise AbairError(where, f"tars={text!r}: expected numbers and ranges such as 0-99 or 0-9,20")
        numbers.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    if not numbers:
        raise AbairError(where, f"tars={text!r} names no tar")
    return tuple(sorted(numbers))


def parse_spec(spec: str) -> GldSpec:
    if not spec.startswith(SCHEME):
        raise AbairError(spec, f"not a GLDv2 source (expected {SCHEME}ROOT?split=train&subset=clean)")
    root, _, query = spec[len(SCHEME):].partition("?")
    if not root:
        raise AbairError(spec, f"no root folder (expected {SCHEME}/data/gldv2?split=train)")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise AbairError(spec, f"unknown option(s) {unknown} (known: {', '.join(OPTIONS)})")
    split = options.get("split", "train")
    subset = options.get("subset", "all")
    if split not in SPLITS:
        raise AbairError(spec, f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if subset not in SUBSETS:
        raise AbairError(spec, f"subset={subset!r}: expected one of {', '.join(SUBSETS)}")
    if subset == "clean" and split != "train":
        raise AbairError(spec, "subset=clean exists for the train split only (train_clean.csv)")
    tars = parse_tars(options["tars"], spec) if options.get("tars") not in (None, "", "all") else None
    return GldSpec(root.rstrip("/") or "/", split, subset, tars)


def tar_name(number: int) -> str:
    return f"images_{number:03d}.tar"


def md5_name(number: int) -> str:
    return f"md5.images_{number:03d}.txt"


# ------------------------------------------------------------------------------------------------
# the metadata CSVs


def required_csvs(split: str, subset: str) -> tuple[str, ...]:
    if split == "train":
        return ("train_clean.csv",) if subset == "clean" else ("train.csv",)
    return (f"{split}.csv",)


def optional_csvs(split: str, subset: str) -> tuple[str, ...]:
    if split == "train":
        return ("train.csv", "train_attribution.csv") if subset == "clean" else ("train_attribution.csv",)
    return ("index_image_to_landmark.csv",) if split == "index" else ()


@dataclass
class Metadata:
    """The images a GLDv2 source keeps: id -> (landmark_id, url, author, license, title)."""
    images: dict[str, tuple[str, str, str, str, str]]
    excluded: str   # why an id found in a tar but not kept is left out

    def split_keys(self, split: str) -> list[str]:
        """Landmarks where the split has them (train, index), image ids otherwise (test)."""
        return sorted({landmark or source_id(split, image_id) for image_id, (landmark, *_) in self.images.items()})


def source_id(split: str, image_id: str) -> str:
    return f"gldv2/{split}/{image_id}"


def read_csv(uri: str, columns: tuple[str, ...], endpoint_url: str | None) -> Iterator[list[str]]:
    """The rows of a published CSV, streamed (train.csv is 500 MB), after checking its header."""
    with storage.open_read(uri, endpoint_url) as raw:
        rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header[:len(columns)]) != columns:
            raise AbairError(uri, f"expected the columns {','.join(columns)}, found {','.join(header or []) or 'nothing'}")
        for row in rows:
            if row:
                yield row


@functools.lru_cache(maxsize=2)
def load_metadata(split: str, subset: str, csvs: tuple[tuple[str, str, str], ...],
                  endpoint_url: str | None = None) -> Metadata:
    """Read the split's CSVs once per process (csvs: (name, uri, version); the version is in the
    cache key, so an edited CSV is read again). For train/clean, train.csv and the attribution
    are kept only for the 1.58M kept ids: about 0.8 GB (about 510 bytes per kept image, measured
    in benchmarks/synthesis_scale.py)."""
    uris = {name: uri for name, uri, _ in csvs}
    licenses: dict[str, str] = {}   # one string object per distinct license
    if split == "train" and subset == "clean":
        images = {}
        for landmark, ids in read_csv(uris["train_clean.csv"], ("landmark_id", "images"), endpoint_url):
            for image_id in ids.split():
                images[image_id] = (landmark, "", "", "", "")
        excluded = "not in train_clean.csv"
        if "train.csv" in uris:
            for row in read_csv(uris["train.csv"], ("id", "url", "landmark_id"), endpoint_url):
                if row[0] in images and len(row) > 1:
                    images[row[0]] = (images[row[0]][0], row[1], "", "", "")
    elif split == "train":
        images = {row[0]: (row[2], row[1], "", "", "") for row in
                  read_csv(uris["train.csv"], ("id", "url", "landmark_id"), endpoint_url) if len(row) >= 3}
        excluded = "not in train.csv"
    else:
        license = PUBLIC_DOMAIN
        images = {row[0]: ("", "", "", license, "") for row in read_csv(uris[f"{split}.csv"], ("id",), endpoint_url)}
        excluded = f"not in {split}.csv"
        if "index_image_to_landmark.csv" in uris:
            for row in read_csv(uris["index_image_to_landmark.csv"], ("id", "landmark_id"), endpoint_url):
                if row[0] in images and len(row) > 1:
                    images[row[0]] = (row[1], "", "", license, "")
    if "train_attribution.csv" in uris:
        for row in read_csv(uris["train_attribution.csv"], ("id", "url", "author", "license", "title"), endpoint_url):
            image_id, url, author, license, title = (row + [""] * 5)[:5]
            if image_id in images:
                landmark, known_url = images[image_id][:2]
                images[image_id] = (landmark, url or known_url, author, licenses.setdefault(license, license), title)
    return Metadata(images, excluded)


def attribution(image_id: str, info: tuple[str, str, str, str, str]) -> dict:
    """What a sample's JSON carries about its source image: the fields the CSVs have."""
    values = dict(zip(ATTRIBUTION_FIELDS, (image_id, *info)))
    return {k: v for k, v in values.items() if v}


# ------------------------------------------------------------------------------------------------
# one tar: the unit of work


class HashingReader:
    """A read-only stream that computes the md5 of everything read through it."""

    def __init__(self, raw):
        self.raw, self.md5, self.size = raw, hashlib.md5(usedforsecurity=False), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.md5.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (the end-of-archive blocks): the md5 is of the whole file."""
        while self.read(1 << 20):
            pass


class TarRead(UnitRead):
    def __init__(self, unit: "TarUnit", endpoint_url: str | None):
        super().__init__()
        self.unit, self.endpoint_url = unit, endpoint_url

    def __iter__(self) -> Iterator[Item]:
        unit = self.unit
        if unit.size is None:
            self.problem = f"missing tar ({unit.tar_uri})"
            return
        if unit.md5 is None:
            self.problem = f"no published md5 ({unit.md5_uri}: {unit.md5_problem})"
            return
        meta = load_metadata(unit.split, unit.subset, unit.csvs, self.endpoint_url)
        try:
            with storage.open_read(unit.tar_uri, self.endpoint_url) as raw:
                stream = HashingReader(raw)
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        item = self._item(tar, member, meta)
                        if item is not None:
                            yield item
                stream.drain()
        except AbairError as exc:
            if exc.problem == "file not found" or exc.problem == "no such object":
                self.problem = f"missing tar ({unit.tar_uri})"
                return
            raise
        except (tarfile.TarError, EOFError) as exc:   # a network error is not bad data: it propagates (and is retried)
            self.problem = f"not a readable tar ({type(exc).__name__}: {exc})"
            return
        digest = stream.md5.hexdigest()
        if digest != unit.md5:
            self.problem = f"md5 mismatch ({digest}, published {unit.md5})"

    def _item(self, tar: tarfile.TarFile, member: tarfile.TarInfo, meta: Metadata) -> Item | None:
        if not member.isfile():
            return None
        name = member.name.rsplit("/", 1)[-1]
        if not name.lower().endswith(".jpg"):
            self.filtered["not a .jpg"] = self.filtered.get("not a .jpg", 0) + 1
            return None
        image_id = name[:-4]
        info = meta.images.get(image_id)
        if info is None:
            self.filtered[meta.excluded] = self.filtered.get(meta.excluded, 0) + 1
            return None
        data = tar.extractfile(member).read()
        unit = self.unit
        source = Source(source_id(unit.split, image_id), f"{unit.tar_uri}#{member.name}", unit.md5, group=info[0])
        return Item(source, data, attribution(image_id, info))


@dataclass(frozen=True)
class TarUnit(Unit):
    name: str          # images_007
    tag: str
    split: str
    subset: str
    tar_uri: str
    size: int | None   # None: the tar is missing
    md5: str | None    # the published md5; None: not published or unreadable (md5_problem says why)
    md5_uri: str
    md5_problem: str
    csvs: tuple[tuple[str, str, str], ...]   # (name, uri, version) of the CSVs the metadata comes from

    def fingerprint(self) -> str:
        return f"{self.md5}:{self.size}"

    def read(self, endpoint_url: str | None = None) -> UnitRead:
        return TarRead(self, endpoint_url)


# ------------------------------------------------------------------------------------------------
# the catalog: what a spec resolves to


def list_optional(uri: str, suffixes: tuple[str, ...], endpoint_url: str | None) -> list[storage.Entry]:
    """The direct children of a folder that may not exist (S3 lists nothing for a missing prefix)."""
    try:
        return storage.list_files(uri, suffixes, endpoint_url, recursive=False)
    except AbairError as exc:
        if exc.problem in ("folder not found", "not a folder"):
            return []
        raise


def read_md5(uri: str, endpoint_url: str | None) -> tuple[str | None, str]:
    """(the md5 an md5 file publishes, or None and why)."""
    try:
        text = storage.read_bytes(uri, endpoint_url).decode("utf-8", "replace")
    except AbairError as exc:
        return None, exc.problem
    value = (text.split() or [""])[0].lower()
    return (value, "") if MD5_HEX.match(value) else (None, f"no md5 in it ({text[:40]!r})")


class GldCatalog(Catalog):
    """A GLDv2 root: one unit per tar, split by landmark, the manifest one entry per tar."""

    def __init__(self, spec: str, endpoint_url: str | None = None):
        self.spec, self.endpoint_url = spec, endpoint_url
        self.gld = gld = parse_spec(spec)
        split_dir = storage.join(gld.root, gld.split)
        here = list_optional(split_dir, (".tar", ".txt"), endpoint_url)
        self.tars = {int(m[1]): e for e in here if (m := TAR_NAME.match(e.relpath))}
        # md5sum/<split>/ (the published layout) wins over md5 files beside the tars (the script's)
        md5_files = {int(m[1]): e for e in here if (m := MD5_NAME.match(e.relpath))}
        md5_files.update({int(m[1]): e for e in list_optional(storage.join(gld.root, "md5sum", gld.split), (".txt",),
                                                               endpoint_url) if (m := MD5_NAME.match(e.relpath))})
        numbers = list(gld.tars) if gld.tars is not None else sorted(set(self.tars) | set(md5_files))
        if not numbers:
            raise AbairError(split_dir, "no images_NNN.tar and no md5 files: not a GLDv2 split folder in the "
                                        "published layout")
        self.csvs = self._find_csvs()
        # S3: one GET per md5 file, a few at a time
        md5_uris = {n: md5_files[n].uri if n in md5_files else storage.join(gld.root, "md5sum", gld.split, md5_name(n))
                    for n in numbers}
        with ThreadPoolExecutor(8) as pool:
            md5s = dict(zip(numbers, pool.map(lambda n: read_md5(md5_uris[n], endpoint_url) if n in md5_files
                                              else (None, "not found"), numbers)))
        self._units = [TarUnit(name=f"images_{n:03d}", tag=f"images_{n:03d}", split=gld.split, subset=gld.subset,
                               tar_uri=self.tars[n].uri if n in self.tars else storage.join(split_dir, tar_name(n)),
                               size=self.tars[n].size if n in self.tars else None, md5=md5s[n][0],
                               md5_uri=md5_uris[n], md5_problem=md5s[n][1], csvs=self.csv_versions())
                       for n in numbers]

    @staticmethod
    def claims(spec: str) -> bool:
        return spec.startswith(SCHEME)

    def _find_csvs(self) -> dict[str, storage.Entry]:
        """The split's CSVs, at the root or under metadata/; a required one missing is an error."""
        gld = self.gld
        found = {e.relpath: e for e in list_optional(storage.join(gld.root, "metadata"), (".csv",), self.endpoint_url)}
        found.update({e.relpath: e for e in list_optional(gld.root, (".csv",), self.endpoint_url)})
        for name in required_csvs(gld.split, gld.subset):
            if name not in found:
                raise AbairError(storage.join(gld.root, name), f"not found (nor under metadata/): the GLDv2 {gld.split} "
                                                               f"images are listed there")
        wanted = required_csvs(gld.split, gld.subset) + optional_csvs(gld.split, gld.subset)
        return {name: found[name] for name in wanted if name in found}

    def csv_versions(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((name, e.uri, f"{e.size}:{e.version}") for name, e in sorted(self.csvs.items()))

    def units(self, unit_files: int) -> list[Unit]:
        return list(self._units)   # one per tar, whatever unit_files says

    def metadata(self) -> Metadata:
        return load_metadata(self.gld.split, self.gld.subset, self.csv_versions(), self.endpoint_url)

    def split_keys(self) -> list[str]:
        return self.metadata().split_keys(self.gld.split)

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.gld.split, self.gld.subset, self.csv_versions())).encode()).hexdigest()[:16]

    def manifest_files(self, version_of: VersionOf) -> list[list]:
        """One entry per tar, its version the published md5 and its size (read, never recomputed);
        the CSVs the metadata comes from, by content."""
        files = [[f"{self.gld.split}/{u.tar_uri.rsplit('/', 1)[-1]}", u.size or 0, self._tar_version(u)] for u in self._units]
        return files + [[name, e.size, version_of(e)] for name, e in sorted(self.csvs.items())]

    def _tar_version(self, unit: TarUnit) -> str:
        if unit.size is None:
            return "missing"
        if unit.md5 is None:   # no published md5 (synthesis reports the tar): its listing version stands in
            return f"unverified:{self.tars[int(unit.name[-3:])].version}"
        return f"md5:{unit.md5}"
