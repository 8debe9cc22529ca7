"""Every registered degradation: the contract, severity behaviour, determinism, and physics checks
with known answers."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

import degradations
from degradations import bitdepth, blur, camera_noise, haze, jpeg, lowlight, noise, rain

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


# ---------------------------------------------------------------- camera noise (Brooks et al. 2019)


def flat(level: float, size: int = 192) -> np.ndarray:
    return np.full((size, size, 3), level, np.float32)


def to_linear(img: np.ndarray) -> np.ndarray:
    """The camera's own tone curve and gamma undone: linear light, where its noise is linear."""
    return camera_noise.gamma_expansion(camera_noise.inverse_smoothstep(img)).astype(np.float64)


def lag1_correlation(residual: np.ndarray) -> float:
    """Mean over channels and both directions of the correlation between neighbouring pixels."""
    r = residual - residual.mean(axis=(0, 1))
    pairs = [(r[:, :-1, c], r[:, 1:, c]) for c in range(3)] + [(r[:-1, :, c], r[1:, :, c]) for c in range(3)]
    return float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs]))


def channel_correlations(residual: np.ndarray) -> np.ndarray:
    """(R-G, R-B, G-B) correlations of an HxWx3 residual."""
    return np.corrcoef(residual.reshape(-1, 3).T)[[0, 0, 1], [1, 2, 2]]


def test_camera_noise_is_registered_beside_noise():
    assert degradations.get("camera_noise") is camera_noise
    assert NAMES.index("camera_noise") == NAMES.index("noise") + 1
    assert camera_noise.ORDER == noise.ORDER
    assert "brooks" in camera_noise.__doc__.lower() and "severity 1.0" in camera_noise.__doc__


def test_camera_noise_determinism_and_options(photo):
    first, params = camera_noise.apply(photo, np.random.default_rng(5), 0.7)
    again, params_again = camera_noise.apply(photo, np.random.default_rng(5), 0.7)
    other, _ = camera_noise.apply(photo, np.random.default_rng(6), 0.7)
    assert first.tobytes() == again.tobytes() and params == params_again
    assert first.tobytes() != other.tobytes()
    assert json.loads(json.dumps(params)) == params and params["jpeg_quality"] is None
    # The JPEG quality is drawn last: the same seed gives the same noisy image, then compressed.
    compressed, q_params = camera_noise.apply(photo, np.random.default_rng(5), 0.7, jpeg_quality=80)
    expected = jpeg.encode_decode(jpeg.to_uint8(first), 80).astype(np.float32) / 255.0
    assert q_params["jpeg_quality"] == 80 and np.array_equal(compressed, expected)
    qualities = {camera_noise.apply(photo, np.random.default_rng(seed), 0.7, jpeg_quality="random")[1]["jpeg_quality"]
                 for seed in range(12)}
    assert len(qualities) > 3 and all(60 <= q <= 95 for q in qualities)
    for bad in ("high", 0, 101, 2.5, True):
        with pytest.raises(ValueError, match="jpeg_quality"):
            camera_noise.apply(photo, np.random.default_rng(0), 0.5, jpeg_quality=bad)
    out, identity_params = camera_noise.apply(photo, np.random.default_rng(0), 0.0, jpeg_quality="random")
    assert np.array_equal(out, photo) and identity_params == {"identity": True}


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (37, 53), (96, 95)])
def test_camera_noise_odd_and_one_pixel_sizes(shape, photo):
    img = np.ascontiguousarray(photo[:shape[0], :shape[1]])
    for severity in (0.1, 1.0):
        out, params = camera_noise.apply(img, np.random.default_rng(2), severity, jpeg_quality="random")
        assert out.shape == img.shape and out.dtype == np.float32 and out.flags.c_contiguous
        assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
        assert json.loads(json.dumps(params)) == params
    # Every channel is really sampled, even one pixel wide (padding to whole 2x2 Bayer cells): a
    # flat grey comes back grey up to the faint noise of a low severity.
    grey = np.full(img.shape, 0.5, np.float32)
    out, _ = camera_noise.apply(grey, np.random.default_rng(2), 0.05)
    assert np.abs(out - 0.5).max() < 0.06  # a channel never sampled would be off by about 0.5


