"""ONNX export and the onnxruntime backend (issue 17): the graphs of tiny random systems (LoRA with a
dense and a keep head, AdaptIR with neither) round-trip through onnxruntime within their bounds on
three sizes; the restorer graph with a constant map is torch's sw, with a low-resolution map
torch's pw, the merged graph torch's oh; `abair restore --backend onnxruntime` writes what the
torch backend writes (max 1 level, >= 99.9% of the pixels identical), whole and with local
tiling; what a backend cannot run is refused in one line; bf16 on CPU stays near fp32."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flows.registry  # noqa: F401  prefect's log handler binds to the stderr of its import: the session's, not a test's
from flows.cli import main
from tasks.core.errors import AbairError
from tasks.serve import backends, restore
from tasks.serve.backends import arrays
from tests.test_restore import ramp, read, write

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NAMES = ("rain", "haze")
# Small enough to export in seconds, deep enough for every level (factors 1, 2, 4, 8) to carry adapters.
BACKBONE = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 0, "heads": (1, 1, 1, 1),
            "ffn_expansion_factor": 2.0, "prompt_size": 4}
# bf16 autocast on CPU against fp32, on this system's outputs in [0, 1] (measured: max 5e-4 to 9e-4,
# mean 8e-5 on 72x96 and 150x200 photos): under 1.3 levels of 8 bits at any pixel
BF16_MAX, BF16_MEAN = 0.005, 0.0005
ROOT = Path(__file__).resolve().parents[1]


def make_system(folder: Path, kind: str, dense: bool, keep: bool, seed: int = 0) -> Path:
    """A tiny system in the checkpoints layout: every adapter tensor and the estimator's heads
    perturbed, so that adapters, maps and keep all change the output."""
    from models.adapters import AdapterBank
    from models.backbone import BackboneConfig, build_backbone
    from models.estimator import Estimator, save_estimator
    from models.identity import save_backbone

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = build_backbone(BackboneConfig(**BACKBONE))
    with torch.no_grad():
        backbone.output.weight.mul_(0.3)
    save_backbone(backbone, folder / "backbone.safetensors")
    bank = AdapterBank(backbone, kind=kind, rank=2, hidden=4)
    for name in NAMES:
        bank.add(name)
        with torch.no_grad():
            for param in bank.parameters_of(name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        bank.save(name, folder / "adapters" / f"{name}.safetensors")
    # the system with keep looks at photos in windows (estimator.windowed), so that the graphs
    # trace the windowed features; the other looks at them whole (the default, and older estimators)
    windows = {"window": 24, "keep_window": 20, "windows": 4} if keep else {}
    # ... and is served with the tone lock (models/tone.py: numpy's arrays.lock_tone in the runtime)
    # at a calibrated share (the metadata's tone_calibration)
    estimator = Estimator(len(NAMES), width=4, crops=1, crop_size=16, view_size=16, do_no_harm=keep, dense=dense,
                          tone_lock=keep, tone_calibration=keep, class_names=list(NAMES), **windows)
    with torch.no_grad():
        for head in [estimator.keep_head, estimator.dense_head, estimator.tone_calibration]:
            for param in (head.parameters() if head is not None else []):
                param.add_(torch.randn(param.shape, generator=generator))
    save_estimator(estimator, folder / "estimator.safetensors")
    return folder


def load(folder: Path):
    from tasks.core.components import load_system_dir

    return load_system_dir(folder)


def exported(tmp_path_factory, label: str, kind: str, dense: bool, keep: bool, merge=(), release: bool = False) -> dict:
    """The system's graphs: through `abair export --onnx` (tasks.release.bundle: a release folder,
    config.json listing every graph's sha256) when `release`, else export_onnx alone."""
    from tasks.release.bundle import export_release
    from tasks.release.onnx_export import export_onnx

    root = tmp_path_factory.mktemp(label)
    components = make_system(root / "checkpoints", kind, dense, keep)
    restorer = load(components)
    if release:
        record = export_release(str(components), root / "release", onnx=True, merge=merge, log=lambda _: None)["onnx"]
    else:
        record = export_onnx(restorer, root / "release" / "onnx", merge, log=lambda _: None)
    return {"components": components, "release": root / "release", "record": record, "restorer": restorer}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict:
    return exported(tmp_path_factory, "lora", "lora", dense=True, keep=True, merge=("rain",), release=True)


