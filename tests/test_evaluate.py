"""The evaluate stage: metrics with known answers, the oracle on a hand-built restorer, paired
folder errors, deterministic and stable reports from a real (tiny) system, the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.core.errors import AbairError
from tasks.core.metrics import PSNR_CAP, image_metrics, psnr, ssim, to_y
from tasks.evaluate.run import WORSE_DB, SetResult, build_metrics, summary_metrics
from tasks.evaluate.sets import SetSpec, centre_crop, load_set, parse_sets, prepare_synthetic, suite_fingerprint
from tasks.evaluate.stage import evaluate, evaluate_restorer
from tasks.evaluate.tables import paper_tables
from tests.conftest import write_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# Metrics with known answers


def test_psnr_and_ssim_of_identical_images():
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(img, img.clone()).tolist() == [PSNR_CAP, PSNR_CAP]   # documented cap, not inf
    assert torch.allclose(ssim(img, img.clone()), torch.ones(2), atol=1e-6)


def test_psnr_of_a_known_mse():
    target = 0.2 + 0.6 * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # +-0.05 in a checkerboard: MSE exactly 0.0025 whatever the image
    signs = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1
    pred = target + 0.05 * signs.float()
    mse = float(((pred - target) ** 2).mean())
    assert math.isclose(mse, 0.0025, rel_tol=1e-4)
    assert math.isclose(float(psnr(pred, target)[0]), 10 * math.log10(1 / 0.0025), abs_tol=1e-3)


@pytest.mark.parametrize("shift", [0.01, 0.05, 0.2])
def test_constant_shift(shift):
    target = 0.1 + 0.5 * torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    assert math.isclose(float(psnr(target + shift, target)[0]), -20 * math.log10(shift), abs_tol=1e-4)
    # Constant images: every window has the same means and zero variance, so SSIM is the
    # luminance term alone, (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * data_range)^2.
    a, b, c1 = 0.4, 0.4 + shift, 0.01 ** 2
    flat = torch.full((1, 3, 24, 24), a)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    # float32 SSIM (see tasks.core.metrics.ssim): flat images are its worst case, a few 1e-4
    assert math.isclose(float(ssim(flat + shift, flat)[0]), expected, abs_tol=5e-4)


def test_y_channel_is_bt601_as_restormer():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    assert torch.allclose(to_y(black), torch.full((1, 1, 16, 16), 16 / 255), atol=1e-6)
    assert torch.allclose(to_y(white), torch.full((1, 1, 16, 16), 235 / 255), atol=1e-6)
    metrics = image_metrics(white * 0.5, white * 0.5, y_channel=True)
    assert set(metrics) == {"psnr", "ssim", "psnr_y", "ssim_y"} and metrics["psnr_y"] == [PSNR_CAP]


def test_centre_crop_to_the_grid():
    img = np.arange(37 * 50 * 3, dtype=np.uint8).reshape(37, 50, 3)
    out = centre_crop(img, 16, "x.png")
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out, img[2:34, 1:49])
    with pytest.raises(AbairError, match="x.png.*smaller than the 16 px"):
        centre_crop(img[:10], 16, "x.png")


# ------------------------------------------------------------------------------------------------
# A hand-built restorer whose adapters are exact corrections


BRIGHT_OFFSET = 51  # 0.2 in 8-bit units


class HandBuiltEstimator(torch.nn.Module):
    """Picks `dark` for dark images, else `bright`."""

    def weights(self, x, mode="sw", temperature=1.0):
        dark = (x.mean(dim=(1, 2, 3)) < 0.3).float()
        return torch.stack([dark, 1 - dark], dim=1)


class HandBuiltRestorer:
    """Adapter `dark` doubles the image (undoes halving), adapter `bright` subtracts 0.2 (undoes
    the offset); weights blend the corrections like adapter weights (Restorer's semantics)."""

    names = ["dark", "bright"]

    def __init__(self):
        self.estimator = HandBuiltEstimator()

    def restore(self, images, mode="sw", weights=None, temperature=1.0, tile=None, max_pixels=None):
        if mode == "none":
            return images.clone(), None
        w = self.estimator.weights(images, mode) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() == 1:
            w = w[None].expand(images.shape[0], -1)
        if mode == "oh":
            w = F.one_hot(w.argmax(dim=1), len(self.names)).float()
        fixes = [images * 2.0, images - BRIGHT_OFFSET / 255.0]
        out = images + sum(w[:, k, None, None, None] * (fix - images) for k, fix in enumerate(fixes))
        return out.clamp(0.0, 1.0), w


def paired_set(root: Path, make_input, count: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = (rng.integers(32, 77, size=(32, 48, 3)) * 2).astype(np.uint8)   # even, 64..152
        write_png(root / "target" / f"{i}.png", target)
        write_png(root / "input" / f"{i}.png", make_input(target))
    return root


def test_oracle_is_at_least_as_good_as_every_single_adapter(tmp_path):
    sets = {
        "dark": paired_set(tmp_path / "dark", lambda t: t // 2),
        "bright": paired_set(tmp_path / "bright", lambda t: t + BRIGHT_OFFSET),
        "both": paired_set(tmp_path / "both", lambda t: t // 2 + BRIGHT_OFFSET),
        "copy": paired_set(tmp_path / "copy", lambda t: t.copy()),
    }
    cfg = {"device": "cpu", "cache": str(tmp_path / "cache"), "strips": 2, "strip_crop": 32, "sets": [
        {"name": "dark", "group": "known", "task": ["dark"], "path": str(sets["dark"])},
        {"name": "bright", "group": "known", "task": ["bright"], "path": str(sets["bright"])},
        {"name": "copy", "group": "unseen", "task": ["jpeg"], "path": str(sets["copy"])},
        {"name": "both", "group": "mixed", "task": ["dark", "bright"], "path": str(sets["both"])},
    ]}
    metrics = evaluate_restorer(HandBuiltRestorer(), cfg, shards=str(tmp_path / "no-shards"),
                                reports=str(tmp_path / "reports"), progress=False)

    for task, wrong in (("dark", "bright"), ("bright", "dark")):
        oracle = metrics[f"known/{task}/oracle/psnr"]
        assert oracle >= metrics[f"known/{task}/adapter_{task}/psnr"]
        # The hand-built adapters are exact, so the right one is perfect and the wrong one is not:
        # an oracle that picked the wrong adapter would fail here.
        assert oracle == PSNR_CAP and metrics[f"known/{task}/oracle/ssim"] == 1.0
        assert metrics[f"known/{task}/adapter_{wrong}/psnr"] < 20
        assert metrics[f"known/{task}/input/psnr"] < 20
        assert metrics[f"known/{task}/oh/psnr"] == PSNR_CAP     # the estimator picks right
    assert metrics["estimator/accuracy"] == 1.0 and metrics["estimator/images"] == 6
    # No adapter exists for the unseen set's task: no oracle; the identity scores the cap.
    assert "unseen/copy/oracle/psnr" not in metrics
    assert metrics["unseen/copy/input/psnr"] == PSNR_CAP and metrics["unseen/copy/none/psnr"] == PSNR_CAP
    # Mixed set: the oracle blends both adapters uniformly (1.5 x - 0.1 here), a different value
    # from either adapter alone.
    assert "mixed/both/oracle/psnr" in metrics
    assert metrics["mixed/both/oracle/psnr"] not in (metrics["mixed/both/adapter_dark/psnr"],
                                                     metrics["mixed/both/adapter_bright/psnr"])
    assert metrics["sets/known/dark/images"] == 3
    assert metrics["summary/known/oracle/psnr"] == PSNR_CAP


# ------------------------------------------------------------------------------------------------
# summary.json: the short view of metrics.json that `dvc metrics show` prints


def test_summary_holds_the_served_mode_per_group_and_the_estimator(tmp_path):
    cfg = {"device": "cpu", "strips": 0, "modes": ["input", "sw"], "sets": [
        {"name": "dim", "group": "known", "task": ["dark"], "path": str(paired_set(tmp_path / "dim", lambda t: t // 2))},
        {"name": "same", "group": "unseen", "task": [], "path": str(paired_set(tmp_path / "same", lambda t: t.copy()))},
        {"name": "dim_lit", "group": "mixed", "task": ["dark", "bright"],
         "path": str(paired_set(tmp_path / "dim_lit", lambda t: t // 2 + BRIGHT_OFFSET))},
    ]}
    evaluate_restorer(HandBuiltRestorer(), cfg, reports=str(tmp_path / "reports"), progress=False)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())

    scopes = ("known", "unseen", "mixed", "all")
    assert set(summary) == {*scopes, "estimator"}
    for scope in scopes:
        assert set(summary[scope]) == {"sw_psnr", "sw_ssim", "sw_psnr_gain", "sw_worse"}
        assert summary[scope]["sw_psnr"] == metrics[f"summary/{scope}/sw/psnr"]
        assert summary[scope]["sw_ssim"] == metrics[f"summary/{scope}/sw/ssim"]
        assert summary[scope]["sw_worse"] == metrics[f"summary/{scope}/sw/worse"]
        gain = metrics[f"summary/{scope}/sw/psnr"] - metrics[f"summary/{scope}/input/psnr"]
        assert summary[scope]["sw_psnr_gain"] == round(gain, 4)
    assert summary["estimator"] == {"accuracy": metrics["estimator/accuracy"]}
    # The estimator picks `dark` for the halved set (exact: nothing worse) and for the unchanged
    # set it doubles images that were fine (all worse).
    assert summary["known"]["sw_worse"] == 0.0 and summary["unseen"]["sw_worse"] == 1.0


def test_summary_leaves_out_what_was_not_measured():
    metrics = {"summary/known/input/psnr": 20.0, "summary/known/sw/psnr": 23.1234, "summary/known/sw/ssim": 0.8,
               "summary/unseen/none/psnr": 25.0, "summary/all/sw/psnr": 23.1234, "known/dim/sw/psnr": 23.1234}
    assert summary_metrics(metrics) == {"known": {"sw_psnr": 23.1234, "sw_ssim": 0.8, "sw_psnr_gain": 3.1234},
                                        "all": {"sw_psnr": 23.1234}}


# ------------------------------------------------------------------------------------------------
# The classical baseline mode and the "made worse" share


class BrightDarkener(HandBuiltRestorer):
    """Every restorer mode halves the images whose mean is above 0.45 and leaves the others."""

    def restore(self, images, mode="sw", weights=None, temperature=1.0, tile=None, max_pixels=None):
        bright = (images.mean(dim=(1, 2, 3)) > 0.45).float()[:, None, None, None]
        return images * (1.0 - 0.5 * bright), self.estimator.weights(images, mode)


def smooth_noisy_set(root: Path, count: int = 3) -> Path:
    """Smooth mid-grey targets (mean 0.5) and their sigma-25 noisy inputs: NLM's home ground."""
    yy, xx = np.mgrid[0:48, 0:64] / 64.0
    for i in range(count):
        base = 0.5 + 0.15 * np.sin(2 * np.pi * (xx + 0.3 * i)) * np.cos(2 * np.pi * yy)
        target = np.stack([base, 0.8 * base + 0.1, 1.0 - base], axis=-1)
        noisy = target + np.random.default_rng(i).normal(0.0, 25 / 255, target.shape)
        write_png(root / "target" / f"{i}.png", np.clip(np.rint(target * 255), 0, 255).astype(np.uint8))
        write_png(root / "input" / f"{i}.png", np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8))
    return root


def test_baseline_mode_and_made_worse_share(tmp_path):
    noisy = smooth_noisy_set(tmp_path / "noisy")
    # input == target; images 0-2 dark (mean ~0.3, left alone), image 3 bright (halved: worse)
    levels = [70, 80, 75, 160]
    for i, level in enumerate(levels):
        img = np.full((32, 48, 3), level, np.uint8)
        img[:, ::2] += 10
        write_png(tmp_path / "lights" / "target" / f"{i}.png", img)
        write_png(tmp_path / "lights" / "input" / f"{i}.png", img)
    cfg = {"device": "cpu", "strips": 0, "sets": [
        {"name": "noisy", "group": "known", "task": ["noise"], "path": str(noisy)},
        {"name": "lights", "group": "unseen", "task": ["jpeg"], "path": str(tmp_path / "lights")},
    ]}
    metrics = evaluate_restorer(BrightDarkener(), cfg, reports=str(tmp_path / "reports"), progress=False)
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())

    # The baseline (NLM for a noise set) restores; the darkening restorer makes every image worse.
    assert metrics["known/noisy/baseline/psnr"] > metrics["known/noisy/input/psnr"] + 2.0
    assert metrics["known/noisy/baseline/ssim"] > metrics["known/noisy/input/ssim"]
    assert metrics["known/noisy/baseline/worse"] == 0.0
    for mode in ("none", "adapter_dark", "adapter_bright", "oh", "sw"):
        assert metrics[f"known/noisy/{mode}/worse"] == 1.0, mode
    assert "known/noisy/input/worse" not in metrics
    # No classical method for jpeg: the baseline is the input itself; one image in four halved.
    assert metrics["unseen/lights/baseline/psnr"] == metrics["unseen/lights/input/psnr"] == PSNR_CAP
    assert metrics["unseen/lights/baseline/worse"] == 0.0
    assert metrics["unseen/lights/sw/worse"] == 0.25
    # Summaries: the mean share over the sets; summary.json carries the served mode's.
    assert metrics["summary/known/sw/worse"] == 1.0 and metrics["summary/unseen/sw/worse"] == 0.25
    assert metrics["summary/all/sw/worse"] == 0.625 and metrics["summary/all/baseline/worse"] == 0.0
    assert summary["all"]["sw_worse"] == 0.625 and summary["known"]["sw_worse"] == 1.0
    assert summary["all"]["sw_psnr"] == metrics["summary/all/sw/psnr"]              # existing keys kept
    assert math.isclose(metrics["summary/all/baseline/psnr"],
                        (metrics["known/noisy/baseline/psnr"] + metrics["unseen/lights/baseline/psnr"]) / 2,
                        abs_tol=1e-3)

    results = (tmp_path / "reports" / "results.md").read_text()
    assert "## Table 4: made worse (>0.1 dB)" in results
    assert "| Set | Group | Images | ABAIR (SW) | Baseline (classical) |" in results
    assert "| `noisy` | known | 3 | 100% (3/3) | 0% (0/3) |" in results
    assert "| `lights` | unseen | 4 | 25% (1/4) | 0% (0/4) |" in results
    plain = results.replace("**", "")
    assert f"| Baseline (classical) | {metrics['known/noisy/baseline/psnr']:.2f}/" in plain
    assert "| `noisy` | known | paired" in results and "| noise | NLM (estimated sigma) | 3 |" in results
    assert "| jpeg | none (the input) | 4 |" in results
    tables = paper_tables(metrics)
    assert {r["set"]: r["sw worse"] for r in tables["worse"]}["lights"] == 0.25
    assert {r["method"]: r for r in tables["known"]}["Baseline (classical)"]["params"] is None


def test_worse_share_counts_drops_beyond_the_threshold_only():
    spec = parse_sets({"sets": [{"name": "s", "group": "known", "task": [], "path": "unused"}]})[0]
    ref = [30.0, 30.0, 30.0, 30.0]
    per_image = {"input": {"psnr": ref}, "sw": {"psnr": [30.0 - WORSE_DB / 2, 30.0 - 2 * WORSE_DB, 31.0, 12.0]},
                 "none": {"psnr": [30.0, 30.0, 30.0, 30.0]}}
    result = SetResult(spec, 4, [(16, 16)] * 4, per_image, input_psnr=ref)
    metrics = build_metrics([result], {"backbone": 1, "adapters": 0, "estimator": 0, "total": 1}, None)
    assert metrics["known/s/sw/worse"] == 0.5 and metrics["known/s/none/worse"] == 0.0
    assert "known/s/input/worse" not in metrics and metrics["summary/all/sw/worse"] == 0.5


# ------------------------------------------------------------------------------------------------
# Paired folder errors


def _paired_spec(folder: Path) -> SetSpec:
    return parse_sets({"sets": [{"name": "bench", "group": "known", "task": ["noise"], "path": str(folder)}]})[0]


def test_paired_folder_with_a_missing_partner(tmp_path):
    folder = paired_set(tmp_path / "set", lambda t: t)
    (folder / "target" / "1.png").unlink()
    with pytest.raises(AbairError, match=r"input/1\.png: has no partner in target/"):
        load_set(_paired_spec(folder), str(folder), 16)


def test_paired_folder_with_a_size_mismatch(tmp_path):
    folder = paired_set(tmp_path / "set", lambda t: t)
    write_png(folder / "target" / "2.png", np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(AbairError, match=r"input/2\.png: size 48x32 differs from its target's 40x32"):
        load_set(_paired_spec(folder), str(folder), 16)


def test_paired_folder_with_an_unreadable_file(tmp_path):
    folder = paired_set(tmp_path / "set", lambda t: t)
    (folder / "input" / "0.png").write_bytes(b"not a png at all")
    with pytest.raises(AbairError, match=r"input/0\.png: not a readable image"):
        load_set(_paired_spec(folder), str(folder), 16)
    # The whole stage fails the same way, before any model runs.
    cfg = {"device": "cpu", "sets": [{"name": "bench", "group": "known", "task": [], "path": str(folder)}]}
    with pytest.raises(AbairError, match=r"input/0\.png"):
        evaluate_restorer(HandBuiltRestorer(), cfg, reports=None, progress=False)


def test_bad_set_specs_are_named():
    with pytest.raises(AbairError, match=r"evaluate.sets\[0\]: name must be"):
        parse_sets({"sets": [{"name": "blur/noise", "group": "mixed", "degradations": [["blur", 0.5]]}]})
    with pytest.raises(AbairError, match="evaluate.sets.x: unknown degradation 'fog'"):
        parse_sets({"sets": [{"name": "x", "group": "known", "degradations": [["fog", 0.5]]}]})
    with pytest.raises(AbairError, match="evaluate.sets.x: group must be"):
        parse_sets({"sets": [{"name": "x", "group": "seen", "degradations": [["blur", 0.5]]}]})
    with pytest.raises(AbairError, match="set names must be unique"):
        parse_sets({"sets": [{"name": "x", "group": "known", "degradations": [["blur", 0.5]]}] * 2})


# ------------------------------------------------------------------------------------------------
# A real tiny system, end to end


def tiny_system(folder: Path, do_no_harm: bool = False, dense: bool = False, seg: bool = False) -> Path:
    """Tiny backbone (with a segmentation head when `seg`), two LoRA adapters with a visible
    effect, an untrained estimator (with do-no-harm outputs and a dense head when asked)."""
    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.identity import save_backbone
    from models.estimator import EstimatorConfig, build_estimator, save_estimator

    torch.manual_seed(0)
    backbone = build_backbone("tiny", seg_classes=2 if seg else 0)
    with torch.no_grad():
        backbone.output.weight.mul_(0.1)
    save_backbone(backbone, folder / "backbone.safetensors",
                  {"classes": json.dumps(["noise", "haze"])} if seg else None)
    bank = AdapterBank(backbone)
    for name in ("noise", "haze"):
        bank.add(name)
        with torch.no_grad():
            for key, param in bank.named_parameters_of(name):
                if "lora_B" in key:
                    param.normal_(0, 0.05)
        bank.save(name, folder / "adapters" / f"{name}.safetensors")
    config = EstimatorConfig(2, width=4, crops=1, crop_size=16, view_size=32, do_no_harm=do_no_harm, dense=dense)
    save_estimator(build_estimator(config, ["noise", "haze"]), folder / "estimator.safetensors")
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """Tiny backbone, two LoRA adapters with a visible effect, an untrained estimator."""
    return tiny_system(tmp_path_factory.mktemp("checkpoints"))


def small_cfg(project_params: dict, cache: Path) -> dict:
    cfg = copy.deepcopy(project_params["evaluate"])
    cfg.update(cache=str(cache), device="cpu", strips=2, strip_crop=32)
    cfg["defaults"] = {"clean": "val", "seed": 3, "count": 2, "crop": 48}
    cfg["sets"] = [
        {"name": "noise", "group": "known", "task": ["noise"], "degradations": [["noise", 0.5]]},
        {"name": "haze", "group": "known", "task": ["haze"], "degradations": [["haze", 0.6]]},
        {"name": "jpeg", "group": "unseen", "task": ["jpeg"], "degradations": [["jpeg", 0.8]]},
        {"name": "haze_noise", "group": "mixed", "task": ["haze", "noise"],
         "degradations": [["noise", 0.3], ["haze", 0.5]]},
    ]
    return cfg


def test_reports_are_complete_deterministic_and_stable(tmp_path, tiny_checkpoints, tiny_shards, project_params):
    cfg = small_cfg(project_params, tmp_path / "eval")
    first = evaluate(cfg, checkpoints=str(tiny_checkpoints), shards=str(tiny_shards),
                     reports=str(tmp_path / "r1"), progress=False)
    spec_file = tmp_path / "eval" / "noise" / "spec.json"
    built = spec_file.stat().st_mtime_ns
    second = evaluate(cfg, checkpoints=str(tiny_checkpoints), shards=str(tiny_shards),
                      reports=str(tmp_path / "r2"), progress=False)

    # Same keys, same values, and the file is exactly what the function returned.
    assert first == second
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text()) == first
    assert (tmp_path / "r1" / "metrics.json").read_bytes() == (tmp_path / "r2" / "metrics.json").read_bytes()
    assert list(first) == sorted(first)
    assert spec_file.stat().st_mtime_ns == built                  # the cached set was reused

    modes = ["input", "baseline", "none", "adapter_noise", "adapter_haze", "oh", "sw", "oracle"]
    for mode in modes:
        for metric in ("psnr", "ssim"):
            assert isinstance(first[f"known/noise/{mode}/{metric}"], float)
            assert isinstance(first[f"mixed/haze_noise/{mode}/{metric}"], float)
        if mode != "input":
            assert 0.0 <= first[f"known/noise/{mode}/worse"] <= 1.0
            assert 0.0 <= first[f"summary/all/{mode}/worse"] <= 1.0
    # The classical baseline: NLM for noise (it helps), dehazing + NLM for haze + noise, the
    # input itself for JPEG (no method).
    assert first["known/noise/baseline/psnr"] > first["known/noise/input/psnr"]
    assert first["known/noise/baseline/worse"] == 0.0
    assert first["mixed/haze_noise/baseline/psnr"] != first["mixed/haze_noise/input/psnr"]
    assert first["unseen/jpeg/baseline/psnr"] == first["unseen/jpeg/input/psnr"]
    assert first["unseen/jpeg/baseline/worse"] == 0.0
    assert "unseen/jpeg/oracle/psnr" not in first and "unseen/jpeg/sw/psnr" in first
    # Modes pw and pw_oracle are in the default modes, but this system makes no weight maps (no
    # dense estimator head, no segmentation head) and has no regions set: neither runs.
    assert {"pw", "pw_oracle"} <= set(cfg["modes"]) and not any("/pw" in key for key in first)
    assert first["known/noise/oracle/psnr"] == first["known/noise/adapter_noise/psnr"]
    assert first["known/noise/sw/psnr"] != first["known/noise/none/psnr"]      # the adapters do something
    assert first["sets/known/noise/images"] == 2 and first["sets/mixed/haze_noise/images"] == 2
    assert 0.0 <= first["estimator/accuracy"] <= 1.0 and first["estimator/images"] == 4
    assert first["params/total"] == first["params/backbone"] + first["params/adapters"] + first["params/estimator"]
    assert first["params/adapters"] > 0 and first["params/estimator"] > 0
    for key in ("summary/known/sw/psnr", "summary/unseen/none/psnr", "summary/mixed/oracle/psnr",
                "summary/all/sw/psnr", "summary/all/sw/ssim"):
        assert key in first
    assert math.isclose(first["summary/known/none/psnr"],
                        (first["known/noise/none/psnr"] + first["known/haze/none/psnr"]) / 2, abs_tol=1e-3)

    results = (tmp_path / "r1" / "results.md").read_text()
    for heading in ("## Table 1: known degradations", "## Table 2: unseen degradations",
                    "## Table 3: mixed degradations", "OH vs SW vs PW vs oracle", "evaluation sets", "Degradation estimator"):
        assert heading in results
    assert "| Method | noise | haze | Average | Params |" in results
    assert "| Baseline (classical) |" in results and "made worse (>0.1 dB)" in results
    assert f"| ABAIR (SW) | {first['known/noise/sw/psnr']:.2f}/" in results.replace("**", "")
    plots = tmp_path / "r1" / "plots"
    expected = ["radar.png", "bars_known.png", "bars_unseen.png", "bars_mixed.png", "confusion.png",
                "strips/noise.png", "strips/haze.png", "strips/jpeg.png", "strips/haze_noise.png"]
    for name in expected:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name

    # The cached synthetic set: PNG pairs of the crop size, and the spec that built it.
    cached = tmp_path / "eval" / "noise"
    assert sorted(p.name for p in (cached / "input").iterdir()) == sorted(p.name for p in (cached / "target").iterdir())
    assert json.loads(spec_file.read_text())["spec"]["degradations"] == [["noise", 0.5]]

    # An MLflow run of the stage holds the metrics.
    from tasks.core import tracking

    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id(client)], filter_string="tags.`abair.stage` = 'evaluate'")
    assert runs and runs[0].data.metrics["known/noise/sw/psnr"] == first["known/noise/sw/psnr"]


def test_cache_and_fingerprint_follow_the_spec(tmp_path, tiny_shards, project_params):
    cfg = small_cfg(project_params, tmp_path / "eval")
    spec = parse_sets(cfg)[0]
    folder = prepare_synthetic(spec, str(tiny_shards), tmp_path / "eval")
    image = (folder / "input" / sorted(p.name for p in (folder / "input").iterdir())[0]).read_bytes()
    assert prepare_synthetic(spec, str(tiny_shards), tmp_path / "eval") == folder

    stronger = parse_sets({**cfg, "sets": [{**cfg["sets"][0], "degradations": [["noise", 0.9]]}]})[0]
    prepare_synthetic(stronger, str(tiny_shards), tmp_path / "eval")
    assert (folder / "input" / sorted(p.name for p in (folder / "input").iterdir())[0]).read_bytes() != image

    base = suite_fingerprint(cfg, str(tiny_shards))
    assert suite_fingerprint(copy.deepcopy(cfg), str(tiny_shards)) == base
    runtime = {**cfg, "device": "cuda", "batch": 1, "max_pixels": 4096, "strips": 0, "cache": "elsewhere"}
    assert suite_fingerprint(runtime, str(tiny_shards)) == base
    assert suite_fingerprint({**cfg, "y_channel": True}, str(tiny_shards)) != base
    assert suite_fingerprint({**cfg, "defaults": {**cfg["defaults"], "seed": 4}}, str(tiny_shards)) != base


def test_cli_evaluate(tmp_path, tiny_checkpoints, tiny_shards, project_params, capsys):
    import yaml

    from flows.cli import main

    params = tmp_path / "params.yaml"
    cfg = small_cfg(project_params, tmp_path / "eval")
    cfg["sets"] = cfg["sets"][:1]
    params.write_text(yaml.safe_dump({"evaluate": cfg}))
    args = ["evaluate", "--params", str(params), "--checkpoints", str(tiny_checkpoints), "--shards", str(tiny_shards),
            "--reports", str(tmp_path / "reports"), "--set", "modes=[input, none, sw]", "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {k.rsplit("/", 2)[-2] for k in metrics if k.startswith("known/noise/")} == {"input", "none", "sw"}

    assert main([*args[:5], "--checkpoints", str(tmp_path / "nothing")]) == 2
    assert "backbone.safetensors: backbone checkpoint not found" in capsys.readouterr().err


def test_paper_tables_rebuild_from_metrics_alone(tmp_path):
    metrics = {
        "known/rain/input/psnr": 20.0, "known/rain/input/ssim": 0.5,
        "known/rain/sw/psnr": 30.0, "known/rain/sw/ssim": 0.9,
        "known/rain/oracle/psnr": 31.0, "known/rain/oracle/ssim": 0.91,
        "summary/known/sw/psnr": 30.0, "summary/known/sw/ssim": 0.9,
        "params/backbone": 1000, "params/adapters": 100, "params/estimator": 10, "params/total": 1110,
    }
    tables = paper_tables(metrics)
    known = {row["method"]: row for row in tables["known"]}
    assert known["ABAIR (SW)"]["rain psnr"] == 30.0 and known["ABAIR (SW)"]["params"] == 1110
    assert known["Oracle"]["params"] == 1100 and known["Input"]["params"] is None
    assert tables["modes"][0]["sw psnr"] == 30.0 and tables["modes"][0]["oracle psnr"] == 31.0


def test_flow_publishes_every_table_and_the_report(tmp_path, monkeypatch):
    import flows.evaluate as flow_module

    tables, markdown = {}, {}
    monkeypatch.setattr(flow_module, "create_table_artifact",
                        lambda table, key, description: tables.setdefault(key, table))
    monkeypatch.setattr(flow_module, "create_markdown_artifact",
                        lambda text, key, description: markdown.setdefault(key, text))
    (tmp_path / "results.md").write_text("# ABAIR evaluation\n")
    metrics = {"known/rain/sw/psnr": 30.0, "known/rain/sw/ssim": 0.9, "mixed/rain_noise/sw/psnr": 25.0,
               "mixed/rain_noise/sw/ssim": 0.8, "params/backbone": 10, "params/total": 12}
    cfg = {"sets": [{"name": "rain", "group": "known", "task": ["rain"], "degradations": [["rain", 0.6]]},
                    {"name": "rain_noise", "group": "mixed", "task": ["rain", "noise"],
                     "degradations": [["rain", 0.5], ["noise", 0.3]]}]}
    flow_module.publish_artifacts(metrics, cfg, str(tmp_path))
    assert set(tables) == {"abair-eval-known", "abair-eval-mixed", "abair-eval-modes"}
    assert tables["abair-eval-known"][0]["rain psnr"] == 30.0
    assert markdown == {"abair-eval-results": "# ABAIR evaluation\n"}
