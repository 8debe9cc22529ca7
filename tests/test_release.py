"""`abair export`: the release folder (byte-identical weights, config.json with every file's sha256),
Restorer.from_release restoring the same pixels as the source system, tampering refused, an
existing folder kept, an interrupted export leaving nothing, the model card written from the facts
(registry versions with and without stored release facts, a bare folder, a project's record) and
`abair restore --model RELEASE`."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import flows.registry  # noqa: F401  prefect's log handler binds to the stderr of its import: the session's, not a test's
from flows.cli import main
from models.checkpoint import CheckpointError
from models.restorer import Restorer
from tasks.core.components import file_sha256, load_system_dir
from tasks.core.errors import AbairError
from tasks.registry import gate
from tasks.registry.register import FACTS_FILE, register, register_evaluated
from tasks.release import bundle, card
from tasks.release.bundle import export_release
from tasks.serve.pyfunc import save_restorer

NAMES = ("noise", "haze")
ADAPTER_SEVERITY = {"noise": [0.1, 0.9], "haze": [0.25, 1.0]}
PRETRAIN_HASH = "pretrain-inputs-1"


def tiny_system(folder: Path) -> Path:
    """A tiny, untrained system in the checkpoints layout, with what training writes into the files:
    a backbone with a segmentation head and `inputs_hash`, two LoRA adapters with a visible effect
    and their severity range and steps, an estimator with the do-no-harm keep head and a dense head."""
    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.estimator import EstimatorConfig, build_estimator, save_estimator
    from models.identity import save_backbone

    torch.manual_seed(0)
    backbone = build_backbone("tiny", seg_classes=2)
    with torch.no_grad():
        backbone.output.weight.mul_(0.1)
    save_backbone(backbone, folder / "backbone.safetensors",
                  {"classes": json.dumps(list(NAMES)), "inputs_hash": PRETRAIN_HASH, "steps": "7"})
    bank = AdapterBank(backbone)
    for name in NAMES:
        bank.add(name)
        with torch.no_grad():
            for key, param in bank.named_parameters_of(name):
                if "lora_B" in key:
                    param.normal_(0, 0.05)
        bank.save(name, folder / "adapters" / f"{name}.safetensors",
                  extra_metadata={"severity": json.dumps(ADAPTER_SEVERITY[name]), "steps": "5", "data": f"synthetic:{name}"})
    config = EstimatorConfig(len(NAMES), width=4, crops=1, crop_size=16, view_size=32, do_no_harm=True, dense=True)
    save_estimator(build_estimator(config, list(NAMES)), folder / "estimator.safetensors")
    return folder


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Path:
    return tiny_system(tmp_path_factory.mktemp("system") / "checkpoints")


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(seed))


def metrics() -> dict:
    """Evaluation metrics shaped like tasks.evaluate's: the served output (sw) is worse than the
    input on `haze` (half its images) and better on `noise`; two of four images of `noise` worse."""
    return {"known/noise/input/psnr": 20.0, "known/noise/input/ssim": 0.5, "known/noise/sw/psnr": 24.25,
            "known/noise/sw/ssim": 0.7, "known/noise/sw/worse": 0.25,
            "known/haze/input/psnr": 22.0, "known/haze/input/ssim": 0.6, "known/haze/sw/psnr": 21.5,
            "known/haze/sw/ssim": 0.58, "known/haze/sw/worse": 0.5,
            "sets/known/noise/images": 4, "sets/known/haze/images": 4,
            "summary/known/sw/psnr": 22.875, "summary/known/sw/ssim": 0.64, "summary/known/input/psnr": 21.0,
            "summary/known/input/ssim": 0.55, "summary/all/sw/psnr": 22.875,
            "estimator/accuracy": 0.625, "estimator/images": 8, "estimator/known/noise/accuracy": 0.75,
            "estimator/known/haze/accuracy": 0.5}


def write_photo(path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# The release folder and from_release


def test_release_from_a_folder_is_byte_identical_and_restores_the_same_pixels(tmp_path, system):
    out = tmp_path / "release"
    config = export_release(str(system), out, log=lambda _: None)

    assert sorted(files_under(out)) == ["MODEL_CARD.md", "config.json", "facts.json", "weights/adapters/haze.safetensors",
                                        "weights/adapters/noise.safetensors", "weights/backbone.safetensors",
                                        "weights/estimator.safetensors"]
    for relative, source in (("weights/backbone.safetensors", "backbone.safetensors"),
                             ("weights/estimator.safetensors", "estimator.safetensors"),
                             ("weights/adapters/noise.safetensors", "adapters/noise.safetensors"),
                             ("weights/adapters/haze.safetensors", "adapters/haze.safetensors")):
        assert (out / relative).read_bytes() == (system / source).read_bytes(), relative
    written = json.loads((out / "config.json").read_text())
    assert written == config
    assert written["files"] == {path: file_sha256(out / path) for path in files_under(out) if path != "config.json"}
    assert written["adapters"] == list(NAMES) and written["weight_columns"] == [*NAMES, "keep"]
    assert written["kind"] == "lora" and written["adapter_options"]["rank"] == 4 and written["pw_source"] == "dense"
    assert written["backbone"]["config"]["dim"] == 16 and written["backbone"]["seg_classes"] == list(NAMES)
    assert written["estimator"]["class_names"] == list(NAMES) and written["estimator"]["config"]["dense"] is True
    assert written["weights"]["adapters"] == {"haze": "weights/adapters/haze.safetensors",
                                              "noise": "weights/adapters/noise.safetensors"}
    assert written["source"] == {"reference": str(system), "kind": "components folder", "registry": None,
                                 "versions": None, "content_hash": None}

    released, source = Restorer.from_release(out), load_system_dir(system)
    assert released.names == source.names and released.pw_source == "dense"
    assert released.backbone.seg_head is None   # pw's map comes from the dense head: the seg head is not needed
    batch = images()
    for mode in ("sw", "pw", "oh"):
        ours, ours_weights = released.restore(batch, mode=mode)
        theirs, their_weights = source.restore(batch, mode=mode)
        assert torch.equal(ours, theirs), mode
        assert torch.equal(ours_weights, their_weights), mode
    assert Restorer.from_release(out, keep_seg_head=True).backbone.seg_head is not None

    # a bare folder has no training record: the card says so, and states what the files carry
    text = (out / "MODEL_CARD.md").read_text()
    assert "Generated by `abair export` from `" + str(system) + "` (components folder)." in text
    assert "Training data: not recorded (the source holds no record of the shard set)." in text
    assert "Evaluation: not recorded (the source holds no metrics)." in text
    assert "| Content hash | not recorded |" in text and "| Evaluation suite | not recorded |" in text
    assert "| noise | 0.1 to 0.9 | not recorded | not recorded | synthetic:noise |" in text
    assert "| Phase I: backbone | 7 | not recorded |" in text
    assert f"| backbone | `weights/backbone.safetensors` | not recorded | `{file_sha256(system / 'backbone.safetensors')}` |" in text


def test_a_changed_missing_or_extra_file_is_refused_naming_it(tmp_path, system, capsys):
    out = tmp_path / "release"
    export_release(str(system), out, log=lambda _: None)

    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    adapter = tampered / "weights/adapters/haze.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1
    adapter.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="haze.safetensors: sha256 differs from config.json's"):
        Restorer.from_release(tampered)
    photo = write_photo(tmp_path / "photo.png")
    capsys.readouterr()
    assert main(["restore", str(photo), "--model", str(tampered), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert f"error: {adapter}: sha256 differs from config.json's" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    extra = tmp_path / "extra"
    shutil.copytree(out, extra)
    shutil.copyfile(extra / "weights/adapters/haze.safetensors", extra / "weights/adapters/rain.safetensors")
    with pytest.raises(CheckpointError, match="rain.safetensors: not listed in config.json"):
        Restorer.from_release(extra)

    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "MODEL_CARD.md").unlink()
    with pytest.raises(CheckpointError, match="MODEL_CARD.md: missing: config.json lists it"):
        Restorer.from_release(missing)


def test_an_existing_folder_is_kept_unless_force_replaces_a_release(tmp_path, system):
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AbairError, match="already exists \\(use --force"):
        export_release(str(system), out, log=lambda _: None)
    with pytest.raises(AbairError, match="is not a release folder"):
        export_release(str(system), out, force=True, log=lambda _: None)
    assert files_under(out) == {"notes.txt": b"mine"}

    shutil.rmtree(out)
    export_release(str(system), out, log=lambda _: None)
    before = files_under(out)
    assert main(["export", str(system), "--out", str(out)]) == 2
    assert files_under(out) == before
    assert main(["export", str(system), "--out", str(out), "--force"]) == 0
    assert files_under(out) == before   # the same source gives the same bytes


def test_an_interrupted_export_leaves_no_release(tmp_path, system, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "render_card", crash)
    out = tmp_path / "release"
    with pytest.raises(RuntimeError, match="disk full"):
        export_release(str(system), out, log=lambda _: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # over an existing release (--force): the old one stays as it was
    monkeypatch.undo()
    export_release(str(system), out, log=lambda _: None)
    before = files_under(out)
    monkeypatch.setattr(card, "render_card", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_release(str(system), out, force=True, log=lambda _: None)
    assert files_under(out) == before and [p.name for p in tmp_path.iterdir()] == ["release"]


def test_onnx_options(tmp_path, system, monkeypatch):
    with pytest.raises(AbairError, match="--merge: writes merged ONNX graphs: it needs --onnx"):
        export_release(str(system), tmp_path / "a", merge=["noise"], log=lambda _: None)
    monkeypatch.setitem(__import__("sys").modules, "tasks.release.onnx_export", None)
    with pytest.raises(AbairError, match="--onnx: ONNX export is not available here"):
        export_release(str(system), tmp_path / "b", onnx=True, log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    calls = []

    def export_onnx(restorer, out_dir, merge=(), log=print):
        """Stands in for the ONNX helper's exporter: one file and its record."""
        calls.append((restorer.names, out_dir.name, list(merge)))
        out_dir.mkdir()
        (out_dir / "restorer.onnx").write_bytes(b"graph")
        return {"opset": 18, "exporter": "torch.onnx (dynamo)", "torch": "2.x", "onnxruntime": "1.x",
                "graphs": [{"file": "onnx/restorer.onnx", "role": "restorer", "inputs": ["image", "weights"],
                            "outputs": ["restored"], "sha256": file_sha256(out_dir / "restorer.onnx"),
                            "checks": [{"size": [32, 48], "max_abs_diff": 2.5e-06, "bound": 1e-04, "passed": True}]}]}

    monkeypatch.setattr(bundle, "onnx_exporter", lambda: export_onnx)
    with pytest.raises(AbairError, match="--merge: 'rain' is not an adapter of this system \\(noise, haze\\)"):
        export_release(str(system), tmp_path / "c", onnx=True, merge=["rain"], log=lambda _: None)
    assert not (tmp_path / "c").exists()
    config = export_release(str(system), tmp_path / "d", onnx=True, merge=["haze"], log=lambda _: None)
    assert calls == [(list(NAMES), "onnx", ["haze"])]
    assert config["onnx"]["opset"] == 18 and config["files"]["onnx/restorer.onnx"] == file_sha256(tmp_path / "d/onnx/restorer.onnx")
    text = (tmp_path / "d/MODEL_CARD.md").read_text()
    assert "Exported with torch.onnx (dynamo) at opset 18 (torch 2.x); checked with onnxruntime 1.x" in text
    assert "| `onnx/restorer.onnx` | restorer | image, weights | restored |" in text
    assert "| `onnx/restorer.onnx` | 32x48 | 2.50e-06 | 1e-04 | yes |" in text
    Restorer.from_release(tmp_path / "d")   # the graph is hashed and listed like every other file