@pytest.fixture(scope="module")
def adaptir(tmp_path_factory) -> dict:
    return exported(tmp_path_factory, "adaptir", "adaptir", dense=False, keep=False)


def session(path: Path):
    from tasks.release.onnx_runtime import new_session

    return new_session(path, "cpu")


def photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(ramp(h, w, seed).transpose(2, 0, 1).copy())[None]


# ------------------------------------------------------------------------------------------------
# Export: the graphs and their checks


@pytest.mark.slow
@pytest.mark.parametrize("system, graphs, bound", [
    ("lora", ["estimator.onnx", "keep.onnx", "restorer.onnx", "restorer-mix.onnx", "restorer_rain.onnx"], 1e-4),
    ("adaptir", ["estimator.onnx", "restorer.onnx"], 1e-2),
])
def test_export_writes_every_graph_checked_on_three_sizes(system, graphs, bound, request):
    made = request.getfixturevalue(system)
    record = made["record"]
    folder = made["release"] / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == sorted(graphs)
    assert record["exporter"] == "torch.onnx.export(dynamo=True)" and record["opset"] == 18
    assert record["adapters"] == list(NAMES) and record["weight_columns"] == [*NAMES, "keep"]
    assert [g["file"] for g in record["graphs"]] == graphs
    for graph in record["graphs"]:
        assert [c["size"] for c in graph["checks"]] == [[64, 64], [96, 136], [160, 120]]
        expected_bound = 1e-4 if graph["file"] in ("estimator.onnx", "keep.onnx") else bound
        for check in graph["checks"]:
            assert check["bound"] == expected_bound and check["passed"]
            assert 0 <= check["max_abs_diff"] <= expected_bound
            assert check["max_abs_diff"] == pytest.approx(max(check["outputs"].values()), rel=1e-2)
        model = onnx.load(folder / graph["file"])
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["abair.adapters"]) == list(NAMES) and meta["abair.opset"] == "18"
        assert model.opset_import[0].version == 18
        # the dynamic dimensions carry the README's names
        dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", "", "height", "width"]
    if system == "lora":
        outputs = {g["file"]: set(g["checks"][0]["outputs"]) for g in record["graphs"]}
        assert outputs["estimator.onnx"] == {"weights", "logits", "weight_map"}
        assert outputs["keep.onnx"] == {"keep"}
        keep_meta = {p.key: p.value for p in onnx.load(folder / "keep.onnx").metadata_props}
        calibration = made["restorer"].estimator.tone_calibration
        assert json.loads(keep_meta["abair.tone_calibration"]) == [float(calibration.scale), float(calibration.bias)]
        assert json.loads(keep_meta["abair.tone_lock"]) is True
        assert outputs["restorer.onnx"] == {"restored (pw map)", "network (pw map)", "restored (constant map)"}


def test_a_check_over_its_bound_stops_the_export_and_leaves_no_graph(tmp_path, monkeypatch):
    from tasks.release import onnx_export

    restorer = load(make_system(tmp_path / "checkpoints", "lora", dense=False, keep=False))
    monkeypatch.setattr(onnx_export, "BOUND", -1.0)   # nothing passes
    with pytest.raises(AbairError, match=r"estimator\.onnx: differs from the torch model by .* export stopped"):
        onnx_export.export_onnx(restorer, tmp_path / "onnx", sizes=((32, 40),), log=lambda _: None)
    assert list((tmp_path / "onnx").iterdir()) == []


