"""Odd and hostile files at the decoding boundary (tasks/core/imageio.decode): every case ends in a
result or one AbairError naming the file, and a batch (abair restore, synthesis) goes on past them."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core import imageio
from tasks.core.errors import AbairError
from tests.conftest import make_components, write_png


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of valid-looking PNG that declares width x height RGB pixels."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def encoded(ext: str, pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif", ".bmp"])
def test_declared_size_is_read_from_the_header(ext):
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    data = encoded(ext, pixels)
    assert imageio.declared_size(data) == (53, 37)
    assert imageio.decode(data, f"x{ext}").shape == (37, 53, 3)


def hostile_cases(good_png: bytes, good_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the error must contain)."""
    nan_tiff = encoded(".tiff", np.full((8, 8, 3), np.nan, np.float32))
    return {
        "huge.png": (png_declaring(60000, 60000), "--max-image-pixels"),
        "empty.png": (b"", "empty file"),
        "text.png": (b"this is not an image\n" * 4, "not a readable image"),
        "truncated.png": (good_png[: len(good_png) // 3], "not a readable image"),
        "truncated_header.jpg": (good_jpeg[:40], "not a readable image"),
        "nan.tiff": (nan_tiff, "NaN"),
    }


@pytest.fixture
def good_images(photos):
    return encoded(".png", photos["coffee"][:64, :80]), encoded(".jpg", photos["chelsea"][:64, :80])


def test_every_hostile_case_is_one_error_naming_the_file(good_images):
    for name, (data, phrase) in hostile_cases(*good_images).items():
        with pytest.raises(AbairError) as caught:
            imageio.decode(data, name)
        assert str(caught.value).startswith(f"{name}: ") and phrase in str(caught.value), str(caught.value)


def test_the_pixel_limit_is_a_knob(good_images):
    png, _ = good_images
    with pytest.raises(AbairError, match="over the limit"):
        imageio.decode(png, "small.png", max_pixels=100)
    assert imageio.decode(png, "small.png", max_pixels=64 * 80).shape == (64, 80, 3)


def test_restore_goes_on_past_bad_files_and_names_each(tmp_path, photos, good_images, capsys):
    from flows.cli import main

    folder = tmp_path / "in"
    write_png(folder / "a_good.png", photos["astronaut"][:48, :64])
    for name, (data, _) in hostile_cases(*good_images).items():
        (folder / name).write_bytes(data)
    write_png(folder / "z_good.png", photos["rocket"][:40, :56])
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    model = make_components(tmp_path / "model")
    code = main(["restore", str(folder), str(loop), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr()
    assert code == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.png", "z_good.png"]
    for name in hostile_cases(*good_images):
        assert f"{folder / name}: " in err.out + err.err, name
    assert f"{loop}: a broken symbolic link" in err.out
    assert "7 of 9 images: could not be restored" in err.err


def test_synthesis_skips_a_hostile_source_and_reports_it(tmp_path, photo_folder, synth_cfg):
    from tasks.data.synthesize import synthesize

    (photo_folder / "huge.png").write_bytes(png_declaring(60000, 60000))
    (photo_folder / "nan.tiff").write_bytes(encoded(".tiff", np.full((80, 80, 3), np.nan, np.float32)))
    index = synthesize(synth_cfg, source=str(photo_folder), out=str(tmp_path / "shards"), progress=False)
    skipped = {Path(s["source"]).name: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"huge.png", "nan.tiff"}
    assert "megapixels" in skipped["huge.png"] and "NaN" in skipped["nan.tiff"]
    assert index["counts"]["sources_used"] == 4
    assert json.loads((tmp_path / "shards" / "index.json").read_text())["skipped"] == index["skipped"]


def test_abair_restore_never_unpickles(tmp_path, photos, mlflow_store):
    """Registry versions and components folders are read as safetensors only: a model file from
    an untrusted place cannot run code through `abair restore` (the pyfunc path does unpickle:
    the README says so). In a process of its own: modules imported while pickle is patched would
    keep the patched functions."""
    import subprocess
    import sys

    from tasks.registry.register import register
    from tasks.serve.pyfunc import save_restorer

    model = make_components(tmp_path / "model")
    version = register(model, {"summary/all/sw/psnr": 20.0}, params="p", data="d", suite="s", commit="c",
                       save_restorer=save_restorer)["restorer"]["version"]
    image = write_png(tmp_path / "in.png", photos["coffee"][:40, :48])
    script = f"""
import pickle, sys
import cloudpickle, torch

def refuse(*args, **kwargs):
    raise AssertionError("unpickled")

for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (cloudpickle, "load"),
                     (cloudpickle, "loads"), (torch, "load")):
    setattr(target, name, refuse)
from flows.cli import main
for spec, out in (({str(model)!r}, "a"), ("models:/abair-restorer/{version}", "b")):
    assert main(["restore", {str(image)!r}, "--model", spec, "--out", {str(tmp_path)!r} + "/" + out,
                 "--device", "cpu"]) == 0
import mlflow.pyfunc
try:
    mlflow.pyfunc.load_model("models:/abair-restorer/{version}")
except AssertionError as exc:
    assert "unpickled" in str(exc)
    print("the patch catches the pyfunc's own unpickling")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the patch catches the pyfunc's own unpickling" in result.stdout
    assert (tmp_path / "a" / "in.png").is_file() and (tmp_path / "b" / "in.png").is_file()


def test_synthesis_from_s3_skips_hostile_objects_and_reports_them(tmp_path, photo_folder, synth_cfg, s3_endpoint,
                                                                  s3_bucket):
    from tasks.core import storage
    from tasks.data.synthesize import synthesize

    client, bucket = s3_bucket
    storage._client.cache_clear()
    for path in sorted(p for p in photo_folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"clean/{path.relative_to(photo_folder)}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="clean/huge.png", Body=png_declaring(60000, 60000))
    client.put_object(Bucket=bucket, Key="clean/broken.jpg", Body=b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    cfg = {**synth_cfg, "endpoint_url": s3_endpoint}
    index = synthesize(cfg, source=f"s3://{bucket}/clean", out=str(tmp_path / "shards"), progress=False)
    skipped = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"huge.png", "broken.jpg"}
    assert "megapixels" in skipped["huge.png"] and "not a readable image" in skipped["broken.jpg"]
    assert index["counts"]["sources_used"] == 4


def test_max_bad_fraction_decides_when_bad_sources_fail_the_run(tmp_path, photo_folder, synth_cfg):
    from tasks.data.synthesize import synthesize

    (photo_folder / "huge.png").write_bytes(png_declaring(60000, 60000))
    with pytest.raises(AbairError, match=r"1 of 5 sources are bad, more than synthesize.max_bad_fraction 0.1"):
        synthesize({**synth_cfg, "max_bad_fraction": 0.1}, source=str(photo_folder), out=str(tmp_path / "a"),
                   progress=False)
    assert not (tmp_path / "a").exists()  # nothing half-written under the final name
    index = synthesize({**synth_cfg, "max_bad_fraction": 0.25}, source=str(photo_folder), out=str(tmp_path / "b"),
                       progress=False)
    assert index["counts"]["sources_skipped"] == 1


def test_a_hostile_file_in_a_paired_folder_is_one_error_naming_it(tmp_path, photos):
    from tasks.data.reader import PairedFolder

    for side in ("input", "target"):
        write_png(tmp_path / "pairs" / side / "a.png", photos["coffee"][:32, :32])
    (tmp_path / "pairs" / "input" / "b.png").write_bytes(png_declaring(60000, 60000))
    write_png(tmp_path / "pairs" / "target" / "b.png", photos["coffee"][:32, :32])
    with pytest.raises(AbairError) as caught:
        PairedFolder(tmp_path / "pairs")
    assert str(caught.value).startswith(f"{tmp_path / 'pairs' / 'input' / 'b.png'}: ") and "--max-image-pixels" in str(caught.value)


def test_the_pyfunc_refuses_odd_arrays_with_one_error_each(tmp_path):
    from types import SimpleNamespace

    from tasks.serve.pyfunc import RestorerModel

    folder = make_components(tmp_path / "model")
    model = RestorerModel()
    model.load_context(SimpleNamespace(artifacts={"backbone": str(folder / "backbone.safetensors"),
                                                  "adapters": str(folder / "adapters"),
                                                  "estimator": str(folder / "estimator.safetensors")},
                                       model_config={"device": "cpu"}))
    odd = {"float": np.zeros((8, 8, 3), np.float32), "gray": np.zeros((8, 8), np.uint8),
           "rgba": np.zeros((8, 8, 4), np.uint8), "empty": np.zeros((0, 8, 3), np.uint8),
           "one pixel": np.zeros((1, 1, 3), np.uint8)}
    for name, array in odd.items():
        with pytest.raises(ValueError, match=r"^image 0: "):
            model.predict(None, array)
    assert model.predict(None, np.full((8, 8, 3), 128, np.uint8)).shape == (8, 8, 3)