def test_card_rendering_of_hand_made_facts():
    """The sections from facts alone: an ONNX record with a failed check, failure cases from the
    metrics, nothing else recorded."""
    facts = {"source": {"reference": "somewhere", "kind": "components folder", "registry": None, "facts_from": None},
             "provenance": None, "components": {}, "metrics": metrics(), "record": None}
    config = {"adapters": ["noise", "haze"], "weight_columns": ["noise", "haze", "keep"], "kind": "lora",
              "pw_source": None, "files": {},
              "onnx": {"opset": 17, "exporter": "x", "torch": "t", "onnxruntime": "o",
                       "graphs": [{"file": "onnx/e.onnx", "role": "estimator", "inputs": ["image"], "outputs": ["w"],
                                   "checks": [{"size": [64, 64], "max_abs_diff": 0.003, "bound": 0.001, "passed": False}]}]}}
    text = card.render_card(facts, config)
    assert "| `onnx/e.onnx` | 64x64 | 3.00e-03 | 1e-03 | **no** |" in text
    assert "| `haze` | known | 22.00 | 21.50 | -0.50 dB | 50% (2 of 4) |" in text
    assert "| `noise` | known | 25% (1 of 4) |" in text   # worse images, though not the set's mean
    assert "On 1 of 2 evaluated sets the served output is worse than the input on average" in text
    assert "**0.625** over 8 images" in text and "| accuracy | 0.75 | 0.50 |" in text
    assert "- Hardware and wall time: not recorded" in text and "| Phase III: estimator | not recorded |" in text
    assert "How each set was made: not recorded." in text


