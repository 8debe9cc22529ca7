"""Safetensors files written atomically, read with one clear error naming the file.

Every checkpoint of the models package (backbone, adapter, estimator) is a safetensors file whose
string metadata carries a `format` tag and a JSON config, so a file can say what it is before a
single tensor is built.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, of the wrong kind, or mismatched.

    The message is one line, `<file>: <problem>`, the same shape as the pipeline's AbairError.
    """

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class AdapterError(CheckpointError):
    """An adapter file that does not fit this bank or this backbone."""


def stringify_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata is str -> str: strings pass, everything else becomes JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def merge_metadata(reserved: Mapping[str, str], extra: Mapping[str, Any] | None) -> dict[str, str]:
    """Reserved keys describe the file itself; extra metadata may add keys but never overwrite them."""
    extra = stringify_metadata(extra or {})
    clash = sorted(set(extra) & set(reserved))
    if clash:
        raise ValueError(f"extra_metadata may not set reserved keys {clash}")
    return {**extra, **reserved}


def canonical_bytes(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so the same tensors and metadata come out in a
    different byte order from one save to the next; registration and DVC key files by their bytes.
    Data offsets are relative to the end of the header, so only the header is rewritten (padded
    with spaces to 8 bytes, as safetensors does).
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + size:]


def save_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write `tensors` to `path` through a temporary file in the same folder and os.replace.

    A crash mid-write leaves at most a stray `.<name>.tmp-*` file, never a half-written file
    under the final name, and never touches an existing file there until the new one is whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants plain contiguous CPU tensors that share no storage
    plain = {k: t.detach().to("cpu", copy=False).contiguous() for k, t in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(canonical_bytes(save(plain, metadata=dict(metadata))))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike, expected_format: str, error: type[CheckpointError] = CheckpointError,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a checkpoint whose metadata `format` is `expected_format`."""
    path = Path(path)
    if not path.is_file():
        raise error(path, "file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            found = metadata.get("format")
            if found != expected_format:
                what = f"a {found!r} file" if found else "a safetensors file without an ABAIR format tag"
                raise error(path, f"is {what}, not an {expected_format!r} checkpoint")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(path, f"unreadable as safetensors ({reason})") from None
    return tensors, metadata


def metadata_json(path: str | os.PathLike, metadata: Mapping[str, str], key: str,
                  error: type[CheckpointError] = CheckpointError) -> Any:
    """One JSON-valued metadata entry, or a clear error when it is absent or malformed."""
    if key not in metadata:
        raise error(path, f"metadata has no {key!r} entry")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise error(path, f"metadata entry {key!r} is not valid JSON") from None


def describe_keys(keys, limit: int = 4) -> str:
    """`a, b, c, d and 7 more`: enough names to find the problem, short enough for one line."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head if len(keys) <= limit else f"{head} and {len(keys) - limit} more"


def check_tensors(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path: str | os.PathLike,
                  error: type[CheckpointError] = CheckpointError) -> None:
    """The file's tensors must be exactly the ones expected, with the same shapes: one error
    naming the file and the first few offending names otherwise."""
    missing, extra = set(expected) - set(found), set(found) - set(expected)
    if missing or extra:
        parts = ([f"missing tensors {describe_keys(missing)}"] if missing else []) + \
                ([f"unexpected tensors {describe_keys(extra)}"] if extra else [])
        raise error(path, "; ".join(parts))
    wrong = [k for k in expected if expected[k].shape != found[k].shape]
    if wrong:
        raise error(path, f"tensors with the wrong shape: {describe_keys(wrong)}")
