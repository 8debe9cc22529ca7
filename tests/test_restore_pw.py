"""Serving the pixel-wise mode (issue 14): `abair restore --mode pw [--pw-source dense|seg]
[--save-maps]`, the pyfunc's `mode`/`pw_source` params, load_system(keep_seg_head=True) and the
memory plan's pw figures, on a tiny system whose estimator has a dense head and whose backbone
kept its segmentation head."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import flows.registry  # noqa: F401  prefect's log handler binds to the stderr of its import: the session's, not a test's
from flows.cli import main
from tasks.core.errors import AbairError
from tasks.core.weight_maps import LEGEND_ROW, render_weight_map
from tasks.serve import inference, memory, restore
from tests.conftest import make_components
from tests.test_restore import ramp, read, write

NAMES = ("rain", "haze")
SEG_CLASSES = ("rain", "snow")   # haze has no class in the head: its column takes the estimator's weight
DIM = 16                         # the tiny backbone's width


def make_pw_components(folder: Path, seed: int = 0) -> Path:
    """make_components' system with what mode pw reads: a segmentation head on the backbone (its
    classes in the checkpoint's metadata, as Phase I writes them) and a dense head on the estimator,
    both with random non-zero weights, so that the maps vary over the image."""
    from models.backbone import build_backbone
    from models.estimator import Estimator, save_estimator
    from models.identity import load_backbone, save_backbone

    make_components(folder, NAMES, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    plain = load_backbone(folder / "backbone.safetensors")
    backbone = build_backbone(plain.config.__class__(**{**plain.config.__dict__, "seg_classes": len(SEG_CLASSES)}))
    backbone.load_state_dict(plain.state_dict(), strict=False)   # the same restoration weights: the adapters fit
    with torch.no_grad():
        for param in backbone.seg_head.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    save_backbone(backbone, folder / "backbone.safetensors", extra_metadata={"classes": list(SEG_CLASSES)})
    estimator = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, do_no_harm=True, dense=True,
                          class_names=list(NAMES))
    with torch.no_grad():
        for param in estimator.dense_head.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    save_estimator(estimator, folder / "estimator.safetensors")
    return folder


@pytest.fixture(scope="module")
def pw_dir(tmp_path_factory) -> Path:
    return make_pw_components(tmp_path_factory.mktemp("pw") / "checkpoints")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """make_components' system: no dense head, no segmentation head."""
    return make_components(tmp_path_factory.mktemp("plain") / "checkpoints", NAMES)


@pytest.fixture(scope="module")
def pw_restorer(pw_dir):
    from tasks.core.components import load_system_dir

    return load_system_dir(pw_dir, keep_seg_head=True)


def photo_file(folder: Path, name: str = "p.png", h: int = 30, w: int = 44, seed: int = 0) -> Path:
    return write(folder / name, (ramp(h, w, seed) * 255).astype(np.uint8))


def decoded_rgb(path: Path) -> np.ndarray:
    return restore.decode_image(path.read_bytes(), str(path)).rgb


def test_served_modes_follow_the_restorer_modes():
    from models.restorer import MODES, PW_SOURCES

    assert set(inference.SERVED_MODES) == set(MODES) - {"oracle"}
    assert inference.PW_SOURCES == tuple(PW_SOURCES)


def test_load_system_keeps_the_seg_head_only_when_asked(pw_dir):
    from tasks.core.components import load_system_dir

    kept = load_system_dir(pw_dir, keep_seg_head=True)
    assert kept.backbone.seg_head is not None and kept.backbone.config.seg_classes == len(SEG_CLASSES)
    assert kept.seg_class_names == list(SEG_CLASSES)
    dropped = load_system_dir(pw_dir)
    assert dropped.backbone.seg_head is None and dropped.backbone.config.seg_classes == 0
    # the head changes no restored pixel
    x = torch.rand(1, 3, 24, 24)
    assert torch.equal(kept.restore(x, mode="sw")[0], dropped.restore(x, mode="sw")[0])