def test_merging_an_adaptir_adapter_is_refused_before_anything_is_traced(tmp_path):
    from tasks.release.onnx_export import export_onnx

    restorer = load(make_system(tmp_path / "checkpoints", "adaptir", dense=False, keep=False))
    with pytest.raises(AbairError, match="--merge: rain: adaptir adapters are not mergeable"):
        export_onnx(restorer, tmp_path / "onnx", merge=["rain"])
    with pytest.raises(AbairError, match="'snow' is not an adapter"):
        export_onnx(restorer, tmp_path / "onnx", merge=["snow"])
    assert not (tmp_path / "onnx").exists()


# ------------------------------------------------------------------------------------------------
# The graphs against the torch modes, on sizes the export did not check


@pytest.mark.slow
@pytest.mark.parametrize("system, bound", [("lora", 1e-4), ("adaptir", 1e-2)])
def test_restorer_graph_with_a_constant_map_is_torch_sw(system, bound, request):
    made = request.getfixturevalue(system)
    restorer = made["restorer"]
    graph = session(made["release"] / "onnx" / "restorer.onnx")
    for h, w in ((40, 56), (33, 75)):
        images = photo(h, w)
        weights = torch.tensor([[0.6, 0.3, 0.25]])
        with restorer.without_tone_lock():   # the tone lock runs after the graphs
            expected, _ = restorer.restore(images, mode="sw", weights=weights)
        got, network = graph.run(None, {"image": images.numpy(), "weight_map": weights[:, :, None, None].numpy()})
        assert np.abs(got - expected.numpy()).max() <= bound
        # keep blends the clamped network output back towards the input
        blended = np.clip(network, 0, 1) * 0.75 + images.numpy() * 0.25
        assert np.abs(got - blended).max() < 1e-5
        if system == "lora":   # the blend folded into the base weights, in the graph
            mix = session(made["release"] / "onnx" / "restorer-mix.onnx")
            folded = mix.run(["restored"], {"image": images.numpy(), "weights": weights.numpy()})[0]
            assert np.abs(folded - expected.numpy()).max() <= bound


