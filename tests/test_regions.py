"""The pixel-wise mode's evaluation (issue 14): the `regions` sets (one degradation per region, a
mask that says which), the pixel-wise oracle's map, modes pw and pw_oracle in the metrics, the
tables and the strips of a tiny system, and the promotion gate on mode pw."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tasks.core.errors import AbairError
from tasks.core.metrics import psnr
from tasks.evaluate.run import (MAP_ACCURACY, TRUE_MAP, map_accuracy, map_choice, mode_plan, pixelwise_ready,
                                true_weight_map)
from tasks.evaluate.sets import MASK_DIR, load_set, parse_sets, prepare_synthetic, region_picks
from tasks.registry import gate
from tests.conftest import write_png
from tests.test_evaluate import tiny_system as evaluate_tiny_system

PAIR = [["lowlight", 0.8], ["noise", 0.8]]


def regions_cfg(clean: Path, cache: Path, **regions_defaults) -> dict:
    return {"cache": str(cache), "defaults": {"clean": str(clean), "seed": 5},
            "regions_defaults": {"count": 4, "crop": 64, "region_count": [2, 4], "clean_regions": 0.5,
                                 **regions_defaults},
            "sets": [{"name": "regions_lowlight_noise", "group": "regions", "regions": PAIR}]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One inference thread: on a shared 2-core machine two threads contending with other jobs run
    the tiny model many times slower than one (evaluate.threads says the same)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def clean_folder(tmp_path, photos) -> Path:
    for name in ("astronaut", "coffee"):
        write_png(tmp_path / "clean" / f"{name}.png", photos[name][:160, :160])
    return tmp_path / "clean"


def read_gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------------------
# The regions sets


def test_regions_spec_defaults_and_errors():
    cfg = {"defaults": {"count": 4, "crop": 96}, "regions_defaults": {"count": 16, "crop": 128},
           "sets": [{"name": "rain", "group": "known", "task": ["rain"], "degradations": [["rain", 0.6]]},
                    {"name": "regions_rain_lowlight", "group": "regions", "regions": [["rain", 0.6], ["lowlight", 0.6]]}]}
    plain, regions = parse_sets(cfg)
    assert (plain.kind, plain.count, plain.crop) == ("synthetic", 4, 96)      # regions_defaults stay with regions sets
    assert (regions.kind, regions.count, regions.crop) == ("regions", 16, 128)
    assert regions.task == ("rain", "lowlight") and regions.mask_classes == ("rain", "lowlight")
    assert regions.region_count == (2, 4) and regions.clean_regions == 0.0
    assert plain.modes is None and regions.modes is None                    # every evaluate.modes mode
    with_modes = parse_sets({**cfg, "regions_defaults": {"modes": ["sw", "pw"]}})
    assert [s.modes for s in with_modes] == [None, ("sw", "pw")]
    with pytest.raises(AbairError, match=r"evaluate.sets.rain.modes: must be a non-empty list of modes"):
        parse_sets({"sets": [{**cfg["sets"][0], "modes": ["sw", "psw"]}]})

    def bad(raw: dict, match: str):
        with pytest.raises(AbairError, match=match):
            parse_sets({"sets": [{"name": "x", "group": "regions", **raw}]})

    bad({"degradations": [["rain", 0.6]]}, r"evaluate.sets.x: a set of group `regions` is made with `regions")
    bad({"regions": [["rain", 0.6], ["rain", 0.3]]}, r"evaluate.sets.x.regions: needs distinct degradations")
    bad({"regions": [["fog", 0.6]]}, "evaluate.sets.x: unknown degradation 'fog'")
    bad({"regions": [["rain", 0.6]], "region_count": [3, 2]}, r"evaluate.sets.x.region_count: must be \[lo, hi\]")
    bad({"regions": [["rain", 0.6]], "clean_regions": 1.5}, r"evaluate.sets.x.clean_regions: must be a probability")
    bad({"regions": [["rain", 0.6]], "degradations": [["rain", 0.6]]}, "give one of `path`")
    with pytest.raises(AbairError, match="only such a set is of group `regions`"):
        parse_sets({"sets": [{"name": "x", "group": "known", "regions": [["rain", 0.6]]}]})


def test_region_picks_put_distinct_degradations_first_then_clean_or_any():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert sorted(region_picks(rng, 2, 2, 0.0)) == [0, 1]                 # a pair set shows both
        picks = region_picks(rng, 4, 5, 1.0)                                    # beyond two: always clean
        named = [p for p in picks if p is not None]
        assert len(named) == 2 and len(set(named)) == 2 and picks.count(None) == 2
        assert None not in region_picks(rng, 4, 2, 0.0)                         # never clean
        assert region_picks(rng, 3, 1, 1.0).count(0) == 1                       # one degradation: one region has it


def test_regions_set_is_deterministic_and_cached(tmp_path, clean_folder):
    cfg = regions_cfg(clean_folder, tmp_path / "a")
    spec = parse_sets(cfg)[0]
    first = prepare_synthetic(spec, "unused", tmp_path / "a")
    second = prepare_synthetic(spec, "unused", tmp_path / "b")

    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png"))
    assert len(files) == 3 * 4 and {f.split("/")[0] for f in files} == {"input", "target", MASK_DIR}
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    built = (first / "spec.json").stat().st_mtime_ns
    assert prepare_synthetic(spec, "unused", tmp_path / "a") == first
    assert (first / "spec.json").stat().st_mtime_ns == built                   # reused, not rebuilt
    scored_otherwise = parse_sets({**cfg, "regions_defaults": {**cfg["regions_defaults"], "modes": ["sw"]}})[0]
    prepare_synthetic(scored_otherwise, "unused", tmp_path / "a")
    assert (first / "spec.json").stat().st_mtime_ns == built                   # modes do not change the images

    # another region rule is another set: rebuilt
    changed = parse_sets(regions_cfg(clean_folder, tmp_path / "a", region_count=[3, 3]))[0]
    prepare_synthetic(changed, "unused", tmp_path / "a")
    records = json.loads((first / "spec.json").read_text())["images"]
    assert [len(r["regions"]) for r in records] == [3, 3, 3, 3]


def test_each_region_carries_one_degradation_and_the_mask_says_which(tmp_path, clean_folder):
    spec = parse_sets(regions_cfg(clean_folder, tmp_path / "cache"))[0]
    folder = prepare_synthetic(spec, "unused", tmp_path / "cache")
    records = json.loads((folder / "spec.json").read_text())["images"]
    loaded = load_set(spec, str(folder), 16)
    assert loaded.masks is not None and len(loaded.masks) == len(records) == 4
    bits = {"lowlight": 1, "noise": 2}
    for record, mask, degraded, clean in zip(records, loaded.masks, loaded.inputs, loaded.targets):
        assert record["classes"] == ["lowlight", "noise"]
        regions = record["regions"]
        assert 2 <= len(regions) <= 4
        assert all(r["degradation"] in (None, "lowlight", "noise") for r in regions)
        assert {r["degradation"] for r in regions} >= {"lowlight", "noise"}     # the pair, in every image
        # One degradation per pixel, and the mask's share of each equals the area of its regions.
        assert set(np.unique(mask)) <= {0, 1, 2}
        for name, bit in bits.items():
            area = sum(r["area"] for r in regions if r["degradation"] == name)
            assert abs(float(np.mean(mask == bit)) - area) < 1e-5, name
        assert abs(float(np.mean(mask == 0)) - sum(r["area"] for r in regions if r["degradation"] is None)) < 1e-5
        # What the mask says was applied is what the pixels show: clean regions bit-identical,
        # low light much darker, noise as bright as the clean image but far from it per pixel.
        degraded, clean = degraded.astype(np.float32) / 255, clean.astype(np.float32) / 255
        assert np.array_equal(degraded[mask == 0], clean[mask == 0])
        dark, noisy = mask == 1, mask == 2
        assert degraded[dark].mean() < 0.5 * clean[dark].mean()
        assert abs(degraded[noisy].mean() - clean[noisy].mean()) < 0.05
        assert np.abs(degraded[noisy] - clean[noisy]).mean() > 0.1


def test_a_damaged_mask_is_one_error_naming_it(tmp_path, clean_folder):
    spec = parse_sets(regions_cfg(clean_folder, tmp_path / "cache"))[0]
    folder = prepare_synthetic(spec, "unused", tmp_path / "cache")
    victim = sorted((folder / MASK_DIR).iterdir())[1]
    write_png(victim, np.zeros((32, 32), np.uint8))
    with pytest.raises(AbairError, match=rf"{victim.name}: is not a uint8 mask of its input's size 64x64"):
        load_set(spec, str(folder), 16)
    victim.unlink()
    with pytest.raises(AbairError, match=rf"{victim.name}: the regions set's mask is missing"):
        load_set(spec, str(folder), 16)


# ------------------------------------------------------------------------------------------------
# The pixel-wise oracle's map and the plan


def test_true_weight_map_from_a_mask():
    classes = ["rain", "lowlight", "jpeg"]               # jpeg: no adapter
    names = ["lowlight", "noise", "rain"]
    mask = np.array([[0, 1, 2, 4],
                     [3, 5, 1, 0]], np.uint8)            # 3 = rain and lowlight; 5 = rain and jpeg
    got = true_weight_map(mask, classes, names)
    assert got.shape == (4, 2, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], [[0, 0, 1, 0], [0.5, 0, 0, 0]])       # lowlight
    np.testing.assert_array_equal(got[1], np.zeros((2, 4)))                      # noise: nowhere
    np.testing.assert_array_equal(got[2], [[0, 1, 0, 0], [0.5, 1, 1, 0]])       # rain
    np.testing.assert_array_equal(got[3], np.zeros((2, 4)))                      # keep 0
    # jpeg alone (4) and clean (0): the backbone alone
    assert got[:, 0, 3].sum() == 0 and got[:, 0, 0].sum() == 0


def test_map_choice_and_accuracy():
    true = np.zeros((3, 2, 2), np.float32)             # K = 2 adapters and keep
    true[0, 0, :] = 1.0                                 # top row: adapter 0; bottom row: backbone
    used = np.zeros((3, 2, 2), np.float32)
    used[0, 0, 0], used[1, 0, 1] = 0.7, 0.6             # right, wrong (adapter 1 for adapter 0)
    used[1, 1, 0] = 0.3                                 # backbone 0.7 > 0.3: right
    used[:2, 1, 1] = 0.45                               # backbone 0.1: adapter 0 (first of the tie): wrong
    np.testing.assert_array_equal(map_choice(true), [[0, 0], [2, 2]])
    np.testing.assert_array_equal(map_choice(used), [[0, 1], [2, 0]])
    assert map_accuracy(used, true) == 0.5
    # a map at another resolution is resized to the true one's first
    assert map_accuracy(np.repeat(np.repeat(true, 2, axis=1), 2, axis=2), true) == 1.0


def test_mode_plan_adds_pw_everywhere_and_pw_oracle_on_regions_sets():
    plain, regions, foreign = parse_sets({"sets": [
        {"name": "noise", "group": "known", "task": ["noise"], "degradations": [["noise", 0.5]]},
        {"name": "regions_haze_noise", "group": "regions", "regions": [["haze", 0.6], ["noise", 0.5]]},
        {"name": "regions_snow_jpeg", "group": "regions", "regions": [["snow", 0.6], ["jpeg", 0.6]]}]})
    names = ["noise", "haze"]
    modes = ["input", "sw", "pw", "oracle", "pw_oracle"]
    assert [k for k, _, _ in mode_plan(plain, names, True, modes, has_pw=True)] == ["input", "sw", "pw", "oracle"]
    plan = mode_plan(regions, names, True, modes, has_pw=True)
    assert [k for k, _, _ in plan] == ["input", "sw", "pw", "oracle", "pw_oracle"]
    assert plan[2] == ("pw", "pw", None) and plan[4] == ("pw_oracle", "pw", TRUE_MAP)
    assert plan[3] == ("oracle", "oracle", (0.5, 0.5))          # the image-level oracle: uniform over the set's adapters
    # no map source: no pw; no adapter for any region's degradation: no oracle of either kind
    assert [k for k, _, _ in mode_plan(regions, names, True, modes, has_pw=False)] == ["input", "sw", "oracle", "pw_oracle"]
    assert [k for k, _, _ in mode_plan(foreign, names, True, modes, has_pw=True)] == ["input", "sw", "pw"]
    # a set's own modes: those of evaluate.modes it names, in evaluate.modes' order
    narrowed = dataclasses.replace(regions, modes=("pw_oracle", "sw", "adapters"))
    assert [k for k, _, _ in mode_plan(narrowed, names, True, modes, has_pw=True)] == ["sw", "pw_oracle"]


# ------------------------------------------------------------------------------------------------
# A tiny system end to end


def tiny_system(folder: Path, dense: bool = True, seg: bool = False) -> Path:
    """test_evaluate's tiny system with the do-no-harm outputs, a dense head when `dense`, and a
    segmentation head when `seg`."""
    return evaluate_tiny_system(folder, do_no_harm=True, dense=dense, seg=seg)


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory) -> Path:
    return tiny_system(tmp_path_factory.mktemp("dense-system"))


def tiny_cfg(project_params: dict, cache: Path) -> dict:
    cfg = copy.deepcopy(project_params["evaluate"])
    cfg.update(cache=str(cache), device="cpu", strips=2, strip_crop=48, threads=1)
    cfg["defaults"] = {"clean": "val", "seed": 3, "count": 2, "crop": 48}
    cfg["regions_defaults"] = {"count": 2, "crop": 48, "region_count": [2, 3], "clean_regions": 0.25}
    cfg["sets"] = [{"name": "noise", "group": "known", "task": ["noise"], "degradations": [["noise", 0.5]]},
                   {"name": "regions_haze_noise", "group": "regions", "regions": [["haze", 0.6], ["noise", 0.5]]}]
    return cfg


def test_pw_and_pw_oracle_in_metrics_tables_and_strips(tmp_path, dense_checkpoints, tiny_shards, project_params):
    from tasks.evaluate.stage import evaluate_restorer, load_restorer

    cfg = tiny_cfg(project_params, tmp_path / "eval")
    assert {"pw", "pw_oracle"} <= set(cfg["modes"])                     # the default profile evaluates both
    restorer = load_restorer(str(dense_checkpoints), torch.device("cpu"), cfg)
    assert pixelwise_ready(restorer) and restorer.backbone.seg_head is None
    calls = []
    original = restorer.restore

    def spy(images, **kwargs):
        calls.append(kwargs)
        return original(images, **kwargs)

    restorer.restore = spy
    metrics = evaluate_restorer(restorer, cfg, shards=str(tiny_shards), reports=str(tmp_path / "reports"),
                                progress=False)

    for key in ("known/noise/pw/psnr", "known/noise/pw/ssim", "known/noise/pw/worse",
                "regions/regions_haze_noise/pw/psnr", "regions/regions_haze_noise/pw/worse",
                "regions/regions_haze_noise/pw_oracle/psnr", "regions/regions_haze_noise/pw_oracle/ssim",
                "regions/regions_haze_noise/pw_oracle/worse", "regions/regions_haze_noise/oracle/psnr",
                "summary/all/pw/psnr", "summary/regions/pw_oracle/psnr"):
        assert isinstance(metrics[key], float), key
    assert "known/noise/pw_oracle/psnr" not in metrics                # masks only on regions sets
    assert 0.0 <= metrics[f"regions/regions_haze_noise/pw/{MAP_ACCURACY}"] <= 1.0
    assert metrics["sets/regions/regions_haze_noise/images"] == 2

    # pw_oracle ran mode pw with each image's true map, read here from the cached masks
    folder = tmp_path / "eval" / "regions_haze_noise"
    masks = [read_gray(p) for p in sorted((folder / MASK_DIR).iterdir())]
    truth = np.stack([true_weight_map(m, ["haze", "noise"], restorer.names) for m in masks])
    given = [c["weights"] for c in calls if c["mode"] == "pw" and c.get("weights") is not None]
    assert len(given) == 1 and np.array_equal(given[0].numpy(), truth)
    assert truth[:, :2].sum(axis=1).max() == 1.0 and truth[:, 2].max() == 0.0   # an adapter per degraded pixel, keep 0
    # ... and its PSNR is that restoration's
    inputs = torch.from_numpy(np.stack([read_rgb(p) for p in sorted((folder / "input").iterdir())]))
    targets = torch.from_numpy(np.stack([read_rgb(p) for p in sorted((folder / "target").iterdir())]))
    x, y = (t.permute(0, 3, 1, 2).float() / 255 for t in (inputs, targets))
    out, used = original(x, mode="pw", weights=torch.from_numpy(truth))
    assert used.shape == (2, 3, 48, 48)
    expected = float(psnr(out, y).mean())
    assert abs(metrics["regions/regions_haze_noise/pw_oracle/psnr"] - expected) < 1e-3

    results = (tmp_path / "reports" / "results.md").read_text()
    assert "## Table 2: regions with different degradations" in results
    assert "| Method | regions_haze_noise | Average | Params |" in results
    plain = results.replace("**", "")
    assert f"| ABAIR (PW) | {metrics['known/noise/pw/psnr']:.2f}/" in plain
    assert f"| ABAIR (PW) | {metrics['regions/regions_haze_noise/pw/psnr']:.2f}/" in plain
    assert f"| Oracle (pixel-wise) | {metrics['regions/regions_haze_noise/pw_oracle/psnr']:.2f}/" in plain
    assert "OH vs SW vs PW vs oracle" in results and "| ABAIR (PW) | Oracle | Oracle (pixel-wise) |" in results
    assert "PW map accuracy" in results and "2-3 regions, each one of haze 0.6, noise 0.5" in results
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert set(summary["regions"]) == {"sw_psnr", "sw_ssim", "sw_psnr_gain", "sw_worse"}   # the served mode, as before

    # strips: input, SW, PW, PW weights, (true weights on regions sets), target: 2.5 in a column at 100 dpi
    strips = tmp_path / "reports" / "plots" / "strips"
    assert read_rgb(strips / "noise.png").shape[1] == 5 * 250
    assert read_rgb(strips / "regions_haze_noise.png").shape[1] == 6 * 250
    assert (tmp_path / "reports" / "plots" / "bars_regions.png").is_file()


def test_the_seg_head_is_kept_only_when_pw_reads_it(tmp_path):
    from tasks.evaluate.stage import load_restorer

    seg_only = tiny_system(tmp_path / "seg", dense=False, seg=True)
    cpu = torch.device("cpu")
    restorer = load_restorer(str(seg_only), cpu, {"modes": ["input", "sw", "pw"]})
    assert restorer.backbone.seg_head is not None and pixelwise_ready(restorer)
    out, used = restorer.restore(torch.rand(1, 3, 32, 32), mode="pw")
    assert used.dim() == 4 and out.shape == (1, 3, 32, 32)
    # pw not evaluated, or asked from the dense head: the head is dropped, pw cannot run
    for cfg in ({"modes": ["input", "sw"]}, {"modes": ["pw"], "pw_source": "dense"}):
        restorer = load_restorer(str(seg_only), cpu, cfg)
        assert restorer.backbone.seg_head is None and not pixelwise_ready(restorer)
    with pytest.raises(AbairError, match="evaluate.pw_source: must be one of"):
        load_restorer(str(seg_only), cpu, {"pw_source": "mask"})
    # a dense head makes the maps: the segmentation head is not kept for nothing
    both = tiny_system(tmp_path / "both", dense=True, seg=True)
    assert load_restorer(str(both), cpu, {"modes": ["pw"]}).backbone.seg_head is None


# ------------------------------------------------------------------------------------------------
# The promotion gate on mode pw


def gate_metrics(pw: dict[str, float], sw: float = 25.0, inputs: float = 20.0) -> dict:
    """Metrics shaped like tasks.evaluate's: pw per set (a known and a regions set) and its average, sw flat."""
    out = {"summary/all/input/psnr": inputs, "summary/all/sw/psnr": sw}
    for key, value in pw.items():
        out[f"{key}/pw/psnr"] = value
        out[f"{key}/sw/psnr"] = sw
    out["summary/all/pw/psnr"] = float(np.mean(list(pw.values())))
    return out


