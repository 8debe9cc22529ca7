"""Property-based fuzzing of the decoding boundaries: mutated PNG, JPEG, TIFF and WebP bytes
(flipped and overwritten bytes, truncation, inserted bytes, rewritten declared sizes) fed to
`imageio.decode`, and mutated shard tars fed to the shard reader. Every case ends in a result or
the project's AbairError: never another exception, never a hang (pytest-timeout), never more
memory than a bound (an address-space limit of 2 GiB over what the process already maps).

200 examples per format per boundary in CI; `ABAIR_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_decode.py`
for a longer run. Inputs that once failed are kept under tests/fuzz_regressions/ and replayed.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import struct
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tasks.core import imageio  # noqa: E402
from tasks.core.errors import AbairError  # noqa: E402

EXAMPLES = int(os.environ.get("ABAIR_FUZZ_EXAMPLES", "200"))
# The fuzzing runs in a process of its own (test_fuzz_in_a_bounded_process starts it): the
# address-space bound must not reach the threads and services a shared test worker runs.
CHILD = os.environ.get("ABAIR_FUZZ_CHILD") == "1"
in_child = pytest.mark.skipif(not CHILD, reason="runs inside test_fuzz_in_a_bounded_process")
MEMORY_BOUND = 2 << 30
REGRESSIONS = Path(__file__).parent / "fuzz_regressions"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def memory_bound(extra: int = MEMORY_BOUND):
    """Cap this process's address space at what it maps now plus `extra` (soft limit, restored)."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(hard, mapped + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    out = {}
    for ext in (".png", ".jpg", ".tif", ".webp"):
        ok, buf = cv2.imencode(ext, photo)
        assert ok
        out[ext] = buf.tobytes()
    ok, buf = cv2.imencode(".png", np.concatenate([photo.astype(np.uint16) * 257, np.full((24, 32, 1), 65535, np.uint16)], 2))
    out[".png16"] = buf.tobytes()
    return out


SEEDS = seed_images()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Up to four mutations, biased towards the header where decoders read sizes and lengths."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "size"]))
        header = min(len(data), 64) or 1
        at = draw(st.one_of(st.integers(0, header - 1), st.integers(0, max(0, len(data) - 1))))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "size" and len(data) >= at + 4:
            # a 16- or 32-bit field rewritten with a large or odd value: declared sizes live in such fields
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFF, 60000, 0xFFFFFFFF, 0x7FFFFFFF]))
            width = draw(st.sampled_from([2, 4]))
            data[at:at + width] = value.to_bytes(4, "big")[-width:]
    return bytes(data)


def decode_or_project_error(data: bytes) -> None:
    try:
        raw = imageio.decode(data, "fuzzed")
    except AbairError as exc:
        assert str(exc).startswith("fuzzed: ")
        return
    assert isinstance(raw, np.ndarray) and raw.ndim in (2, 3) and raw.size > 0
    assert raw.shape[0] * raw.shape[1] <= imageio.MAX_IMAGE_PIXELS


@in_child
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_decode_fuzzed_images(fmt):
    @FUZZ
    @given(mutated(SEEDS[fmt]))
    def check(data):
        decode_or_project_error(data)

    with memory_bound():
        check()


@in_child
def test_decode_regressions():
    """Files that once broke the boundary (kept as found)."""
    files = sorted(REGRESSIONS.glob("*")) if REGRESSIONS.is_dir() else []
    for path in files:
        with memory_bound():
            decode_or_project_error(path.read_bytes())


def shard_bytes() -> bytes:
    """A two-sample shard in the synthesis layout, built in memory."""
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("a000", "a001"):
            image = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            members = {"clean.png": imageio.encode_png(image), "degraded.png": imageio.encode_png(image[::-1]),
                       "mask.png": imageio.encode_png(np.zeros((16, 16), np.uint8)), "json": b'{"seed": 0}'}
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


SHARD = shard_bytes()


@in_child
@pytest.mark.timeout(90)
def test_shard_reader_fuzzed_tars(tmp_path):
    from tasks.data.reader import read_split

    path = tmp_path / "train-000000.tar"
    path.write_bytes(SHARD)
    assert len(list(read_split([str(path)]))) == 2

    @FUZZ
    @given(mutated(SHARD))
    def check(data):
        path.write_bytes(data)
        try:
            for sample in read_split([str(path)]):
                assert sample["clean"].dtype == np.uint8
        except AbairError as exc:
            assert str(path) in str(exc) or "train-000000.tar" in str(exc)

    with memory_bound():
        check()


@in_child
def test_memory_bound_is_enforced():
    """The bound is real: an allocation beyond it fails inside, and the process is whole after."""
    with memory_bound(256 << 20):
        with pytest.raises(MemoryError):
            np.ones(1 << 30, np.uint8)
    assert np.ones(1 << 20, np.uint8).sum() == 1 << 20


def test_declared_sizes_of_mutated_headers_never_crash_the_parser():
    for fmt, data in SEEDS.items():
        for cut in range(0, min(len(data), 80)):
            imageio.declared_size(data[:cut])
            imageio.declared_size(data[:cut] + struct.pack(">I", 0xFFFFFFFF) * 4)


@pytest.mark.timeout(300)
def test_fuzz_in_a_bounded_process():
    """Run this file's fuzzing in a fresh pytest process; every case there must pass."""
    if CHILD:
        pytest.skip("this is the child")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__],
                            env={**os.environ, "ABAIR_FUZZ_CHILD": "1", "PYTEST_XDIST_WORKER": ""},
                            capture_output=True, text=True, timeout=290, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]
