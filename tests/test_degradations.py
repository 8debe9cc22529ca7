"""Every registered degradation: the contract, severity behaviour, determinism, and physics checks
with known answers."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

import degradations
from degradations import bitdepth, blur, haze, jpeg, lowlight, noise

NAMES = degradations.names()
DETERMINISTIC = {"jpeg", "bitdepth"}  # without dithering the rng is not used


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def square_photo(rgb8: np.ndarray, size: int) -> np.ndarray:
    side = min(rgb8.shape[:2])
    crop = rgb8[:side, :side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo on the 8-bit grid (flat synthetic images hide differences), 96x96."""
    import skimage.data

    return square_photo(skimage.data.astronaut(), 96)


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    import skimage.data

    return square_photo(skimage.data.coffee(), 80)


# ---------------------------------------------------------------- registry


def test_registry_lists_modules_that_follow_the_contract():
    assert NAMES == list(degradations.REGISTRY)
    assert set(NAMES) >= {"rain", "haze", "noise", "blur", "lowlight", "jpeg", "bitdepth", "snow"}
    for name in NAMES:
        module = degradations.get(name)
        assert module.NAME == name and isinstance(module.ORDER, int) and callable(module.apply)
        assert "severity" in module.__doc__.lower()  # the severity -> physical range mapping
    order = {name: degradations.get(name).ORDER for name in NAMES}
    assert order["haze"] < order["lowlight"] < order["blur"] < order["rain"] == order["snow"] < order["noise"]
    assert order["noise"] < order["jpeg"] == order["bitdepth"]


def test_unknown_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="nope") as err:
        degradations.get("nope")
    assert "noise" in str(err.value)  # and lists the known ones


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_contract_shape_dtype_range_params(name, photo):
    module = degradations.get(name)
    before = photo.copy()
    for severity in (0.3, 1.0):
        out, params = module.apply(photo, np.random.default_rng(0), severity)
        assert out.shape == photo.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 and np.isfinite(out).all()
        assert isinstance(params, dict) and params
        assert json.loads(json.dumps(params)) == params  # plain python types only
        assert not params.get("identity", False)
    assert np.array_equal(photo, before)  # the input is never modified


@pytest.mark.parametrize("name", NAMES)
def test_odd_and_tiny_sizes(name, photo):
    module = degradations.get(name)
    for shape in ((37, 53), (5, 7), (1, 1)):
        img = np.ascontiguousarray(photo[:shape[0], :shape[1]])
        out, _ = module.apply(img, np.random.default_rng(3), 0.8)
        assert out.shape == img.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_identity(name, photo):
    out, params = degradations.get(name).apply(photo, np.random.default_rng(0), 0.0)
    assert out is not photo and np.array_equal(out, photo)
    assert psnr(out, photo) > 50.0
    assert params == {"identity": True}