def test_camera_tone_curve_and_gains_follow_the_paper():
    y = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    np.testing.assert_allclose(camera_noise.smoothstep(camera_noise.inverse_smoothstep(y)), y, atol=1e-6)
    np.testing.assert_allclose(camera_noise.inverse_smoothstep(y), 0.5 - np.sin(np.arcsin(1 - 2 * y) / 3), atol=1e-6)
    np.testing.assert_allclose(camera_noise.gamma_expansion(y.copy()), np.maximum(y, 1e-8) ** 2.2, atol=1e-5)
    # The highlight-preserving inversion, against the paper's formula written out in numpy.
    rng = np.random.default_rng(0)
    img = rng.random((40, 50, 3)).astype(np.float32)
    img[5:12] = 0.92 + 0.08 * rng.random((7, 50, 3))
    for gains in ([2.6, 1.25, 2.1], [2.2, 0.95, 1.7]):
        inverse = 1.0 / np.array(gains)
        mask = (np.maximum(img.mean(axis=2, keepdims=True) - 0.9, 0.0) / 0.1) ** 2
        expected = img * np.maximum(mask + (1.0 - mask) * inverse, inverse)
        np.testing.assert_allclose(camera_noise.safe_invert_gains(img.copy(), gains), expected, atol=2e-6)
        assert not np.allclose(expected[5:12], img[5:12] * inverse, atol=1e-3)  # the easing did something
    # Camera draws: rows of rgb2cam sum to 1 (grey stays grey), a convex mix of the four cameras.
    for seed in range(20):
        draw = np.random.default_rng(seed)
        rgb2cam, weights = camera_noise.random_ccm(draw)
        np.testing.assert_allclose(rgb2cam.sum(axis=1), 1.0, atol=1e-12)
        assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
        xyz2cam = np.tensordot(weights, camera_noise.XYZ2CAMS, axes=1)
        unnormalised = xyz2cam @ camera_noise.RGB2XYZ
        np.testing.assert_allclose(rgb2cam, unnormalised / unnormalised.sum(axis=1, keepdims=True), atol=1e-12)
        brightness, red, blue = camera_noise.random_gains(draw)
        assert 1.9 <= red <= 2.4 and 1.5 <= blue <= 1.9 and 1 / 1.1 <= brightness <= 1 / 0.5


def test_camera_noise_levels_follow_the_log_linear_read_relation():
    for severity in (0.2, 0.5, 1.0):
        low, high = camera_noise.shot_range(severity)
        assert high == pytest.approx(camera_noise.SHOT_CEIL * severity**2) and high / low == pytest.approx(3.0)
        draws = [camera_noise.random_noise_levels(np.random.default_rng(seed), severity) for seed in range(400)]
        shots = np.array([shot for shot, _ in draws])
        log_read_error = np.array([math.log(read) - 2.18 * math.log(shot) - 1.2 for shot, read in draws])
        assert low <= shots.min() and shots.max() <= high
        assert np.log(shots).std() == pytest.approx(math.log(3.0) / math.sqrt(12), rel=0.15)  # log-uniform
        assert abs(log_read_error.mean()) < 0.05 and log_read_error.std() == pytest.approx(0.26, rel=0.15)


def test_camera_mosaic_and_demosaic():
    rng = np.random.default_rng(0)
    img = rng.random((64, 80, 3)).astype(np.float32)
    bayer = camera_noise.mosaic(img)
    assert bayer.shape == (64, 80)
    assert bayer[0, 0] == img[0, 0, 0] and bayer[0, 1] == img[0, 1, 1]  # R G
    assert bayer[1, 0] == img[1, 0, 1] and bayer[1, 1] == img[1, 1, 2]  # G B
    # Bilinear: OpenCV's RGGB conversion in the interior (16-bit there, float here).
    reference = cv2.cvtColor(np.round(bayer * 65535).astype(np.uint16), cv2.COLOR_BayerBG2RGB) / 65535.0
    ours = camera_noise.demosaic(bayer.copy())
    np.testing.assert_allclose(ours[2:-2, 2:-2], reference[2:-2, 2:-2], atol=3e-5)
    # Exact on a linear ramp (bilinear interpolation of a plane is the plane), borders included
    # one pixel in; sampled sites keep their values everywhere.
    ys, xs = np.mgrid[:32, :40].astype(np.float32)
    ramp = np.stack([0.1 + 0.01 * xs, 0.2 + 0.005 * ys + 0.003 * xs, 0.6 - 0.004 * xs - 0.002 * ys], axis=2)
    ramp_mosaic = camera_noise.mosaic(ramp)
    out = camera_noise.demosaic(ramp_mosaic.copy())
    np.testing.assert_allclose(out[1:-1, 1:-1], ramp[1:-1, 1:-1], atol=1e-6)
    np.testing.assert_array_equal(camera_noise.mosaic(out), ramp_mosaic)
    tiny = camera_noise.demosaic(np.array([[0.2, 0.4], [0.6, 0.8]], np.float32))
    # 2x2 (one cell): R and B spread everywhere, G keeps its samples and averages them elsewhere.
    expected = [[[0.2, 0.5, 0.8], [0.2, 0.4, 0.8]], [[0.2, 0.6, 0.8], [0.2, 0.5, 0.8]]]
    np.testing.assert_allclose(tiny, expected, atol=1e-6)