GATE = {"mode": "pw", "metric": "psnr", "avg_tolerance_db": 0.0, "task_tolerance_db": 0.2, "floor_psnr_db": 15.0,
        "min_gain_db": 0.0}


def test_gate_compares_mode_pw():
    champion = gate_metrics({"known/rain": 26.0, "regions/regions_rain_lowlight": 24.0})
    better = gate_metrics({"known/rain": 26.1, "regions/regions_rain_lowlight": 24.5}, sw=20.0)
    verdict = gate.compare(better, champion, GATE)
    assert verdict.passed, verdict.reason()                      # sw fell by 5 dB: not what this gate compares
    assert [r["task"] for r in verdict.rows] == ["known/rain", "regions/regions_rain_lowlight", "average"]

    worse_region = gate_metrics({"known/rain": 26.5, "regions/regions_rain_lowlight": 23.7})
    verdict = gate.compare(worse_region, champion, GATE)
    assert not verdict.passed
    assert verdict.reason() == "regions/regions_rain_lowlight psnr -0.30 dB (worse than the 0.20 dB tolerance)"

    without_pw = {k: v for k, v in better.items() if "/pw/" not in k}
    verdict = gate.compare(without_pw, champion, GATE)
    assert not verdict.passed and "known/rain not evaluated for the challenger" in verdict.reason()
    assert "no average (summary/all/pw/psnr) to compare (is `pw` in evaluate.modes?)" in verdict.reason()

    assert gate.floor_check(champion, GATE).passed
    floor = gate.floor_check(without_pw, GATE)
    assert not floor.passed and "summary/all/pw/psnr or summary/all/input/psnr not in the metrics" in floor.reason()
    assert not gate.floor_check(gate_metrics({"known/rain": 19.5}, sw=30.0), GATE).passed   # pw below its input

    with pytest.raises(AbairError, match=r"register.gate.mode: must be one of \['sw', 'oh', 'pw', 'none'\]"):
        gate.compare(better, champion, {**GATE, "mode": "pw_oracle"})
