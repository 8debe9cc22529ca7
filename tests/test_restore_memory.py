"""`abair restore` under a memory budget: the plan picks exact where it fits, local where it does
not and refuses up front what cannot fit; the lean paths (planar decode, banded store, separable
local-tiling weights, in-place keep blend) give the same pixels as the plain ones."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from tasks.core import imageio
from tasks.core.errors import AbairError
from tasks.serve import memory, restore
from tests.test_restore import model_dir, ramp, read, restorer, write  # noqa: F401  (fixtures)

DIM = 16   # the tiny backbone's width
TILE = 512


def test_plan_is_whole_then_exact_then_local_then_refused():
    small = memory.plan(DIM, 400, 300, TILE)
    assert small.tiling == "whole" and small.tile is None
    mid = memory.plan(DIM, 1000, 1000, TILE)
    assert mid.tiling == "exact" and mid.tile == TILE and mid.estimate <= memory.DEFAULT_BUDGET
    big = memory.plan(DIM, 3000, 4000, TILE)
    assert big.tiling == "local" and big.estimate <= memory.DEFAULT_BUDGET
    assert memory.estimate(DIM, 3000, 4000, "exact", TILE) > memory.DEFAULT_BUDGET   # why it is not exact
    with pytest.raises(memory.DoesNotFit, match=r"12000x9000 px \(108\.0 MP\) needs about .* over the memory budget "
                                                r"of 2\.00 GB: raise --memory-budget"):
        memory.plan(DIM, 9000, 12000, TILE)


def test_requested_tiling_is_kept_or_refused_with_the_way_out():
    assert memory.plan(DIM, 3000, 4000, TILE, "local").tiling == "local"
    assert memory.plan(DIM, 1000, 1000, TILE, "local").tiling == "local"   # asked for, fits
    with pytest.raises(memory.DoesNotFit, match="use --tiling local"):
        memory.plan(DIM, 3000, 4000, TILE, "exact")
    with pytest.raises(memory.DoesNotFit, match="set a tile budget"):
        memory.plan(DIM, 3000, 4000, None)
    assert memory.plan(DIM, 3000, 4000, TILE, "exact", budget=None).tiling == "exact"   # no budget
    with pytest.raises(ValueError, match="tiling"):
        memory.plan(DIM, 10, 10, TILE, "approx")


def test_estimates_grow_with_the_image_and_local_stays_below_exact():
    for side in (600, 2000, 5000):
        exact, local = (memory.estimate(DIM, side, side, t, TILE) for t in ("exact", "local"))
        assert local < exact
    pixels = [1e6, 4e6, 16e6]
    added = [memory.estimate(DIM, int(math.sqrt(p)), int(math.sqrt(p)), "local", TILE) for p in pixels]
    assert added[0] < added[1] < added[2]
    assert (added[2] - added[1]) / 12e6 == pytest.approx(memory.IMAGE_BYTES, rel=0.01)   # per pixel: the arrays


@pytest.mark.parametrize("text, value", [("2GB", 2 * 1024**3), ("1.5 GiB", int(1.5 * 1024**3)), ("800MB", 800 * 1024**2),
                                         ("512m", 512 * 1024**2), ("1000000", 1000000), ("0", None), (None, None)])
def test_memory_budget_sizes(text, value):
    assert memory.parse_bytes(text) == value


def test_a_bad_memory_budget_is_one_error(tmp_path, model_dir):  # noqa: F811
    path = write(tmp_path / "a.png", (ramp(20, 20) * 255).astype(np.uint8))
    with pytest.raises(AbairError, match="--memory-budget: not a size"):
        restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / "out", device="cpu",
                              memory_budget="lots", echo=lambda _: None)


def test_an_image_no_tiling_fits_is_refused_before_decoding_and_the_batch_goes_on(tmp_path, model_dir, monkeypatch):  # noqa: F811
    """A small budget: the large image is one error naming it, with what it needs, raised before
    its pixels are decoded; the small one is restored; the run ends with the failure count."""
    folder = tmp_path / "in"
    write(folder / "big.png", (ramp(300, 400) * 255).astype(np.uint8))
    write(folder / "small.png", (ramp(24, 32, seed=1) * 255).astype(np.uint8))
    budget = memory.estimate(DIM, 24, 32, "whole", None) + 1
    decoded = []
    real_decode = imageio.decode
    monkeypatch.setattr(imageio, "decode", lambda data, name, *a: decoded.append(name) or real_decode(data, name, *a))
    lines = []
    with pytest.raises(AbairError, match="1 of 2 images"):
        restore.restore_files([str(folder)], model=str(model_dir), out=tmp_path / "out", device="cpu",
                              memory_budget=budget, echo=lines.append, progress=False)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "big.png" in errors[0] and "400x300 px" in errors[0] and "run whole" in errors[0]
    assert "over the memory budget" in errors[0]
    assert [n.endswith("small.png") for n in decoded] == [True]        # the big one was never decoded
    assert (tmp_path / "out" / "small.png").exists() and not (tmp_path / "out" / "big.png").exists()


def test_auto_tiling_says_which_and_matches_the_forced_one(tmp_path, model_dir):  # noqa: F811
    """With a tile budget below the image, auto picks exact (it fits 2 GB) and says so; a budget
    exact does not fit makes it local, with the same pixels as --tiling local."""
    path = write(tmp_path / "p.png", (ramp(100, 140, seed=4) * 255).astype(np.uint8))
    outs = {}
    for name, kwargs in {"auto": {}, "exact": {"tiling": "exact"}, "local": {"tiling": "local"},
                         "auto_small": {"memory_budget": memory.estimate(DIM, 100, 140, "local", 72) + 1}}.items():
        lines = []
        summary = restore.restore_files([str(path)], model=str(model_dir), out=tmp_path / name, device="cpu",
                                        max_pixels=72 * 72, echo=lines.append, **kwargs)
        outs[name] = read(tmp_path / name / "p.png")
        outs[name + "_tiling"] = summary["images"][0]["tiling"]
        outs[name + "_line"] = lines[-1]
    assert outs["auto_tiling"] == "exact" and "exact tiles of 72 px" in outs["auto_line"]
    assert np.array_equal(outs["auto"], outs["exact"])
    assert outs["auto_small_tiling"] == "local" and "local tiles of 72 px" in outs["auto_small_line"]
    assert np.array_equal(outs["auto_small"], outs["local"])


@pytest.mark.parametrize("kind", ["uint8", "uint16", "gray8", "rgba8", "float", "bool"])
def test_planar_decode_equals_the_plain_one(kind):
    rng = np.random.default_rng(0)
    raw = {"uint8": rng.integers(0, 256, (13, 17, 3), dtype=np.uint8),
           "uint16": rng.integers(0, 65536, (13, 17, 3), dtype=np.uint16),
           "gray8": rng.integers(0, 256, (13, 17), dtype=np.uint8),
           "rgba8": rng.integers(0, 256, (13, 17, 4), dtype=np.uint8),
           "float": rng.uniform(-0.5, 1.5, (13, 17, 3)).astype(np.float32),
           "bool": rng.integers(0, 2, (13, 17)).astype(bool)}[kind]
    planar = restore.planar_float_rgb(raw)
    assert planar.shape == (13, 17, 3) and planar.dtype == np.float32
    assert np.allclose(planar, imageio.to_float_rgb(raw), atol=1e-7)
    assert planar.transpose(2, 0, 1).flags["C_CONTIGUOUS"]   # the network's layout: no copy on the way in


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_banded_store_equals_the_plain_rounding(dtype):
    img = np.random.default_rng(1).uniform(-0.2, 1.2, (530, 7, 3)).astype(np.float32)
    plain = np.clip(img, 0, 1)
    if dtype != np.float32:
        plain = (plain * (255.0 if dtype == np.uint8 else 65535.0) + 0.5).astype(dtype)
    stored = restore.to_stored(img, dtype, rows=100)
    assert stored.dtype == dtype and np.array_equal(stored, plain)


@pytest.mark.parametrize("h, w, tile, overlap", [(100, 140, 48, 16), (64, 64, 64, 8), (97, 203, 40, 12)])
def test_separable_tile_weights_equal_the_summed_weight_map(h, w, tile, overlap):
    """tiled_apply divides by the outer product of 1-D weight sums: the same as summing every
    tile's 2-D window, so an identity function comes back unchanged."""
    from models.tiling import _ramps, tiled_apply

    images = torch.rand(1, 3, h, w)
    assert torch.allclose(tiled_apply(lambda t: t, images, tile, overlap), images, atol=1e-6)
    total = torch.zeros(h, w)
    for y, th, wy in _ramps(h, tile, overlap, None):
        for x, tw, wx in _ramps(w, tile, overlap, None):
            total[y:y + th, x:x + tw] += wy[:, None] * wx[None, :]
    scaled = tiled_apply(lambda t: t * 2.0, images, tile, overlap)
    assert torch.allclose(scaled, 2.0 * images, atol=1e-5)
    assert float(total.min()) > 0