def test_camera_unprocess_process_round_trip_is_the_identity(photo):
    # Away from clipping: no highlights (the safe gain inversion is deliberately not inverted
    # there) and moderate saturation (colours the camera's gamut holds without going negative).
    soft = 0.6 * photo + 0.15
    for seed in range(6):
        draw = np.random.default_rng(seed)
        rgb2cam, _ = camera_noise.random_ccm(draw)
        gains = camera_noise.channel_gains(*camera_noise.random_gains(draw))
        raw = camera_noise.unprocess(soft, rgb2cam, gains)
        assert np.abs(raw - soft).max() > 0.1  # the raw image really is a different image
        assert np.abs(camera_noise.round_trip(soft, rgb2cam, gains) - soft).max() < 2e-3
    np.testing.assert_allclose(camera_noise.round_trip(flat(0.5, 8), rgb2cam, gains), 0.5, atol=1e-5)


def test_camera_noise_variance_grows_with_the_signal_in_linear_light():
    """Shot noise: the variance in linear raw units is shot * x + read. Gains, demosaicing and the
    colour matrix are linear, so after undoing the camera's tone curve and gamma the output
    variance ratio between a bright and a dark flat patch lies between the raw channels' ratios
    (shot * x_b / g + read) / (shot * x_d / g + read), g the channel's gain. (In sRGB the std
    is nearly flat across levels: the gamma's slope falls about as fast as sqrt(x) grows.)"""
    dark_level, bright_level = 0.3, 0.7
    x_dark, x_bright = (float(to_linear(np.float32([v]))[0]) for v in (dark_level, bright_level))
    for seed in range(4):
        variances = []
        for level in (dark_level, bright_level):
            out, params = camera_noise.apply(flat(level), np.random.default_rng(seed), 0.6)
            variances.append(to_linear(out).reshape(-1, 3).var(axis=0))
        ratio = variances[1] / variances[0]
        gains = np.array(camera_noise.channel_gains(params["brightness_gain"], params["red_gain"], params["blue_gain"]))
        shot, read = params["shot_noise"], params["read_noise"]
        raw_ratios = (shot * x_bright / gains + read) / (shot * x_dark / gains + read)
        assert (ratio > 2.0).all(), ratio
        assert (ratio >= 0.9 * raw_ratios.min()).all() and (ratio <= 1.1 * raw_ratios.max()).all(), (ratio, raw_ratios)


def test_camera_noise_is_spatially_correlated_and_gaussian_is_not():
    grey = flat(0.5)
    for seed in range(3):
        camera, _ = camera_noise.apply(grey, np.random.default_rng(seed), 0.6)
        gaussian, _ = noise.apply(grey, np.random.default_rng(seed), 0.6)
        # Demosaicing spreads each noisy photosite over its neighbours: about 0.4-0.65 here.
        assert lag1_correlation(camera.astype(np.float64) - grey) > 0.3
        assert abs(lag1_correlation(gaussian.astype(np.float64) - grey)) < 0.03


def test_camera_noise_chroma_follows_the_colour_matrix():
    """At a pixel the demosaiced R, G and B come from different photosites, so they are independent
    before colour correction; cam2rgb (diagonal > 1, negative off-diagonals) then makes the
    channel covariance C diag(v) C^T with v the per-channel raw variance (shot * x * g + read *
    g^2, times the mean bilinear spread 0.5625 for R and B, 0.625 for G). On grey the tone curve
    scales every channel alike, so the sRGB residual's channel correlations are C's: R-G and G-B
    clearly negative. i.i.d. Gaussian noise has none."""
    level = 0.5
    x = float(to_linear(np.float32([level]))[0])
    for seed in range(4):
        out, params = camera_noise.apply(flat(level), np.random.default_rng(seed), 0.6)
        measured = channel_correlations(out.astype(np.float64) - level)
        gains = np.array(camera_noise.channel_gains(params["brightness_gain"], params["red_gain"], params["blue_gain"]))
        raw_var = gains * params["shot_noise"] * x + gains**2 * params["read_noise"]
        cam2rgb = np.linalg.inv(np.array(params["rgb2cam"]))
        cov = cam2rgb @ np.diag(raw_var * [0.5625, 0.625, 0.5625]) @ cam2rgb.T
        std = np.sqrt(np.diag(cov))
        predicted = (cov / np.outer(std, std))[[0, 0, 1], [1, 2, 2]]
        np.testing.assert_allclose(measured, predicted, atol=0.05)
        assert measured[0] < -0.2 and measured[2] < -0.2
        gaussian, _ = noise.apply(flat(level), np.random.default_rng(seed), 0.6)
        assert np.abs(channel_correlations(gaussian.astype(np.float64) - level)).max() < 0.05