@pytest.mark.slow
def test_restorer_graph_with_a_low_resolution_map_is_torch_pw(lora):
    restorer = lora["restorer"]
    graph = session(lora["release"] / "onnx" / "restorer.onnx")
    generator = torch.Generator().manual_seed(3)
    for h, w, map_size in ((40, 56, (3, 5)), (72, 48, (9, 2)), (24, 24, (30, 30))):
        raw = torch.rand(2, 3, *map_size, generator=generator)
        weight_map = torch.cat([raw[:, :2] / (raw[:, :2].sum(1, keepdim=True) + 0.2), raw[:, 2:] * 0.5], dim=1)
        images = torch.cat([photo(h, w, 1), photo(h, w, 2)])
        with restorer.without_tone_lock():   # the tone lock runs after the graphs
            expected, _ = restorer.restore(images, mode="pw", weights=weight_map)
        got = graph.run(["restored"], {"image": images.numpy(), "weight_map": weight_map.numpy()})[0]
        assert np.abs(got - expected.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_merged_graph_is_torch_oh_on_that_adapter(lora):
    restorer = lora["restorer"]
    graph = session(lora["release"] / "onnx" / "restorer_rain.onnx")
    assert [i.name for i in graph.get_inputs()] == ["image"]
    images = photo(48, 64)
    expected, _ = restorer.restore(images, mode="oh", weights=torch.tensor([[1.0, 0.0, 0.0]]))
    got = graph.run(["restored"], {"image": images.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    other, _ = restorer.restore(images, mode="oh", weights=torch.tensor([[0.0, 1.0, 0.0]]))
    assert np.abs(got - other.numpy()).max() > 1e-3   # it is that adapter, not any


# ------------------------------------------------------------------------------------------------
# `abair restore --backend onnxruntime` against the torch backend


def images_folder(root: Path) -> Path:
    """PNG images of several sizes: ordinary, odd, thin (the graph pads them by reflection) and
    smaller than their padding to a multiple of 8 (edge-padded before the graph, as the backbone pads them)."""
    folder = root / "in"
    for name, (h, w), seed in (("a.png", (96, 136), 0), ("b.png", (61, 45), 1), ("thin.png", (5, 30), 2),
                               ("flat.png", (8, 19), 3), ("edge.png", (3, 20), 4)):
        write(folder / name, (ramp(h, w, seed) * 255).round().astype(np.uint8))
    return folder


def cli_restore(model: Path, folder: Path, out: Path, *args: str) -> int:
    return main(["restore", str(folder), "--model", str(model), "--out", str(out), "--device", "cpu",
                 "--no-progress", *args])


def assert_same_8bit(torch_out: Path, ort_out: Path) -> None:
    names = sorted(p.name for p in torch_out.iterdir())
    assert names and names == sorted(p.name for p in ort_out.iterdir())
    for name in names:
        a, b = read(torch_out / name).astype(int), read(ort_out / name).astype(int)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1, name
        # float rounding moves a value across an 8-bit edge now and then: one in a thousand, and
        # one on an image too small to hold a thousand values (8 x 19 x 3)
        assert (a != b).sum() <= max(1, 0.001 * a.size), (name, (a == b).mean())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sw", "oh", "pw", "none"])
def test_onnxruntime_backend_writes_what_the_torch_backend_writes(lora, tmp_path, mode, capsys):
    folder = images_folder(tmp_path)
    assert cli_restore(lora["components"], folder, tmp_path / "torch", "--mode", mode) == 0
    assert cli_restore(lora["release"], folder, tmp_path / "ort", "--mode", mode, "--backend", "onnxruntime") == 0
    assert_same_8bit(tmp_path / "torch", tmp_path / "ort")
    printed = capsys.readouterr().out
    assert "onnxruntime 1.30.0, CPU" in printed
    if mode != "none":   # the same weights on each image's line
        lines = [line.split("(", 1)[1] for line in printed.splitlines() if ": restored -> " in line]
        assert len(lines) == 10 and lines[:5] == lines[5:]


@pytest.mark.slow
def test_onnxruntime_backend_local_tiling_matches_torch_local_tiling(lora, tmp_path):
    folder = tmp_path / "in"
    write(folder / "big.png", (ramp(150, 210, 5) * 255).round().astype(np.uint8))
    tiles = ["--tiling", "local", "--max-pixels", str(80 * 80)]
    for mode in ("pw", "sw"):
        assert cli_restore(lora["components"], folder, tmp_path / f"torch-{mode}", "--mode", mode, *tiles) == 0
        assert cli_restore(lora["release"], folder, tmp_path / f"ort-{mode}", "--mode", mode, "--backend", "onnxruntime",
                           *tiles) == 0
        assert_same_8bit(tmp_path / f"torch-{mode}", tmp_path / f"ort-{mode}")
    # auto with onnxruntime: local tiles when the image exceeds the tile budget, whole otherwise
    summary = restore.restore_files([str(folder)], model=str(lora["release"]), out=tmp_path / "auto", device="cpu",
                                    max_pixels=80 * 80, backend="onnxruntime", echo=lambda _: None)
    assert summary["images"][0]["tiling"] == "local"
    assert_same_8bit(tmp_path / "torch-sw", tmp_path / "auto")
    summary = restore.restore_files([str(folder)], model=str(lora["release"]), out=tmp_path / "whole", device="cpu",
                                    max_pixels=0, backend="onnxruntime", echo=lambda _: None)
    assert summary["images"][0]["tiling"] == "whole"


@pytest.mark.slow
def test_adaptir_graphs_restore_within_their_bound_and_refuse_pw_without_a_dense_map(adaptir, tmp_path, capsys):
    folder = images_folder(tmp_path)
    assert cli_restore(adaptir["components"], folder, tmp_path / "torch") == 0
    assert cli_restore(adaptir["release"], folder, tmp_path / "ort", "--backend", "onnxruntime") == 0
    for path in (tmp_path / "torch").iterdir():   # the AdaptIR bound, 1e-2, is under 3 levels of 8 bits
        assert np.abs(read(path).astype(int) - read(tmp_path / "ort" / path.name).astype(int)).max() <= 3
    capsys.readouterr()
    assert cli_restore(adaptir["release"], folder, tmp_path / "pw", "--backend", "onnxruntime", "--mode", "pw") == 2
    assert "mode pw needs a dense weight map" in capsys.readouterr().err


@pytest.mark.slow
def test_onnxruntime_restores_without_torch_or_mlflow(lora, tmp_path):
    folder = images_folder(tmp_path)
    script = ("import sys; from flows.cli import main; "
              f"code = main(['restore', {str(folder)!r}, '--model', {str(lora['release'])!r}, '--out', "
              f"{str(tmp_path / 'out')!r}, '--backend', 'onnxruntime', '--mode', 'pw', '--no-progress']); "
              "heavy = sorted(m for m in ('torch', 'mlflow') if m in sys.modules); "
              "print('imported:', heavy); sys.exit(code or bool(heavy))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "imported: []" in done.stdout
    assert len(list((tmp_path / "out").iterdir())) == 5


@pytest.mark.slow
def test_a_graph_that_differs_from_config_json_is_refused(lora, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(lora["release"], release)
    assert "onnx/keep.onnx" in json.loads((release / "config.json").read_text())["files"]
    folder = images_folder(tmp_path)
    assert cli_restore(release, folder, tmp_path / "ok", "--backend", "onnxruntime") == 0
    with open(release / "onnx" / "keep.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(AbairError, match=r"keep\.onnx: sha256 differs from config\.json's"):
        restore.restore_files([str(folder)], model=str(release), out=tmp_path / "no", backend="onnxruntime",
                              device="cpu", echo=lambda _: None)


# ------------------------------------------------------------------------------------------------
# Refusals (one line, before anything loads)


def test_exact_tiling_with_onnxruntime_is_refused(tmp_path, capsys):
    folder = images_folder(tmp_path)
    assert cli_restore(tmp_path, folder, tmp_path / "out", "--backend", "onnxruntime", "--tiling", "exact") == 2
    err = capsys.readouterr().err
    assert "--tiling: exact tiling runs inside the network's blocks in Python" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_without_graphs_is_refused_naming_the_folder_and_the_export(tmp_path, capsys):
    folder = images_folder(tmp_path)
    model = make_system(tmp_path / "checkpoints", "lora", dense=False, keep=False)
    assert cli_restore(model, folder, tmp_path / "out", "--backend", "onnxruntime") == 2
    err = capsys.readouterr().err
    assert f"{model}: no onnx/restorer.onnx" in err and "abair export MODEL OUT --onnx" in err
    with pytest.raises(AbairError, match="needs a release folder with ONNX graphs"):
        restore.restore_files([str(folder)], model="models:/abair-restorer@champion", out=tmp_path / "o",
                              backend="onnxruntime", echo=lambda _: None)


@pytest.mark.parametrize("args, message", [
    (["--backend", "torch", "--precision", "fp16"], "--precision: fp16 runs on CUDA only"),
    (["--backend", "onnxruntime", "--precision", "bf16"], "--precision: the onnxruntime backend runs the fp32 graphs only"),
])
def test_precisions_a_backend_cannot_run_are_refused(tmp_path, capsys, args, message):
    folder = images_folder(tmp_path)
    assert cli_restore(tmp_path / "nothing", folder, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bf16_on_cpu_stays_near_fp32(tmp_path):
    model = make_system(tmp_path / "checkpoints", "lora", dense=True, keep=True)
    rgb = ramp(72, 96, 4)
    out = {}
    for precision in ("fp32", "bf16"):
        engine = backends.get("torch").load(str(model), device="cpu", precision=precision)
        plan = engine.plan(72, 96, None, "auto", None, "sw", None)
        out[precision] = engine.restore(rgb, "sw", None, plan, None).rgb
    difference = np.abs(out["bf16"] - out["fp32"])
    assert 0 < difference.max() <= BF16_MAX and difference.mean() <= BF16_MEAN


# ------------------------------------------------------------------------------------------------
# The numpy side of the backend against its torch originals


def test_numpy_map_window_is_the_torch_map_window():
    from models.restorer import map_window

    generator = torch.Generator().manual_seed(0)
    weight_map = torch.rand(1, 3, 5, 7, generator=generator)
    for size, rows, cols, multiple in (((61, 45), slice(0, 61), slice(0, 45), 8), ((100, 90), slice(13, 77), slice(40, 90), 1),
                                       ((3, 2), slice(0, 3), slice(0, 2), 8)):
        expected = map_window(weight_map, size, rows, cols, multiple).numpy()
        got = arrays.map_window(weight_map.numpy(), size, rows, cols, multiple)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-6


def test_numpy_local_tiling_is_the_torch_local_tiling():
    from models.tiling import tile_starts, tiled_apply

    images = torch.rand(1, 3, 150, 211, generator=torch.Generator().manual_seed(1))
    assert arrays.tile_starts(211, 80, 32) == tile_starts(211, 80, 32)
    expected = tiled_apply(lambda crop, where: crop * (1 + where[0].start / 100), images, 80, 32, with_window=True)
    got = arrays.tiled_apply(lambda crop, where: crop * (1 + where[0].start / 100), images.numpy(), 80, 32)
    assert np.abs(got - expected.numpy()).max() < 1e-5


def test_numpy_padding_and_blend_follow_the_backbone_and_lerp():
    from models.backbone import pad_to_multiple

    for h, w in ((5, 30), (8, 19), (61, 45), (3, 3), (16, 24)):
        x = torch.rand(1, 3, h, w)
        mode = "reflect" if arrays.reflect_fits(h, w) else "replicate"
        assert torch.equal(pad_to_multiple(x), torch.nn.functional.pad(x, (0, -w % 8, 0, -h % 8), mode=mode))
        if mode == "replicate":
            assert np.array_equal(arrays.pad_edge(x.numpy()), pad_to_multiple(x).numpy())
    a, b = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    for weight in (0.1, 0.5, 0.9):
        assert np.abs(arrays.lerp(a.numpy(), b.numpy(), weight) - torch.lerp(a, b, weight).numpy()).max() < 1e-6


def test_onnxruntime_plans_with_its_own_memory_figure_and_smaller_tiles_when_needed():
    from types import SimpleNamespace

    from tasks.serve import memory
    from tasks.serve.backends.onnxruntime_backend import MIN_TILE, RUN_FLOATS, OnnxRuntimeBackend

    system = SimpleNamespace(dim=16, k=5)
    plan = OnnxRuntimeBackend.plan(system, 1024, 1024, 512 * 512, "auto", 2 * 1024**3, "sw", None)
    # 512 px tiles would need 4 x 170 x 16 x 512^2 bytes (2.8 GB) of runtime: the next side down fits
    assert memory.estimate(16, 1024, 1024, "local", 512, run_floats=RUN_FLOATS) > 2 * 1024**3
    assert (plan.tiling, plan.tile) == ("local", 384) and plan.estimate <= 2 * 1024**3
    small = OnnxRuntimeBackend.plan(system, 300, 200, 512 * 512, "auto", 2 * 1024**3, "sw", None)
    assert small.tiling == "whole" and small.estimate == memory.estimate(16, 300, 200, "local", 512, run_floats=RUN_FLOATS)
    with pytest.raises(memory.DoesNotFit, match="local tiles of 128 px"):
        OnnxRuntimeBackend.plan(system, 1024, 1024, 512 * 512, "auto", 250 * 1024**2, "sw", None)
    assert MIN_TILE == 128