# ------------------------------------------------------------------------------------------------
# Registry sources, a project's record, restore


def fake_training_run(client, seconds: float) -> str:
    """A finished `pretrain` run with the backbone's inputs hash, as the pretrain stage tags it."""
    from tasks.core import tracking

    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    run = client.create_run(experiment, start_time=1_700_000_000_000, run_name="pretrain",
                            tags={"abair.stage": "pretrain", "abair.inputs_hash": PRETRAIN_HASH,
                                  "abair.hardware": "Test CPU 9000, 2 logical cores"})
    client.log_param(run.info.run_id, "device", "cpu")
    client.set_terminated(run.info.run_id, "FINISHED", end_time=1_700_000_000_000 + int(seconds * 1000))
    return run.info.run_id


def project(folder: Path, shards: Path, system: Path, project_params: dict) -> Path:
    """A project checkout after `dvc repro`: params.yaml, checkpoints/, reports/."""
    params = copy.deepcopy(project_params)
    params["synthesize"]["out"] = str(shards)
    params["evaluate"]["sets"] = [{"name": "noise", "group": "known", "task": ["noise"], "degradations": [["noise", 0.5]]},
                                  {"name": "haze", "group": "known", "task": ["haze"], "degradations": [["haze", 0.6]]}]
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(system, folder / "checkpoints")
    (folder / "reports/training").mkdir(parents=True)
    (folder / "reports/metrics.json").write_text(json.dumps(metrics()))
    (folder / "reports/training/pretrain.json").write_text(json.dumps(
        {"steps": 7, "val_samples": 6, "val_psnr_input": 17.5, "val_psnr_restored": 18.25}))
    return folder