def test_cli_pw_with_save_maps_writes_the_image_and_its_map(tmp_path, pw_dir, pw_restorer, capsys):
    path = photo_file(tmp_path / "in", "p.png", 30, 44)
    jpeg = tmp_path / "in" / "q.jpg"
    cv2.imwrite(str(jpeg), cv2.cvtColor((ramp(26, 36, 3) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    code = main(["restore", str(tmp_path / "in"), "--model", str(pw_dir), "--out", str(out), "--device", "cpu",
                 "--mode", "pw", "--save-maps", "--no-progress"])
    printed = capsys.readouterr().out
    assert code in (None, 0)
    assert "mode pw (dense weight maps)" in printed
    assert f"{path}: restored -> {out / 'p.png'} (mean weights: " in printed
    assert f"map -> {out / 'p.map.png'})" in printed and f"map -> {out / 'q.map.png'})" in printed
    assert read(out / "p.png").shape == (30, 44, 3) and read(out / "q.jpg").shape == (26, 36, 3)
    assert read(out / "p.map.png").shape == (30 + LEGEND_ROW, 44, 3)
    assert read(out / "q.map.png").shape == (26 + LEGEND_ROW, 36, 3)
    assert sorted(p.name for p in out.iterdir()) == ["p.map.png", "p.png", "q.jpg", "q.map.png"]   # nothing half-written
    # the picture is the map the image was restored with, drawn over that image
    result = inference.restore_image(pw_restorer, decoded_rgb(path), "pw", tiling="exact")
    expected = restore.map_picture(decoded_rgb(path), result.weight_map, list(NAMES))
    assert np.array_equal(cv2.cvtColor(read(out / "p.map.png"), cv2.COLOR_BGR2RGB), expected)
    assert np.array_equal(read(out / "p.png"), cv2.cvtColor(restore.to_stored(result.rgb, np.uint8), cv2.COLOR_RGB2BGR))
    means = result.weight_map.reshape(len(NAMES) + 1, -1).mean(axis=1)
    assert result.weights == pytest.approx(dict(zip([*NAMES, "keep"], means.tolist())), abs=1e-6)
    assert f"rain {result.weights['rain']:.2f}" in printed


def test_the_map_picture_follows_the_map_and_is_the_same_in_bands():
    rgb = ramp(40, 52)
    left = np.zeros((3, 4, 4), np.float32)
    left[0, :, :2] = 1.0           # rain on the left half, the backbone alone on the right
    right = left[:, :, ::-1].copy()
    pictures = [restore.map_picture(rgb, m, list(NAMES)) for m in (left, right)]
    assert not np.array_equal(pictures[0][:, :10], pictures[1][:, :10])
    assert np.array_equal(pictures[0][40:], pictures[1][40:])          # the legend is the same
    # rain's colour dominates where rain is applied, not elsewhere
    blue = lambda p: p[:40, :, 2].astype(int) - p[:40, :, 0].astype(int)  # noqa: E731  (rain's colour is blue)
    assert blue(pictures[0])[:, :8].mean() > blue(pictures[0])[:, -8:].mean() + 40
    assert blue(pictures[1])[:, -8:].mean() > blue(pictures[1])[:, :8].mean() + 40
    # drawn in bands of rows or at once: the same picture, render_weight_map's own
    from models.restorer import map_window

    whole = map_window(torch.from_numpy(left)[None], (40, 52), slice(0, 40), slice(0, 52), multiple=1)[0].numpy()
    assert np.array_equal(restore.map_picture(rgb, left, list(NAMES), rows=7), pictures[0])
    assert np.array_equal(pictures[0], render_weight_map(rgb, whole, list(NAMES)))


def test_pw_source_seg_runs_with_the_kept_head(tmp_path, pw_dir):
    path = photo_file(tmp_path, "s.png", 28, 40, seed=2)
    summaries = {source: restore.restore_files([str(path)], model=str(pw_dir), out=tmp_path / source, device="cpu",
                                               mode="pw", pw_source=source, save_maps=True, echo=lambda _: None)
                 for source in ("dense", "seg")}
    for source, summary in summaries.items():
        assert summary["images"][0]["pw_source"] == source
        assert summary["images"][0]["weight_map"] == str(tmp_path / source / "s.map.png")
    assert not np.array_equal(read(tmp_path / "dense" / "s.map.png"), read(tmp_path / "seg" / "s.map.png"))
    assert not np.array_equal(read(tmp_path / "dense" / "s.png"), read(tmp_path / "seg" / "s.png"))


def test_mode_none_serves_the_backbone_alone(tmp_path, pw_dir, pw_restorer):
    path = photo_file(tmp_path, "n.png", 20, 24, seed=4)
    lines = []
    summary = restore.restore_files([str(path)], model=str(pw_dir), out=tmp_path / "out", device="cpu", mode="none",
                                    echo=lines.append)
    assert lines[-1] == f"{path}: restored -> {tmp_path / 'out' / 'n.png'} (the backbone alone)"
    assert summary["images"][0]["weights"] == {}
    alone = pw_restorer.backbone(torch.from_numpy(decoded_rgb(path).transpose(2, 0, 1).copy())[None]).clamp(0, 1)
    expected = restore.to_stored(alone[0].permute(1, 2, 0).detach().numpy(), np.uint8)
    assert np.array_equal(cv2.cvtColor(read(tmp_path / "out" / "n.png"), cv2.COLOR_BGR2RGB), expected)


@pytest.mark.parametrize("options, where, problem", [
    ({"mode": "pw", "pw_source": "bogus"}, "--pw-source", "must be one of dense, seg, got 'bogus'"),
    ({"mode": "sw", "pw_source": "seg"}, "--pw-source", "chooses the weight map of mode pw; mode sw has none"),
    ({"mode": "oh", "save_maps": True}, "--save-maps", "draws the pixel-wise weight maps of --mode pw; mode oh has none"),
    ({"mode": "oracle"}, "--mode", "must be one of sw, oh, pw, none, got 'oracle'"),
])
def test_bad_mode_options_are_one_error_before_loading(tmp_path, options, where, problem):
    path = photo_file(tmp_path)
    with pytest.raises(AbairError) as caught:
        restore.restore_files([str(path)], model=str(tmp_path / "no-model-here"), out=tmp_path / "out", device="cpu",
                              echo=lambda _: None, **options)
    assert (caught.value.where, caught.value.problem) == (where, problem)


def test_a_bad_pw_source_on_the_command_line_is_one_usage_error(tmp_path, pw_dir, capsys):
    path = photo_file(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(["restore", str(path), "--model", str(pw_dir), "--mode", "pw", "--pw-source", "bogus"])
    assert caught.value.code == 2
    assert "argument --pw-source: invalid choice: 'bogus' (choose from 'dense', 'seg')" in capsys.readouterr().err


def test_a_system_without_the_asked_source_is_one_error_naming_it(tmp_path, plain_dir):
    path = photo_file(tmp_path)
    cases = {"seg": "the system's backbone has no segmentation head", "dense": "the system's estimator has no dense head",
             None: "mode 'pw' needs a weight map: this system has neither"}
    for source, problem in cases.items():
        with pytest.raises(AbairError) as caught:
            restore.restore_files([str(path)], model=str(plain_dir), out=tmp_path / "out", device="cpu", mode="pw",
                                  pw_source=source, echo=lambda _: None)
        assert caught.value.where == str(plain_dir) and caught.value.problem.startswith(problem)
    assert not (tmp_path / "out").exists()


def test_save_maps_never_writes_over_an_input_or_another_output(tmp_path):
    folder = tmp_path / "in"
    photo_file(folder, "a.png")
    photo_file(folder, "a.map.png")
    assert [j.target.name for j in restore.plan([str(folder)], tmp_path / "out")] == ["a.map.png", "a.png"]
    with pytest.raises(AbairError, match=r"a\.png: its weight map would be written to .*a\.map\.png as "
                                         r".*a\.map\.png's restored image is too"):
        restore.plan([str(folder)], tmp_path / "out", save_maps=True)
    source, other_input = photo_file(tmp_path / "src", "b.png"), photo_file(tmp_path / "b", "b.map.png", seed=1)
    with pytest.raises(AbairError, match=r"b\.map\.png: would be overwritten by .*src/b\.png's weight map"):
        restore.plan([str(source), str(other_input)], tmp_path / "b", save_maps=True)


def test_the_pyfunc_serves_pw_with_either_source(pw_dir, pw_restorer, tmp_path):
    """Saved and loaded through MLflow (which checks predict's params against the signature):
    mode pw with either source restores as inference.restore_rgb does; bad params are one ValueError."""
    import mlflow.pyfunc

    from tasks.serve.pyfunc import save_restorer

    model = mlflow.pyfunc.load_model(str(save_restorer(pw_dir, tmp_path / "restorer")))
    assert [p.name for p in model.metadata.signature.params.params] == ["mode", "pw_source"]
    image = (ramp(24, 32, seed=5) * 255).astype(np.uint8)
    rgb = image.astype(np.float32) / 255.0
    outputs = {}
    for source in ("dense", "seg"):
        outputs[source] = model.predict(image, params={"mode": "pw", "pw_source": source})
        expected, weights = inference.restore_rgb(pw_restorer, rgb, "pw", pw_source=source)
        assert np.array_equal(outputs[source], restore.to_stored(expected, np.uint8))
        assert list(weights) == [*NAMES, "keep"]          # per-image vectors, as in the other modes
    assert np.array_equal(model.predict(image, params={"mode": "pw"}), outputs["dense"])   # the default source
    assert not np.array_equal(outputs["dense"], outputs["seg"])
    assert not np.array_equal(outputs["dense"], model.predict(image, params={"mode": "sw"}))
    python_model = model.unwrap_python_model()
    with pytest.raises(ValueError, match="^pw_source must be one of dense, seg, got 'x'"):
        python_model.predict(None, image, params={"mode": "pw", "pw_source": "x"})
    with pytest.raises(ValueError, match="^pw_source chooses the weight map of mode pw"):
        python_model.predict(None, image, params={"mode": "sw", "pw_source": "seg"})


def test_the_memory_plan_counts_the_pixel_wise_arrays(pw_restorer):
    k = len(pw_restorer.weight_names)
    for tiling, tile in (("whole", None), ("exact", 512), ("local", 512)):
        sw = memory.estimate(DIM, 1000, 1200, tiling, tile)
        assert memory.estimate(DIM, 1000, 1200, tiling, tile, mode="pw", columns=k) > sw, tiling
    pixels = 2000 * 2000
    exact = {mode: memory.estimate(DIM, 2000, 2000, "exact", 512, mode=mode, columns=k) for mode in ("sw", "pw")}
    assert exact["pw"] - exact["sw"] == memory.pw_map_bytes(pixels, k) == 4 * memory.PW_MAP_FLOATS * k * pixels
    local = {mode: memory.estimate(DIM, 2000, 2000, "local", 512, mode=mode, columns=k) for mode in ("sw", "pw")}
    assert local["pw"] - local["sw"] == memory.network_bytes(DIM, 512 * 512, memory.PW_RUN_FLOATS - memory.WHOLE_FLOATS)
    # the seg source's extra pass runs exact-tiled: it holds the whole image's skip connections,
    # more than local tiles need, and is refused with the way out when even that does not fit
    seg = memory.estimate(DIM, 2000, 2000, "local", 512, mode="pw", columns=k, pw_source="seg")
    assert seg == memory.image_bytes(2000, 2000) + memory.network_bytes(DIM, pixels, memory.EXACT_FLOATS) \
        + memory.network_bytes(DIM, 512 * 512, memory.WHOLE_FLOATS) + memory.pw_map_bytes(pixels, k) > local["pw"]
    whole_seg = memory.estimate(DIM, 500, 500, "whole", None, mode="pw", columns=k, pw_source="seg")
    # whole, the adapted pass (PW_RUN_FLOATS) outweighs the seg pass (WHOLE_FLOATS) that runs before it
    assert whole_seg == memory.estimate(DIM, 500, 500, "whole", None, mode="pw", columns=k)
    with pytest.raises(memory.DoesNotFit, match=r"--pw-source dense: the seg source's extra backbone pass"):
        memory.plan(DIM, 6000, 6000, 512, "auto", mode="pw", columns=k, pw_source="seg")
    # an image whose exact tiling fits in sw but not in pw goes local in pw
    side = 1500
    budget = (memory.estimate(DIM, side, side, "exact", 512)
              + memory.estimate(DIM, side, side, "exact", 512, mode="pw", columns=k)) // 2
    assert memory.plan(DIM, side, side, 512, "auto", budget).tiling == "exact"
    assert memory.plan(DIM, side, side, 512, "auto", budget, mode="pw", columns=k).tiling == "local"
    planned = memory.plan_restore(pw_restorer, side, side, 512 * 512, "auto", budget, mode="pw")
    assert planned.tiling == "local"
    assert planned.estimate == memory.estimate(DIM, side, side, "local", 512, mode="pw", columns=k)   # the dense default

