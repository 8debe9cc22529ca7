"""The classical baselines of the `baseline` evaluation mode (tasks/evaluate/baselines.py): the noise
estimator against known sigmas, each method against the degradation it undoes (PSNR up, on
degradations/ images), the registry's contract and order, and the benchmark script's skip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import degradations
from degradations import haze, lowlight, noise
from tasks.core import imageio
from tasks.core.metrics import psnr
from tasks.evaluate import baselines


def quantized(img: np.ndarray) -> np.ndarray:
    return imageio.to_float_rgb(imageio.to_uint8(img))


def psnr_of(out: np.ndarray, target: np.ndarray) -> float:
    def tensor(img):
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]

    return float(psnr(tensor(out), tensor(target))[0])


def smooth_image(size: int = 256) -> np.ndarray:
    """A smooth colour image in [0.36, 0.64]: no texture for the estimator to mistake for noise,
    and far enough from 0 and 1 that clipping hides little of sigma 50."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.12 * np.sin(2 * np.pi * 1.5 * xx) * np.cos(2 * np.pi * yy) + 0.05 * (xx - 0.5)
    return np.stack([base, 0.9 * base + 0.05, 1.0 - base], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A textured 128x128 crop of a scikit-image photo (8-bit, as the evaluation sets are)."""
    import skimage.data

    rgb = skimage.data.astronaut()
    return imageio.to_float_rgb(np.ascontiguousarray(rgb[40:168, 160:288]))


# ------------------------------------------------------------------------------------------------
# Noise


@pytest.mark.parametrize("sigma", [10, 25, 50])
def test_noise_estimator_recovers_sigma_on_a_smooth_image(sigma):
    clean = smooth_image()
    noisy, params = noise.apply(clean, np.random.default_rng(sigma), sigma / 50.0)
    assert params["sigma_255"] == pytest.approx(sigma)
    estimate = baselines.estimate_noise_sigma(quantized(noisy)) * 255.0
    assert estimate == pytest.approx(sigma, rel=0.15)
    # and a clean image reads (almost) no noise: the estimator does not just return a constant
    assert baselines.estimate_noise_sigma(quantized(clean)) * 255.0 < 1.0


def test_nlm_raises_psnr_on_a_noisy_crop(photo):
    noisy = quantized(noise.apply(photo, np.random.default_rng(0), 0.5)[0])   # sigma 25
    out = baselines.nlm_denoise(noisy)
    assert out.dtype == np.float32 and out.shape == photo.shape
    assert psnr_of(out, photo) > psnr_of(noisy, photo) + 3.0


def test_nlm_strength_comes_from_the_estimated_sigma(photo, monkeypatch):
    """h and hColor follow the noise measured on the input (not a fixed value, not the truth)."""
    calls = []
    real = baselines.cv2.fastNlMeansDenoisingColored

    def spy(src, dst, h, h_color, template, search):
        calls.append((h, h_color, template, search))
        return real(src, dst, h, h_color, template, search)

    monkeypatch.setattr(baselines.cv2, "fastNlMeansDenoisingColored", spy)
    for severity in (0.3, 1.0):
        noisy = quantized(noise.apply(smooth_image(128), np.random.default_rng(1), severity)[0])
        baselines.nlm_denoise(noisy)
        estimate = baselines.estimate_noise_sigma(noisy) * 255.0
        assert calls[-1] == pytest.approx((baselines.NLM_H_PER_SIGMA * estimate,
                                           baselines.NLM_HCOLOR_PER_SIGMA * estimate, 7, 21))
    assert calls[1][0] > 2.5 * calls[0][0]        # sigma 50 gets a stronger filter than sigma 15
    baselines.nlm_denoise(quantized(smooth_image(128)), sigma=20 / 255)
    assert calls[-1][0] == pytest.approx(baselines.NLM_H_PER_SIGMA * 20)


# ------------------------------------------------------------------------------------------------
# Haze and low light


def test_dark_channel_prior_raises_psnr_on_a_hazy_image(photo):
    hazy = quantized(haze.apply(photo, np.random.default_rng(2), 0.6)[0])
    out = baselines.dark_channel_dehaze(hazy)
    assert out.dtype == np.float32 and out.shape == photo.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert psnr_of(out, photo) > psnr_of(hazy, photo) + 3.0


def test_atmospheric_light_and_dark_channel():
    img = np.full((40, 40, 3), 0.2, np.float32)
    img[5:8, 30:33] = (0.9, 0.8, 0.95)                  # the haziest (brightest-dark-channel) spot
    dark = baselines.dark_channel(img, patch=3)
    assert dark[6, 31] == pytest.approx(0.8) and dark[20, 20] == pytest.approx(0.2)
    assert baselines.atmospheric_light(img, dark, share=1 / 1600) == pytest.approx([0.9, 0.8, 0.95])


def test_guided_filter_keeps_edges_of_its_guide_and_smooths_flat_regions():
    rng = np.random.default_rng(3)
    step = np.zeros((64, 64), np.float32)
    step[:, 32:] = 1.0
    noisy = step + rng.normal(0, 0.05, step.shape).astype(np.float32)
    out = baselines.guided_filter(step, noisy, radius=4, eps=1e-3)
    assert np.abs(out - step).mean() < 0.5 * np.abs(noisy - step).mean()      # noise removed
    assert out[:, 36:].mean() - out[:, :28].mean() > 0.95                       # edge kept


def test_low_light_method_brightens_and_raises_psnr(photo):
    dark = quantized(lowlight.apply(photo, np.random.default_rng(4), 0.6)[0])
    out = baselines.gamma_clahe(dark)
    assert out.dtype == np.float32 and out.shape == photo.shape
    assert baselines.mean_luminance(out) > baselines.mean_luminance(dark) + 0.15
    assert psnr_of(out, photo) > psnr_of(dark, photo) + 3.0


def test_brightening_gamma_reaches_the_target_and_never_darkens(photo):
    dark = quantized(lowlight.apply(photo, np.random.default_rng(5), 0.8)[0])
    g = baselines.brightening_gamma(dark, 0.4)
    assert 0.1 < g < 1.0
    assert baselines.mean_luminance(np.power(dark, g)) == pytest.approx(0.4, abs=0.02)
    assert baselines.brightening_gamma(np.full((32, 32, 3), 0.7, np.float32), 0.4) == 1.0


# ------------------------------------------------------------------------------------------------
# The registry


def test_registry_names_degradations_and_methods_keep_the_contract(photo):
    for name, method in baselines.REGISTRY.items():
        degradations.get(name)                                  # a registered degradation
        out = method.restore(photo)
        assert out.dtype == np.float32 and out.shape == photo.shape, name
        assert 0.0 <= out.min() and out.max() <= 1.0, name
        assert method.label


@pytest.mark.parametrize("task", [[], ["jpeg"], ["rain", "blur"], ["snow", "bitdepth", "unknown"]])
def test_a_task_without_a_method_returns_the_input_unchanged(photo, task):
    out = baselines.restore(photo, task)
    assert out.dtype == np.float32 and np.array_equal(out, photo)
    assert out is not photo
    assert baselines.methods_for(task) == [] and baselines.describe(task) == "none (the input)"


def test_mixed_tasks_apply_the_methods_that_exist_in_physical_order(photo):
    from degradations.composite import apply_chain

    degraded, _ = apply_chain(photo, np.random.default_rng(6), [["noise", 0.3], ["haze", 0.5], ["blur", 0.5]])
    degraded = quantized(degraded)
    assert baselines.methods_for(["noise", "blur", "lowlight", "haze"]) == ["haze", "lowlight", "noise"]
    out = baselines.restore(degraded, ["noise", "blur", "haze"])
    expected = baselines.nlm_denoise(baselines.dark_channel_dehaze(degraded))
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, baselines.dark_channel_dehaze(baselines.nlm_denoise(degraded)))
    assert baselines.describe(["noise", "haze"]) == "dark channel prior + NLM (estimated sigma)"


def test_adding_a_method_is_one_registry_line(photo, monkeypatch):
    monkeypatch.setitem(baselines.REGISTRY, "jpeg", baselines.Method("invert", lambda img: 1.0 - img))
    assert np.allclose(baselines.restore(photo, ["jpeg"]), 1.0 - photo)
    assert baselines.methods_for(["noise", "jpeg"]) == ["noise", "jpeg"]        # ORDER 50 before 60


# ------------------------------------------------------------------------------------------------
# The benchmark script


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
    spec = importlib.util.spec_from_file_location("benchmark_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_skips_cleanly_without_its_data(tmp_path, capsys):
    bench = load_benchmark()
    assert bench.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_benchmark_runs_on_a_small_folder(tmp_path):
    import skimage.data

    bench = load_benchmark()

    folder = tmp_path / "CBSD68"
    rgb = skimage.data.chelsea()
    for i, (y, x) in enumerate(((0, 0), (60, 100), (120, 200))):
        imageio.write_image(folder / f"{i}.png", rgb[y:y + 70, x:x + 90])   # 90x70 -> cropped to 80x64
    assert bench.main(["--data", str(folder), "--out", str(tmp_path / "out"), "--count", "2", "--sigmas", "25",
                       "--no-bm3d"]) == 0
    page = (tmp_path / "out" / "baselines.md").read_text()
    assert "first 2 CBSD68 images by name (0.png ... 1.png)" in page and "(80x64 WxH)" in page
    rows = {line.split(":")[0].strip("| "): line for line in page.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"input", "nlm", "nlm_true"} and "cbm3d" not in rows
    noisy, denoised = (float(rows[m].split("|")[2].split("/")[0]) for m in ("input", "nlm"))
    assert denoised > noisy + 2.0