@pytest.mark.parametrize("name", NAMES)
def test_bad_severity_and_image_are_value_errors(name, photo):
    module = degradations.get(name)
    with pytest.raises(ValueError, match="severity"):
        module.apply(photo, np.random.default_rng(0), 1.5)
    with pytest.raises(ValueError, match="HxWx3"):
        module.apply(photo[:, :, 0], np.random.default_rng(0), 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_psnr_falls_as_severity_rises(name, seed, photo, coffee):
    module = degradations.get(name)
    for img in (photo, coffee):
        scores = [psnr(module.apply(img, np.random.default_rng(seed), s)[0], img) for s in (0.25, 0.5, 1.0)]
        assert scores[0] > scores[1] > scores[2], (name, seed, scores)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(name, photo):
    module = degradations.get(name)
    first, params = module.apply(photo, np.random.default_rng(7), 0.6)
    again, params_again = module.apply(photo, np.random.default_rng(7), 0.6)
    other, other_params = module.apply(photo, np.random.default_rng(8), 0.6)
    assert first.tobytes() == again.tobytes() and params == params_again
    if name in DETERMINISTIC:
        assert first.tobytes() == other.tobytes()
    elif name == "blur" and params["kind"] != "motion":
        # Only the motion path is random; a gaussian or disc kernel is fixed by the severity.
        assert params["kind"] == other_params["kind"] and first.tobytes() == other.tobytes()
    else:
        assert first.tobytes() != other.tobytes()


def test_blur_randomness_is_the_kind_and_the_motion_path(photo):
    for kind in blur.KINDS:
        a, _ = blur.apply(photo, np.random.default_rng(7), 0.6, kind=kind)
        b, _ = blur.apply(photo, np.random.default_rng(8), 0.6, kind=kind)
        assert (a.tobytes() != b.tobytes()) == (kind == "motion")


# ---------------------------------------------------------------- noise


def test_noise_std_at_severity_one_is_50_over_255():
    grey = np.full((128, 128, 3), 0.5, np.float32)
    out, params = noise.apply(grey, np.random.default_rng(0), 1.0)
    residual = out.astype(np.float64) - 0.5
    assert params["sigma"] == pytest.approx(50 / 255)
    assert residual.std() == pytest.approx(50 / 255, rel=0.05)
    assert abs(residual.mean()) < 0.005
    # Independent across channels, as in CBSD68.
    assert abs(np.corrcoef(residual[..., 0].ravel(), residual[..., 1].ravel())[0, 1]) < 0.05


def test_poisson_gaussian_noise_grows_with_the_signal():
    dark = np.full((128, 128, 3), 0.1, np.float32)
    grey = np.full((128, 128, 3), 0.5, np.float32)
    stds = {}
    for label, img in (("dark", dark), ("grey", grey)):
        out, params = noise.apply(img, np.random.default_rng(0), 0.5, poisson=True)
        stds[label] = float((out.astype(np.float64) - img).std())
    assert params["model"] == "poisson_gaussian"
    # Matched to the Gaussian model at mid-grey: variance 0.5 * a + b = sigma**2.
    assert stds["grey"] == pytest.approx(25 / 255, rel=0.05)
    expected_dark = math.sqrt(params["shot_gain"] * 0.1 + params["read_sigma"] ** 2)
    assert stds["dark"] == pytest.approx(expected_dark, rel=0.05)
    same, _ = noise.apply(grey, np.random.default_rng(0), 0.5, model="poisson_gaussian")
    assert np.array_equal(same, out)
    with pytest.raises(ValueError, match="laplace"):
        noise.apply(grey, np.random.default_rng(0), 0.5, model="laplace")


# ---------------------------------------------------------------- haze


def test_haze_with_zero_beta_is_the_identity(photo):
    out, params = haze.apply(photo, np.random.default_rng(0), 0.7, beta=0.0)
    assert params["beta"] == 0.0 and params["transmission_min"] == 1.0
    np.testing.assert_allclose(out, photo, atol=1e-6)


def test_haze_with_uniform_depth_follows_the_scattering_formula(photo):
    depth = np.full(photo.shape[:2], 0.5, np.float32)
    airlight = [0.8, 0.85, 0.9]
    out, params = haze.apply(photo, np.random.default_rng(0), 0.5, depth=depth, airlight=airlight)
    beta = 0.5 * haze.MAX_BETA
    t = math.exp(-beta * 0.5)
    expected = photo.astype(np.float64) * t + np.array(airlight) * (1.0 - t)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert params["beta"] == pytest.approx(beta) and params["airlight"] == airlight
    np.testing.assert_allclose(haze.transmission(depth, beta), t, rtol=1e-6)


def test_haze_depth_is_far_at_the_top_and_in_range():
    depths = [haze.pseudo_depth(np.random.default_rng(seed), 64, 48)[0] for seed in range(8)]
    for depth in depths:
        assert depth.shape == (64, 48) and depth.dtype == np.float32
        assert depth.min() >= 0.0 and depth.max() <= 1.0
    assert haze.pseudo_depth(np.random.default_rng(0), 300, 200)[0].shape == (64, 64)  # smooth: kept coarse
    mean = np.mean(depths, axis=0)
    assert mean[:16].mean() > mean[-16:].mean() + 0.2


# ---------------------------------------------------------------- blur


def test_blur_kernels_are_normalised_and_centred():
    rng = np.random.default_rng(0)
    for length in (3.0, 10.0, 21.0):
        kernel = blur.motion_kernel(rng.uniform(0, 2 * math.pi), rng.normal(0, 0.12, 15), length)
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5) and kernel.shape[0] % 2 == 1
        centre = kernel.shape[0] // 2
        ys, xs = np.mgrid[:kernel.shape[0], :kernel.shape[1]]
        assert (kernel * ys).sum() == pytest.approx(centre, abs=1e-3)
        assert (kernel * xs).sum() == pytest.approx(centre, abs=1e-3)
    disc = blur.defocus_kernel(4.0)
    assert disc.sum() == pytest.approx(1.0, abs=1e-5) and disc.shape == (9, 9)


def test_blur_filtering_equals_plain_filter2d(photo):
    # Trimmed kernels and row bands (the fast paths) give the same result as filter2D itself.
    rng = np.random.default_rng(0)
    for length in (4.0, 12.0, 21.0):
        for angle in (0.1, math.pi / 4, 2.0):
            kernel = blur.motion_kernel(angle, rng.normal(0, 0.12, 15), length)
            expected = cv2.filter2D(photo, -1, kernel, borderType=cv2.BORDER_REFLECT)
            np.testing.assert_allclose(blur.filter_with(photo, kernel), expected, atol=1e-5)
            np.testing.assert_allclose(blur.filter_in_bands(photo, kernel), expected, atol=1e-5)
    assert len(blur.row_bands(blur.motion_kernel(math.pi / 4, np.zeros(15), 21.0))) > 1


