"""`abair restore`: outputs keep the input's size, bit depth, channels, alpha and format; EXIF
orientation is applied; JPEG quality is kept; results are deterministic; inputs are never
overwritten unless asked."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.serve import inference, jpeg, restore
import flows.registry  # noqa: F401  prefect's log handler binds to the stderr of its import: the session's, not a test's
from flows.cli import main
from tasks.core.errors import AbairError
from tests.conftest import make_components


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_components(tmp_path_factory.mktemp("model") / "checkpoints")


@pytest.fixture(scope="module")
def restorer(model_dir):
    from tasks.core.components import load_system_dir

    return load_system_dir(model_dir)


def ramp(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, float in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([x / w, y / h, 0.5 + 0.3 * np.sin(x / 5 + y / 7)], axis=2) + rng.normal(0, 0.03, (h, w, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def write(path: Path, pixels: np.ndarray, params=()) -> Path:
    """pixels in RGB(A) order (or gray) -> file via OpenCV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), pixels, list(params))
    return path


def read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_outputs_keep_size_bit_depth_channels_and_alpha(tmp_path, model_dir):
    img = ramp(21, 30)
    alpha8 = (np.arange(21 * 30).reshape(21, 30) % 256).astype(np.uint8)
    alpha16 = (np.arange(21 * 30).reshape(21, 30) * 97).astype(np.uint16)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    folder = tmp_path / "in"
    write(folder / "rgb8.png", (img * 255).astype(np.uint8))
    write(folder / "deep" / "rgb16.png", (img * 65535).astype(np.uint16))
    write(folder / "gray8.png", (gray * 255).astype(np.uint8))
    write(folder / "gray16.png", (gray * 65535).astype(np.uint16))
    write(folder / "rgba8.png", np.dstack([(img * 255).astype(np.uint8), alpha8]))
    write(folder / "rgba16.png", np.dstack([(img * 65535).astype(np.uint16), alpha16]))
    out = tmp_path / "out"
    summary = restore.restore_files([str(folder)], model=str(model_dir), out=out, device="cpu", progress=False,
                                    echo=lambda _: None)
    assert len(summary["images"]) == 6 and not summary["failed"]
    expected = {"rgb8.png": (np.uint8, 3), "deep/rgb16.png": (np.uint16, 3), "gray8.png": (np.uint8, None),
                "gray16.png": (np.uint16, None), "rgba8.png": (np.uint8, 4), "rgba16.png": (np.uint16, 4)}
    for rel, (dtype, channels) in expected.items():
        before, after = read(folder / rel), read(out / rel)
        assert after.dtype == dtype and after.shape == before.shape, rel
        assert (after.ndim == 2) == (channels is None), rel
        assert not np.array_equal(after, before), f"{rel}: the model changed nothing"
    assert np.array_equal(read(out / "rgba8.png")[:, :, 3], alpha8)
    assert np.array_equal(read(out / "rgba16.png")[:, :, 3], alpha16)
    # 16-bit output carries more than 8 bits of information
    assert np.any(read(out / "deep/rgb16.png") % 257 != 0)


def test_16_bit_output_matches_the_model_output_at_16_bit_precision(tmp_path, model_dir, restorer):
    img = ramp(24, 40, seed=3)
    stored = (img * 65535 + 0.5).astype(np.uint16)
    path = write(tmp_path / "in" / "x.png", stored)
    restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / "out", device="cpu", echo=lambda _: None)
    expected, _ = inference.restore_rgb(restorer, stored.astype(np.float32) / 65535)
    got = cv2.cvtColor(read(tmp_path / "out" / "x.png"), cv2.COLOR_BGR2RGB).astype(np.float32) / 65535
    assert np.abs(got - expected).max() <= 1.0 / 65535 + 1e-6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    from PIL import Image, ImageOps

    pixels = (ramp(5, 7) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif.tobytes())
    data = buf.getvalue()
    assert restore.exif_orientation(data) == orientation
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert np.array_equal(restore.apply_orientation(pixels, orientation), upright)


def test_jpeg_with_exif_orientation_is_restored_upright_at_its_quality(tmp_path, model_dir, restorer):
    from PIL import Image

    pixels = (ramp(24, 40, seed=1) * 255).astype(np.uint8)     # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = 6                                            # rotate 90 degrees clockwise to display
    path = tmp_path / "in" / "photo.jpg"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path, "JPEG", quality=83, exif=exif.tobytes())
    data = path.read_bytes()
    assert jpeg.estimate_jpeg_quality(data) == 83

    out = tmp_path / "out"
    restore.restore_files([str(path)], model=str(model_dir), out=out, device="cpu", echo=lambda _: None)
    result = read(out / "photo.jpg")
    assert result.shape == (40, 24, 3)                          # upright: rotated
    # exactly what restoring the upright pixels and writing them at quality 83 gives
    upright = restore.decode_image(data, "photo.jpg")
    assert upright.orientation == 6 and upright.jpeg_quality == 83
    expected, _ = inference.restore_rgb(restorer, upright.rgb)
    assert (out / "photo.jpg").read_bytes() == restore.encode_like(expected, upright, ".jpg")
    assert jpeg.estimate_jpeg_quality((out / "photo.jpg").read_bytes()) == 83
    assert restore.exif_orientation((out / "photo.jpg").read_bytes()) == 1