def test_camera_noise_grows_with_severity_and_matches_its_documented_range():
    grey = flat(0.5, 128)
    for seed in range(6):
        stds = [float((camera_noise.apply(grey, np.random.default_rng(seed), s)[0] - 0.5).std()) * 255
                for s in (0.2, 0.5, 1.0)]
        assert stds[0] < stds[1] < stds[2], stds
        assert 3.0 < stds[0] < 10.0 and 20.0 < stds[2] < 50.0, stds  # faint .. high-ISO phone


def test_noise_camera_model_and_model_lists(photo):
    direct, direct_params = camera_noise.apply(photo, np.random.default_rng(4), 0.6)
    via_noise, params = noise.apply(photo, np.random.default_rng(4), 0.6, model="camera")
    assert np.array_equal(via_noise, direct) and params == {"model": "camera", **direct_params}
    assert json.loads(json.dumps(params)) == params
    # A one-entry list draws nothing: the same bytes as the plain name (and the default).
    default, default_params = noise.apply(photo, np.random.default_rng(4), 0.6)
    single, _ = noise.apply(photo, np.random.default_rng(4), 0.6, model=["gaussian"])
    assert default_params["model"] == "gaussian" and np.array_equal(default, single)
    drawn = {}
    for seed in range(12):
        out, params = noise.apply(photo, np.random.default_rng(seed), 0.6, model=("gaussian", "camera"))
        again, _ = noise.apply(photo, np.random.default_rng(seed), 0.6, model=["gaussian", "camera"])
        assert np.array_equal(out, again)
        drawn.setdefault(params["model"], []).append(lag1_correlation(out.astype(np.float64) - photo))
    assert set(drawn) == {"gaussian", "camera"}
    # The record says which model ran, and it did: only camera noise is spatially correlated.
    assert max(drawn["gaussian"]) < min(drawn["camera"])
    out, params = noise.apply(photo, np.random.default_rng(0), 0.0, model=["gaussian", "camera"])
    assert np.array_equal(out, photo) and params == {"identity": True}
    for bad in ([], ["gaussian", "laplace"], None):
        with pytest.raises(ValueError, match="noise model"):
            noise.apply(photo, np.random.default_rng(0), 0.5, model=bad)


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


def _residual_correlation(residual: np.ndarray, dy: int, dx: int) -> float:
    grey = residual.mean(2)
    grey = grey - grey.mean()
    h, w = grey.shape
    return float((grey[:h - dy, :w - dx] * grey[dy:, dx:]).mean() / (grey * grey).mean())


def test_rain_streaks_are_soft_and_long_like_real_rain():
    """Streaks a few pixels wide with a soft profile and some 20-40 px long, as a camera records
    falling drops (Rain100L: residual correlation 0.65 between horizontal neighbours, 0.41 between
    pixels 8 rows apart); a one-pixel line gives about 0.25 and 0.3. Near-vertical streaks (angle
    drawn per seed) so the horizontal neighbour is across the streak."""
    flat = np.full((256, 256, 3), 0.3, np.float32)
    across, beyond, along = [], [], []
    for seed in range(12):
        out, params = rain.apply(flat, np.random.default_rng(seed), 0.3)
        if abs(params["angle_deg"]) > 10:
            continue
        across.append(_residual_correlation(out - flat, 0, 1))
        beyond.append(_residual_correlation(out - flat, 0, 3))
        along.append(_residual_correlation(out - flat, 8, 0))
    assert len(across) >= 3
    assert 0.5 < np.mean(across) < 0.85      # wider than one pixel
    assert np.mean(beyond) < 0.2             # but streaks, not a veil: three pixels over is another place
    assert 0.3 < np.mean(along) < 0.9        # long along the fall, not dots


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