@pytest.mark.parametrize("kind", blur.KINDS)
def test_blur_keeps_a_flat_image_flat(kind):
    flat = np.full((40, 40, 3), 0.3, np.float32)
    out, params = blur.apply(flat, np.random.default_rng(0), 1.0, kind=kind)
    assert params["kind"] == kind
    np.testing.assert_allclose(out, flat, atol=1e-5)


def test_blur_kind_is_drawn_when_not_given(photo):
    kinds = {blur.apply(photo, np.random.default_rng(seed), 0.5)[1]["kind"] for seed in range(20)}
    assert kinds == set(blur.KINDS)


# ---------------------------------------------------------------- lowlight, rain, snow


def test_lowlight_darkens_in_linear_light(photo):
    out, params = lowlight.apply(photo, np.random.default_rng(0), 1.0)
    assert lowlight.EXPOSURE_FLOOR_RANGE[0] <= params["exposure"] <= lowlight.EXPOSURE_FLOOR_RANGE[1]
    # A linear-light exposure of e scales sRGB values by about e ** (1 / 2.2), gamma darkens more.
    ratio = out.mean() / photo.mean()
    assert ratio < params["exposure"] ** (1 / 2.2) * 1.2
    assert all(abs(g - 1.0) <= lowlight.COLOUR_CAST + 1e-9 for g in params["channel_gains"])


@pytest.mark.parametrize("name", ["rain", "snow"])
def test_particles_only_add_light(name, photo):
    out, params = degradations.get(name).apply(photo, np.random.default_rng(0), 1.0)
    assert (out >= photo - 1e-6).all()
    assert len(params["layers"]) == 3 and params["veil"] > 0
    light, params = degradations.get(name).apply(photo, np.random.default_rng(0), 0.2)
    assert len(params["layers"]) == 1


# ---------------------------------------------------------------- jpeg, bitdepth


def test_jpeg_quality_mapping():
    assert jpeg.quality_for(1e-6) == 60
    assert jpeg.quality_for(0.5) == 35
    assert jpeg.quality_for(0.8) == 20
    assert jpeg.quality_for(1.0) == 10


@pytest.mark.parametrize("severity", [0.2, 0.8, 1.0])
def test_jpeg_equals_opencv_encode_decode(severity, photo):
    out, params = jpeg.apply(photo, np.random.default_rng(0), severity)
    quality = jpeg.quality_for(severity)
    assert params == {"quality": quality}
    bgr8 = np.round(photo[:, :, ::-1] * 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", bgr8, [cv2.IMWRITE_JPEG_QUALITY, quality])
    expected = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / 255.0
    assert ok and np.array_equal(out, expected)


def test_bitdepth_at_severity_one_has_at_most_16_levels(photo):
    for dither in (False, "ordered", "random"):
        out, params = bitdepth.apply(photo, np.random.default_rng(0), 1.0, dither=dither)
        assert params["bits"] == 4 and params["levels"] == 16
        for channel in range(3):
            values = np.unique(out[:, :, channel])
            assert len(values) <= 16
            np.testing.assert_allclose(values * 15, np.round(values * 15), atol=1e-5)  # on the k/15 grid
    assert [bitdepth.bits_for(s) for s in (0.1, 0.25, 0.5, 0.75, 1.0)] == [8, 7, 6, 5, 4]


def test_bitdepth_dithering(photo):
    plain, _ = bitdepth.apply(photo, np.random.default_rng(0), 1.0)
    ordered, _ = bitdepth.apply(photo, np.random.default_rng(0), 1.0, dither="ordered")
    ordered_again, _ = bitdepth.apply(photo, np.random.default_rng(1), 1.0, dither="ordered")
    random_a, _ = bitdepth.apply(photo, np.random.default_rng(0), 1.0, dither="random")
    random_b, _ = bitdepth.apply(photo, np.random.default_rng(1), 1.0, dither="random")
    assert np.array_equal(ordered, ordered_again) and not np.array_equal(ordered, plain)
    assert not np.array_equal(random_a, random_b)
    # Dithering trades banding for noise: the local mean follows the input more closely.
    smooth = lambda img: cv2.blur(img, (8, 8))  # noqa: E731
    assert psnr(smooth(ordered), smooth(photo)) > psnr(smooth(plain), smooth(photo))
    with pytest.raises(ValueError, match="floyd"):
        bitdepth.apply(photo, np.random.default_rng(0), 1.0, dither="floyd")