def test_cli_takes_the_memory_budget_and_auto_is_the_default(tmp_path, model_dir, capsys):  # noqa: F811
    from flows.cli import main

    path = write(tmp_path / "p.png", (ramp(24, 24) * 255).astype(np.uint8))
    main(["restore", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--device", "cpu", "--memory-budget", "1GB",
          str(path)])
    assert cv2.imread(str(tmp_path / "o" / "p.png")) is not None
    with pytest.raises(SystemExit):
        main(["restore", "--model", str(model_dir), "--tiling", "approx", str(path)])


def test_the_pyfunc_plans_under_its_memory_budget(model_dir):  # noqa: F811
    """The pyfunc's model_config takes memory_budget and tiling like `abair restore`: an image no
    tiling fits is one ValueError naming its index; the rest restore as with --tiling auto."""
    from types import SimpleNamespace

    from tasks.serve import inference
    from tasks.serve.pyfunc import RestorerModel

    def model(**config):
        loaded = RestorerModel()
        loaded.load_context(SimpleNamespace(artifacts={"backbone": str(model_dir / "backbone.safetensors"),
                                                       "adapters": str(model_dir / "adapters"),
                                                       "estimator": str(model_dir / "estimator.safetensors")},
                                            model_config={"device": "cpu", **config}))
        return loaded

    small, big = ((ramp(h, w, seed=h) * 255).astype(np.uint8) for h, w in ((24, 32), (300, 400)))
    tight = model(memory_budget=memory.estimate(DIM, 24, 32, "whole", None) + 1)
    assert tight.predict(None, small).shape == small.shape
    with pytest.raises(ValueError, match=r"^image 1: 400x300 px .* over the memory budget"):
        tight.predict(None, [small, big])
    auto = model(max_pixels=72 * 72)
    exact, _ = inference.restore_rgb(auto.restorer, small.astype(np.float32) / 255.0, "sw", 72 * 72, "exact")
    assert np.array_equal(auto.predict(None, small), restore.to_stored(exact, np.uint8))
    with pytest.raises(ValueError, match="tiling"):
        model(tiling="approx")