class FakeEvaluator(gate.Evaluator):
    def suite(self, cfg, shards):
        return "suite-release"


def test_release_from_the_registry_carries_the_stored_facts(store, tmp_path, system, tiny_shards, project_params):
    from tasks.core import tracking
    from tasks.registry import store as registry

    checkout = project(tmp_path / "project", tiny_shards, system, project_params)
    run_id = fake_training_run(tracking.client(), 125)
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    result = register_evaluated(params, str(checkout / "checkpoints"), str(checkout / "reports/metrics.json"),
                                str(tiny_shards), FakeEvaluator(), echo=lambda _: None, save_restorer=save_restorer,
                                training_reports=str(checkout / "reports/training"))
    version = result["restorer"]["version"]
    model = registry.download_components(registry.resolve(f"models:/abair-restorer/{version}"), tmp_path / "download")
    stored = json.loads((model.parent / FACTS_FILE).read_text())
    assert stored["runs"]["backbone"]["run_id"] == run_id and stored["runs"]["backbone"]["wall_s"] == 125.0
    assert stored["evaluation"]["suite"] == "suite-release" and stored["data"]["splits"]["train"]["samples"] > 0

    out = tmp_path / "release"
    config = export_release("models:/abair-restorer@challenger", out, log=lambda _: None)
    assert config["source"]["versions"] == {"abair-restorer": version, "backbone": "abair-backbone/1",
                                            "adapter.haze": "abair-adapter-haze/1", "adapter.noise": "abair-adapter-noise/1",
                                            "estimator": "abair-estimator/1"}
    assert config["source"]["content_hash"] == result["restorer"]["content_hash"]
    released = Restorer.from_release(out)
    ours, _ = released.restore(images(1), mode="sw")
    theirs, _ = load_system_dir(system).restore(images(1), mode="sw")
    assert torch.equal(ours, theirs)

    text = (out / "MODEL_CARD.md").read_text()
    index = json.loads((tiny_shards / "index.json").read_text())
    train = index["splits"]["train"]
    assert f"(abair-restorer version {version}, registry `{registry.registry_uri()}`)" in text
    assert f"| Training split | {train['samples']} crops from {len(train['sources'])} source images |" in text
    noise = index["generator"]["severity"]["noise"]
    assert f"| noise | 0.1 to 0.9 | {noise[0]:g} to {noise[1]:g} | model: gaussian, camera | synthetic:noise |" in text
    assert "| Phase I: backbone | 7 | 8 | 0.004 | size tiny, patch 24, loss l1, seg weight 0.1 | cpu | 2 min 5 s |" in text
    assert "- Hardware: Test CPU 9000, 2 logical cores." in text
    assert "Suite `suite-release`; numbers from the `metric.*` tags of abair-restorer version" in text
    assert "| `haze` | known | haze 0.6 on `val` | haze | 4 |" in text
    assert "| ABAIR (SW) | **24.25/0.700** | 21.50/0.580 | **22.88/0.640** | - |" in text
    assert "| `haze` | known | 22.00 | 21.50 | -0.50 dB | 50% (2 of 4) |" in text
    assert "- Phase I validation (6 crops): PSNR 17.50 dB in, 18.25 dB out (backbone alone)." in text
    assert f"| backbone | `weights/backbone.safetensors` | abair-backbone/1 | `{file_sha256(system / 'backbone.safetensors')}` |" in text
    assert json.loads((out / "facts.json").read_text())["record"] == stored

    # a version registered without release facts (as before them): tags only, the rest not recorded
    register(system, metrics(), params="older", data="d", suite="suite-old", save_restorer=save_restorer)
    export_release("models:/abair-restorer@challenger", tmp_path / "older", log=lambda _: None)
    text = (tmp_path / "older/MODEL_CARD.md").read_text()
    assert "Training data: not recorded" in text and "Hardware and wall time: not recorded" in text
    assert "Suite `suite-old`" in text and "| `haze` | known | 22.00 | 21.50 | -0.50 dB | 50% (2 of 4) |" in text

    # --facts-from: a components folder with the project's record (its checkpoints must be the same files)
    code = main(["export", str(system), "--out", str(tmp_path / "with-record"), "--facts-from", str(checkout)])
    assert code == 0
    text = (tmp_path / "with-record/MODEL_CARD.md").read_text()
    assert f"| Training split | {train['samples']} crops from {len(train['sources'])} source images |" in text
    assert "| `haze` | known | 22.00 | 21.50 | -0.50 dB | 50% (2 of 4) |" in text
    other = tiny_system(tmp_path / "other")
    (other / "estimator.safetensors").write_bytes((checkout / "checkpoints/estimator.safetensors").read_bytes()[:-1] + b" ")
    with pytest.raises(AbairError, match="holds other component files than the exported ones \\(estimator\\)"):
        export_release(str(other), tmp_path / "mismatch", facts_from=checkout, log=lambda _: None)
    with pytest.raises(AbairError, match="--facts-from: reads a project's record for a components folder"):
        export_release("models:/abair-restorer@challenger", tmp_path / "x", facts_from=checkout, log=lambda _: None)


def test_restore_with_a_release_gives_the_same_files_as_with_its_source(tmp_path, system):
    release = tmp_path / "release"
    export_release(str(system), release, log=lambda _: None)
    photo = write_photo(tmp_path / "in" / "photo.png")
    for model, out in ((release, "from-release"), (system, "from-folder")):
        for mode in ("sw", "pw"):
            assert main(["restore", str(photo), "--model", str(model), "--out", str(tmp_path / out / mode),
                         "--device", "cpu", "--mode", mode]) == 0
    for mode in ("sw", "pw"):
        assert (tmp_path / "from-release" / mode / "photo.png").read_bytes() == \
               (tmp_path / "from-folder" / mode / "photo.png").read_bytes()


def test_training_runs_record_the_machine_they_ran_on(store):
    from tasks.core import tracking

    with tracking.start_run("probe") as run:
        pass
    tags = tracking.client().get_run(run.run_id).data.tags
    assert tags[tracking.HARDWARE_TAG] == tracking.hardware()
    assert tags[tracking.HARDWARE_TAG].endswith(f", {os.cpu_count()} logical cores")