@pytest.mark.parametrize("quality", [20, 75, 95, 100])
def test_jpeg_quality_is_estimated_from_the_quantisation_tables(quality):
    pixels = (ramp(16, 16) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok and jpeg.estimate_jpeg_quality(buf.tobytes()) == quality
    assert jpeg.estimate_jpeg_quality(b"\x89PNG not a jpeg") is None


def test_restoring_is_deterministic(tmp_path, model_dir):
    path = write(tmp_path / "in" / "a.png", (ramp(24, 40, seed=2) * 255).astype(np.uint8))
    for out in ("o1", "o2"):
        restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / out, device="cpu", echo=lambda _: None)
    assert (tmp_path / "o1" / "a.png").read_bytes() == (tmp_path / "o2" / "a.png").read_bytes()


def test_large_images_run_in_tiles_and_keep_their_size(tmp_path, model_dir, restorer, monkeypatch):
    img = ramp(100, 140, seed=4)
    path = write(tmp_path / "big.png", (img * 255).astype(np.uint8))
    whole, _ = inference.restore_rgb(restorer, (img * 255).astype(np.uint8).astype(np.float32) / 255, max_pixels=None)
    from models.backbone import TransformerBlock

    with monkeypatch.context() as patch:   # exact tiling: no transformer block runs on the whole image
        patch.setattr(TransformerBlock, "forward", lambda *_: pytest.fail("a block ran whole"))
        restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / "out", device="cpu",
                              max_pixels=72 * 72, echo=lambda _: None)
    tiled = read(tmp_path / "out" / "big.png")
    assert tiled.shape == (100, 140, 3)
    tiled_rgb = cv2.cvtColor(tiled, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    assert np.abs(tiled_rgb - whole).max() <= 0.5 / 255 + 1e-6     # the whole image's pixels, rounded to 8 bits

    restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / "local", device="cpu", max_pixels=72 * 72,
                          tiling="local", echo=lambda _: None)
    local = cv2.cvtColor(read(tmp_path / "local" / "big.png"), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    assert not np.allclose(local, whole, atol=1 / 255)          # independent tiles see their own statistics
    assert np.abs(local - whole).mean() < 0.03                  # and are blended, not patched
    with pytest.raises(AbairError, match="tiling"):
        restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / "x", device="cpu", tiling="approx")


def test_never_overwrites_an_input_unless_asked(tmp_path, model_dir):
    folder = tmp_path / "photos"
    path = write(folder / "a.png", (ramp(20, 20) * 255).astype(np.uint8))
    before = path.read_bytes()
    with pytest.raises(AbairError, match=r"a\.png: would be overwritten by its restored image"):
        restore.restore_files([str(folder)], model=str(model_dir), out=folder, device="cpu", echo=lambda _: None)
    assert path.read_bytes() == before
    restore.restore_files([str(folder)], model=str(model_dir), out=folder, device="cpu", overwrite=True,
                          echo=lambda _: None)
    assert path.read_bytes() != before and read(path).shape == (20, 20, 3)
    assert [p.name for p in folder.iterdir()] == ["a.png"]       # no temporary file left behind


def test_inputs_by_file_and_glob_and_name_clashes(tmp_path, model_dir):
    for name in ("x1.png", "x2.png", "y.png"):
        write(tmp_path / "in" / name, (ramp(16, 16) * 255).astype(np.uint8))
    write(tmp_path / "other" / "y.png", (ramp(16, 16) * 255).astype(np.uint8))
    jobs = restore.plan([str(tmp_path / "in" / "x*.png"), str(tmp_path / "in" / "y.png")], tmp_path / "out")
    assert [j.target.name for j in jobs] == ["x1.png", "x2.png", "y.png"]
    with pytest.raises(AbairError, match="would be written to"):
        restore.plan([str(tmp_path / "in" / "y.png"), str(tmp_path / "other" / "y.png")], tmp_path / "out")
    with pytest.raises(AbairError, match="no such file or folder"):
        restore.plan([str(tmp_path / "missing.png")], tmp_path / "out")
    with pytest.raises(AbairError, match="no images match"):
        restore.plan([str(tmp_path / "in" / "*.tif")], tmp_path / "out")


def test_cli_prints_weights_and_throughput_and_reports_bad_images(tmp_path, model_dir, capsys):
    folder = tmp_path / "in"
    write(folder / "good.png", (ramp(24, 24) * 255).astype(np.uint8))
    write(folder / "tiny.png", np.zeros((1, 1, 3), np.uint8))
    code = main(["restore", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{folder / 'good.png'}: restored -> {tmp_path / 'out' / 'good.png'} (weights: " in captured.out
    assert "rain 0." in captured.out and "haze 0." in captured.out
    assert "restored 1 images" in captured.out and "images/s" in captured.out and "MP/s" in captured.out
    assert "tiny.png: image is too small to restore (1x1 px)" in captured.out
    assert "error: 1 of 2 images: could not be restored" in captured.err
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "tiny.png").exists()


def test_oh_mode_uses_one_adapter(tmp_path, model_dir, restorer):
    _, weights = inference.restore_rgb(restorer, ramp(32, 32), mode="oh")
    keep = weights.pop("keep")
    # one adapter at full weight, or none when the backbone alone wins (do no harm)
    assert sorted(weights.values()) in ([0.0] * (len(weights) - 1) + [1.0], [0.0] * len(weights))
    assert 0 <= keep <= 1
    _, soft = inference.restore_rgb(restorer, ramp(32, 32), mode="sw")
    soft_keep = soft.pop("keep")
    assert soft_keep == keep and 0 < sum(soft.values()) <= 1 + 1e-6 and all(0 < w < 1 for w in soft.values())


def test_a_model_folder_that_is_not_one_is_a_clear_error(tmp_path):
    with pytest.raises(AbairError, match="no such model folder"):
        restore.load_model(str(tmp_path / "nothing"), "cpu")
    with pytest.raises(AbairError, match="not a model folder"):
        restore.load_model(str(tmp_path), "cpu")
