"""One storage layer for every stage: local paths and `s3://bucket/prefix` URIs (boto3).

Writes never expose a partial object under its final name: local files are written to a
temporary sibling and renamed into place; S3 objects become visible only when a PUT (or the
last part of a multipart upload) completes, and uploads always start from a finished local file.
The S3 endpoint comes from the `endpoint_url` argument, else `AWS_ENDPOINT_URL`, else AWS;
credentials come from the usual boto3 chain (environment, profile, instance role).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks.core.errors import AbairError

S3_PREFIX = "s3://"
MULTIPART_THRESHOLD = 16 * 1024 * 1024


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, key = str(uri)[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise AbairError(uri, "S3 URI has no bucket (expected s3://bucket/prefix)")
    return bucket, key


def join(uri: str | Path, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, pid: int):
    # One client per process and endpoint: boto3 clients are not fork-safe, hence the pid key.
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("ABAIR_S3_MAX_ATTEMPTS", "8"))
    config = Config(retries={"max_attempts": attempts, "mode": "standard"},
                    connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def s3_client(endpoint_url: str | None = None):
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return _client(endpoint_url, os.getpid())


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def _s3_error(uri: str, exc: Exception) -> AbairError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return AbairError(uri, "no such object")
        if code == "NoSuchBucket":
            return AbairError(uri, "no such bucket")
        return AbairError(uri, f"S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")
    return AbairError(uri, f"S3 unreachable ({type(exc).__name__}: {exc})")


# ---------------------------------------------------------------------------------------------
# atomic local writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` as a whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(finished: str | Path, final: str | Path) -> None:
    """Put the finished folder `finished` (a sibling of `final`) in place of `final`, as a whole."""
    finished, final = Path(finished), Path(final)
    os.chmod(finished, 0o777 & ~_umask())
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(finished, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, final)


# ---------------------------------------------------------------------------------------------
# reads and writes by URI

def read_bytes(uri: str | Path, endpoint_url: str | None = None) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001 - translated into one clear error
            raise _s3_error(str(uri), exc) from None
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise AbairError(uri, "file not found") from None
    except OSError as exc:
        raise AbairError(uri, f"cannot read ({exc.strerror})") from None


@contextlib.contextmanager
def open_read(uri: str | Path, endpoint_url: str | None = None) -> Iterator:
    """A binary stream of `uri` read front to back: one GET on S3, however large the object (a
    GLDv2 tar is read this way while its md5 is computed)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            body = s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(str(uri), exc) from None
        try:
            yield body
        finally:
            body.close()
        return
    try:
        stream = open(uri, "rb")
    except FileNotFoundError:
        raise AbairError(uri, "file not found") from None
    except OSError as exc:
        raise AbairError(uri, f"cannot read ({exc.strerror})") from None
    with stream:
        yield stream


def write_bytes(uri: str | Path, data: bytes, endpoint_url: str | None = None) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(str(uri), exc) from None
        return
    with atomic_path(uri) as tmp:
        tmp.write_bytes(data)


def upload_file(local: str | Path, uri: str | Path, endpoint_url: str | None = None) -> None:
    """Copy a finished local file to `uri` (multipart on S3 for large files)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            s3_client(endpoint_url).upload_file(str(local), bucket, key, Config=_transfer_config())
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(str(uri), exc) from None
        return
    with atomic_path(uri) as tmp:
        shutil.copyfile(local, tmp)


def download_file(uri: str | Path, local: str | Path, endpoint_url: str | None = None) -> Path:
    local = Path(local)
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        with atomic_path(local) as tmp:
            try:
                s3_client(endpoint_url).download_file(bucket, key, str(tmp), Config=_transfer_config())
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(str(uri), exc) from None
        return local
    with atomic_path(local) as tmp:
        try:
            shutil.copyfile(uri, tmp)
        except FileNotFoundError:
            raise AbairError(uri, "file not found") from None
    return local


@dataclass(frozen=True)
class Entry:
    uri: str       # full URI or path
    relpath: str   # path relative to the listed root, '/'-separated
    size: int
    version: str   # ETag on S3, mtime_ns on disk: changes when the content does


def list_files(root: str | Path, suffixes: tuple[str, ...] | None = None,
               endpoint_url: str | None = None, recursive: bool = True) -> list[Entry]:
    """Every file under `root` (recursive, or only its direct children), sorted by relative path;
    `suffixes` lower-case, with dot."""
    def wanted(name: str) -> bool:
        return suffixes is None or name.lower().endswith(suffixes)

    entries = []
    if is_s3(root):
        bucket, prefix = split_s3(str(root))
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        # A delimiter keeps S3 from listing what lies below the direct children (a GLDv2 split
        # folder may also hold the 4 million extracted images)
        below = {} if recursive else {"Delimiter": "/"}
        try:
            pages = s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **below)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/") and wanted(rel):
                        entries.append(Entry(f"s3://{bucket}/{obj['Key']}", rel, obj["Size"], obj["ETag"].strip('"')))
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(str(root), exc) from None
    else:
        root_path = Path(root)
        if not root_path.exists():
            raise AbairError(root, "folder not found")
        if not root_path.is_dir():
            raise AbairError(root, "not a folder")
        base = str(root_path)
        for uri, relpath, stat in _local_files(base, "" if base == "." else base.rstrip("/") + "/", "", recursive):
            if not relpath.rsplit("/", 1)[-1].startswith(".") and wanted(relpath):
                entries.append(Entry(uri, relpath, stat.st_size, str(stat.st_mtime_ns)))
    return sorted(entries, key=lambda e: e.relpath)


def _local_files(folder: str, uri_prefix: str, rel_prefix: str, recursive: bool) -> Iterator[tuple[str, str, os.stat_result]]:
    """(uri, relative path, stat) of every file under `folder`, as Path.rglob and is_file see them
    (symlinks to files followed, symlinked folders not entered, unreadable folders skipped), with
    one stat per file: os.scandir lists 100,000 files several times faster than pathlib."""
    try:
        with os.scandir(folder) as listing:
            children = list(listing)
    except PermissionError:
        return
    for child in children:
        relpath = rel_prefix + child.name
        if child.is_dir(follow_symlinks=False):
            if recursive:
                yield from _local_files(child.path, uri_prefix, relpath + "/", recursive)
        elif child.is_file():
            yield uri_prefix + relpath, relpath, child.stat()


def delete(uri: str | Path, endpoint_url: str | None = None) -> None:
    """Remove one file or object; one that is not there is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(str(uri), exc) from None
        return
    Path(uri).unlink(missing_ok=True)


def exists(uri: str | Path, endpoint_url: str | None = None) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        from botocore.exceptions import ClientError
        try:
            s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(str(uri), exc) from None
    return Path(uri).exists()
