"""The MLflow registry: versions and their tags, idempotent registration, the promotion gate and
its alias moves, rollback, the pyfunc in a fresh process, clear errors, and adding a degradation
(one new adapter, the estimator grown by one output, every other file byte-identical)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.registry import gate
from tasks.registry import store as registry
from tasks.registry.register import register, register_stage
from tasks.serve.pyfunc import save_restorer
import flows.registry  # noqa: F401  prefect's log handler binds to the stderr of its import: the session's, not a test's
from flows.cli import main
from tasks.core.errors import AbairError
from tasks.core.components import file_sha256
from tests.conftest import make_components

ROOT = Path(__file__).resolve().parents[1]
GATE = {"mode": "sw", "metric": "psnr", "avg_tolerance_db": 0.0, "task_tolerance_db": 0.2, "floor_psnr_db": 15.0,
        "min_gain_db": 0.0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return make_components(tmp_path_factory.mktemp("system") / "checkpoints")


def metrics(average: float = 26.0, rain: float = 27.0, haze: float = 25.0, inputs: float = 22.0) -> dict:
    """A metrics dict shaped like tasks.evaluate's (two known sets, summaries, counts)."""
    return {"known/rain/input/psnr": inputs, "known/rain/sw/psnr": rain, "known/rain/adapter_rain/psnr": rain + 0.1,
            "known/haze/input/psnr": inputs, "known/haze/sw/psnr": haze, "known/haze/sw/ssim": 0.8,
            "sets/known/rain/images": 4, "summary/known/sw/psnr": average, "summary/all/sw/psnr": average,
            "summary/all/input/psnr": inputs, "estimator/accuracy": 0.75, "params/total": 123456}


def versions(name: str) -> list[str]:
    client = registry.registry_client()
    return [str(n) for n in sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))]


class FakeEvaluator(gate.Evaluator):
    """The current suite is `suite`; evaluating any folder returns `result` (and records it)."""

    def __init__(self, suite: str, result: dict | None = None):
        self.current, self.result, self.calls = suite, result or {}, []

    def suite(self, cfg, shards):
        return self.current

    def evaluate(self, cfg, checkpoints, shards):
        self.calls.append(sorted(p.name for p in Path(checkpoints).iterdir()))
        return self.result


def test_round_trip_tags_aliases_and_idempotence(store, checkpoints):
    result = register(checkpoints, metrics(), params="params-a", data="data-1", suite="suite-1", commit="abc123",
                      save_restorer=save_restorer)
    assert result["restorer"]["created"] and result["restorer"]["version"] == "1"
    assert set(result["components"]) == {"backbone", "adapter.haze", "adapter.rain", "estimator"}
    client = registry.registry_client()

    restorer = registry.resolve("models:/abair-restorer@challenger")
    tags = restorer.tags
    assert tags["abair.git_commit"] == "abc123" and tags["abair.params_hash"] == "params-a"
    assert tags["abair.data_fingerprint"] == "data-1" and tags["abair.suite"] == "suite-1"
    assert registry.metrics_of(restorer) == {k: float(v) for k, v in metrics().items()}
    refs = registry.component_refs(restorer)
    assert refs == {"backbone": ("abair-backbone", "1"), "adapter.haze": ("abair-adapter-haze", "1"),
                    "adapter.rain": ("abair-adapter-rain", "1"), "estimator": ("abair-estimator", "1")}
    files = {"backbone": checkpoints / "backbone.safetensors", "adapter.rain": checkpoints / "adapters/rain.safetensors",
             "adapter.haze": checkpoints / "adapters/haze.safetensors", "estimator": checkpoints / "estimator.safetensors"}
    for label, (name, number) in refs.items():
        component = client.get_model_version(name, number)
        assert component.tags["abair.sha256"] == file_sha256(files[label])
        assert component.tags["abair.git_commit"] == "abc123" and component.tags["metric.summary/all/sw/psnr"] == "26.0"
        assert str(client.get_model_version_by_alias(name, "challenger").version) == number
    rain = client.get_model_version("abair-adapter-rain", "1").tags
    assert "metric.known/rain/adapter_rain/psnr" in rain and "metric.known/haze/sw/psnr" not in rain

    # the bundled files are the very files registered
    downloaded = registry.download_components(restorer, store / "download")
    for label, path in files.items():
        assert file_sha256(downloaded / path.relative_to(checkpoints)) == file_sha256(path), label

    # the same inputs again: nothing new
    again = register(checkpoints, metrics(), params="params-a", data="data-1", suite="suite-1", save_restorer=save_restorer)
    assert not again["restorer"]["created"] and again["restorer"]["version"] == "1"
    assert not any(c["created"] for c in again["components"].values())
    assert versions("abair-restorer") == ["1"] and versions("abair-backbone") == ["1"]

    # other params, same files: a new restorer version on the same component versions
    other = register(checkpoints, metrics(), params="params-b", data="data-1", suite="suite-1", save_restorer=save_restorer)
    assert other["restorer"]["created"] and other["restorer"]["version"] == "2"
    assert not any(c["created"] for c in other["components"].values())
    assert versions("abair-backbone") == ["1"] and registry.aliases()["challenger"] == "2"


def test_pyfunc_loads_in_a_fresh_process_and_predicts(store, checkpoints, tmp_path):
    from tasks.serve.inference import restore_rgb
    from tasks.core.components import load_system_dir

    register(checkpoints, metrics(), params="params-a", data="data-1", suite="suite-1", save_restorer=save_restorer)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (19, 27, 3), dtype=np.uint8), rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)]
    np.save(tmp_path / "a.npy", images[0])
    np.save(tmp_path / "b.npy", images[1])
    yy, xx = np.mgrid[0:100, 0:140] / 140.0
    large = np.stack([xx, yy, 0.5 + 0.4 * np.sin(9 * xx * yy)], axis=2) + rng.normal(0, 0.05, (100, 140, 3))
    large = (np.clip(large, 0, 1) * 255).astype(np.uint8)
    np.save(tmp_path / "c.npy", large)
    script = f"""
import mlflow.pyfunc, numpy as np, sys
model = mlflow.pyfunc.load_model("models:/abair-restorer/1")
spec = model.metadata.signature.inputs.inputs[0]
assert spec.shape == (-1, -1, 3) and str(spec.type) == "uint8", spec
a, b = np.load("{tmp_path / 'a.npy'}"), np.load("{tmp_path / 'b.npy'}")
out = model.predict(a)
outs = model.unwrap_python_model().predict(None, [a, b])
oh = model.predict(a, params={{"mode": "oh"}})
np.save("{tmp_path / 'out.npy'}", out); np.save("{tmp_path / 'out_b.npy'}", outs[1]); np.save("{tmp_path / 'oh.npy'}", oh)
local = mlflow.pyfunc.load_model("models:/abair-restorer/1", model_config={{"max_pixels": 72 * 72, "tiling": "local"}})
np.save("{tmp_path / 'local.npy'}", local.predict(np.load("{tmp_path / 'c.npy'}")))
print("loaded from", sys.modules["tasks.serve.pyfunc"].__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=store, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/restorer/code/tasks/serve/pyfunc.py" in result.stdout  # the bundled code, not this checkout
    restorer = load_system_dir(checkpoints)
    for name, image in (("out", images[0]), ("out_b", images[1])):
        got = np.load(tmp_path / f"{name}.npy")
        expected, _ = restore_rgb(restorer, image.astype(np.float32) / 255)
        assert got.dtype == np.uint8 and got.shape == image.shape
        assert np.abs(got.astype(int) - np.round(expected * 255)).max() <= 1
        assert np.abs(got.astype(int) - image.astype(int)).mean() > 1  # it restored something
    assert np.load(tmp_path / "oh.npy").shape == images[0].shape

    # load-time config: a pixel budget and independent (local) tiles reach Restorer.restore
    got = np.load(tmp_path / "local.npy").astype(int)
    local, _ = restore_rgb(restorer, large.astype(np.float32) / 255, max_pixels=72 * 72, tiling="local")
    whole, _ = restore_rgb(restorer, large.astype(np.float32) / 255, max_pixels=None)
    assert np.abs(got - np.round(local * 255)).max() <= 1
    assert np.abs(got - np.round(whole * 255)).max() > 1


def tasks_imports(path: Path) -> set[str]:
    """Files of the `tasks` modules a file imports (function-local imports too), with the package
    __init__ files above them."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    files = set()
    for name in (n for n in names if n.split(".")[0] == "tasks"):
        parts = name.split(".")
        files |= {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts) + 1)}
        files.add("/".join(parts) + ".py")
    return {f for f in files if (ROOT / f).is_file()}


def test_pyfunc_bundles_models_and_only_the_serving_code(checkpoints, tmp_path):
    from tasks.serve.pyfunc import SERVING_CODE

    code = save_restorer(checkpoints, tmp_path / "restorer") / "code"
    bundled = {p.relative_to(code).as_posix() for p in (code / "tasks").rglob("*.py")}
    assert bundled == set(SERVING_CODE)
    assert not [p for p in bundled if p.split("/")[1] in ("data", "train", "evaluate", "registry")]
    assert {p.relative_to(code).as_posix() for p in (code / "models").rglob("*.py")} == \
           {p.relative_to(ROOT).as_posix() for p in (ROOT / "models").rglob("*.py")}

    # what the model class imports, and what those import in turn, is all there
    needed, todo = set(), ["tasks/serve/pyfunc.py"]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(tasks_imports(ROOT / current))
    assert needed | {"tasks/__init__.py"} == bundled



def fresh_versions(checkpoints, *entries) -> list[str]:
    """Register one restorer version per (tag, metrics) on the same files (params tell them apart)."""
    return [register(checkpoints, m, params=f"gate-{tag}", data="d", suite=suite,
                     save_restorer=save_restorer)["restorer"]["version"]
            for tag, m, suite in entries]


def clear_aliases() -> None:
    client = registry.registry_client()
    for name in ("abair-restorer", "abair-backbone", "abair-adapter-rain", "abair-adapter-haze", "abair-estimator"):
        for alias in ("champion", "previous"):
            try:
                client.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 - not set
                pass


def test_gate_first_champion_then_pass_fail_and_rollback(store, checkpoints):
    clear_aliases()
    client = registry.registry_client()
    lines: list[str] = []
    echo = lines.append

    # no champion: the absolute floor decides
    (weak,) = fresh_versions(checkpoints, ("weak", metrics(average=21.5, inputs=22.0), "s"))
    verdict = gate.promote(GATE, echo=echo)
    assert not verdict["passed"] and not verdict["moved"] and verdict["champion"] is None
    assert "gain over input -0.50 dB below the floor 0.00 dB" in verdict["reason"]
    assert client.get_model_version("abair-restorer", weak).tags["abair.gate"] == "failed"
    assert "champion" not in registry.aliases()

    (first,) = fresh_versions(checkpoints, ("first", metrics(average=26.0), "s"))
    verdict = gate.promote(GATE, echo=echo)
    assert verdict["passed"] and verdict["against"] == "floor" and registry.aliases()["champion"] == first
    assert "previous" not in registry.aliases()
    assert str(client.get_model_version_by_alias("abair-backbone", "champion").version) == "1"

    # better on average, one task 0.15 dB worse (inside the tolerance): passes
    (better,) = fresh_versions(checkpoints, ("better", metrics(average=26.5, rain=28.0, haze=24.85), "s"))
    verdict = gate.promote(GATE, echo=echo)
    assert verdict["passed"] and verdict["moved"]
    assert registry.aliases() == {"challenger": better, "champion": better, "previous": first}
    assert client.get_model_version("abair-restorer", better).tags["abair.gate_against"] == f"champion version {first}"

    # better on average but one task 0.3 dB worse: fails, nothing moves, the reason is a tag
    (worse,) = fresh_versions(checkpoints, ("worse", metrics(average=27.0, rain=29.0, haze=24.55), "s"))
    lines.clear()
    verdict = gate.promote(GATE, echo=echo)
    assert not verdict["passed"] and not verdict["moved"]
    assert registry.aliases() == {"challenger": worse, "champion": better, "previous": first}
    reason = client.get_model_version("abair-restorer", worse).tags["abair.gate_reason"]
    assert reason == "known/haze psnr -0.30 dB (worse than the 0.20 dB tolerance)"
    assert "FAIL" in "\n".join(lines)

    # a lower average fails even with every task inside the tolerance
    (lower,) = fresh_versions(checkpoints, ("lower", metrics(average=26.4, rain=27.9, haze=24.8), "s"))
    verdict = gate.promote(GATE, echo=echo)
    assert not verdict["passed"] and verdict["reason"] == "average psnr -0.10 dB (26.40 vs 26.50)"

    # dry run: a table, no change, no tag
    (dry,) = fresh_versions(checkpoints, ("dry", metrics(average=30.0, rain=30.0, haze=30.0), "s"))
    lines.clear()
    verdict = gate.promote(GATE, dry_run=True, echo=echo)
    out = "\n".join(lines)
    assert verdict["passed"] and not verdict["moved"] and "dry run" in out
    assert f"champion v{better}" in out and f"challenger v{dry}" in out and "known/rain" in out and "average" in out
    assert registry.aliases()["champion"] == better
    assert "abair.gate" not in client.get_model_version("abair-restorer", dry).tags

    # rollback: champion back to previous, previous cleared; a second rollback has nowhere to go
    result = gate.rollback(echo=echo)
    assert result == {"champion": first, "replaced": better}
    assert registry.aliases() == {"challenger": dry, "champion": first}
    assert "abair.rolled_back" in client.get_model_version("abair-restorer", better).tags
    with pytest.raises(AbairError, match="no previous champion to roll back to"):
        gate.rollback(echo=echo)


def test_gate_reevaluates_when_the_suites_differ(store, checkpoints):
    clear_aliases()
    old, new = fresh_versions(checkpoints, ("suite-old", metrics(average=26.0), "suite-1"),
                              ("suite-new", metrics(average=25.0, rain=26.0, haze=24.0), "suite-2"))
    registry.registry_client().set_registered_model_alias("abair-restorer", "champion", old)
    # on the current suite (suite-2) the champion scores lower than its suite-1 tags said
    evaluator = FakeEvaluator("suite-2", metrics(average=24.0, rain=25.5, haze=24.0))
    verdict = gate.promote(GATE, evaluator=evaluator, echo=lambda _: None)
    assert evaluator.calls == [["adapters", "backbone.safetensors", "estimator.safetensors"]]  # the champion only
    assert verdict["reevaluated"] == {"champion": "suite-2"}
    assert verdict["passed"] and registry.aliases()["champion"] == new


def test_unknown_registry_model_or_alias_is_a_clear_error(store, tmp_path, monkeypatch, capsys):
    with pytest.raises(AbairError, match=r"models:/abair-restorer@nope: no such model version or alias \(registry sqlite"):
        registry.resolve("models:/abair-restorer@nope")
    with pytest.raises(AbairError, match=r"models:/abair-nothing/3: no such model version or alias"):
        registry.resolve("models:/abair-nothing/3")
    with pytest.raises(AbairError, match="malformed registry reference"):
        registry.resolve("models:/abair-restorer")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(AbairError, match=r"registry folder .*missing does not exist"):
        registry.resolve("models:/abair-restorer@champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(AbairError, match="no MLflow registry here"):
        registry.resolve("models:/abair-restorer@champion")
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates an empty store

    (tmp_path / "a.png").write_bytes(b"")
    code = main(["restore", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: sqlite:///{tmp_path / 'mlflow.db'}: no MLflow registry here (run `dvc repro` or " \
                  "`abair register` in the project, or set MLFLOW_TRACKING_URI)"


def project_params(tmp_path: Path, **register) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"] = {**params["register"], **register}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_register_stage_registers_promotes_and_reports(store, tmp_path, tiny_shards):
    clear_aliases()
    folder = make_components(tmp_path / "checkpoints", seed=7)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics(average=30.0, rain=31.0, haze=30.0)))
    evaluator = FakeEvaluator("suite-stage")
    report = tmp_path / "registry.json"
    result = register_stage(str(project_params(tmp_path)), [], str(folder), str(tmp_path / "metrics.json"),
                            str(tiny_shards), str(report), evaluator=evaluator, echo=lambda _: None,
                            save_restorer=save_restorer)
    written = json.loads(report.read_text())
    assert written["restorer"]["version"] == result["restorer"]["version"] and written["restorer"]["created"]
    assert written["gate"]["passed"] and written["aliases"]["champion"] == result["restorer"]["version"]
    assert written["components"]["backbone"]["sha256"] == file_sha256(folder / "backbone.safetensors")
    tags = registry.resolve(f"models:/abair-restorer/{result['restorer']['version']}").tags
    assert tags["abair.suite"] == "suite-stage" and len(tags["abair.data_fingerprint"]) == 16
    assert tags["abair.git_commit"] != "unknown"

    # again with nothing changed: no new version, the champion stays
    count = len(versions("abair-restorer"))
    again = register_stage(str(project_params(tmp_path)), [], str(folder), str(tmp_path / "metrics.json"),
                           str(tiny_shards), str(report), evaluator=evaluator, echo=lambda _: None,
                           save_restorer=save_restorer)
    assert not again["restorer"]["created"] and len(versions("abair-restorer")) == count
    assert again["gate"]["reason"] == "already champion"


def test_promote_flow_and_deployment(store, tmp_path, prefect_harness):
    """The flow runs its Prefect task; a dry run moves nothing."""
    from flows.registry import promote_flow

    (deployment,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "promote"]
    path, name = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file() and name == "promote_flow" and deployment["work_pool"]["name"] == "abair-process"
    assert set(deployment["parameters"]) <= set(promote_flow.parameters.properties)

    clear_aliases()  # no champion: the floor decides, without re-evaluating anything
    fresh_versions(make_components(tmp_path / "checkpoints", seed=11), ("flow", metrics(average=28.0), "s"))
    before = registry.aliases()
    result = promote_flow(params_path=str(project_params(tmp_path)), dry_run=True)
    assert result["dry_run"] and not result["moved"] and registry.aliases() == before
    assert result["challenger"] == before["challenger"] and result["passed"] and result["against"] == "floor"


def test_add_degradation_grows_the_estimator_and_leaves_everything_else_byte_identical(store, tmp_path, tiny_shards,
                                                                                      train_params):
    """The paper's Ours* flow end to end on a tiny system, with the real evaluation."""
    from models.estimator import load_estimator
    from tasks.registry.add_degradation import add_degradation

    base = make_components(tmp_path / "base", seed=3)
    base_hashes = {p.relative_to(base).as_posix(): file_sha256(p) for p in base.rglob("*.safetensors")}
    params = copy.deepcopy(train_params)
    params["estimator"].update(steps=4, sw_steps=1)
    params["evaluate"].update(cache=str(tmp_path / "eval"), modes=["input", "sw"], device="cpu", strips=0,
                              defaults={**params["evaluate"]["defaults"], "count": 1, "crop": 32},
                              sets=[{"name": "rain", "group": "known", "task": ["rain"], "degradations": [["rain", 0.6]]},
                                    {"name": "noise", "group": "unseen", "task": ["noise"], "degradations": [["noise", 0.5]]}])
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))

    base_registered = register(base, metrics(), params="add-base", data="d", suite="s",
                               save_restorer=save_restorer)["components"]
    out = tmp_path / "with-noise"
    result = add_degradation("noise", str(params_path), base=str(base), out=str(out), shards=str(tiny_shards),
                             reports=str(tmp_path / "reports"), progress=False, echo=lambda _: None,
                             save_restorer=save_restorer)

    # the base is untouched, and its backbone and adapters are copied byte for byte
    assert {p.relative_to(base).as_posix(): file_sha256(p) for p in base.rglob("*.safetensors")} == base_hashes
    for rel in ("backbone.safetensors", "adapters/rain.safetensors", "adapters/haze.safetensors"):
        assert file_sha256(out / rel) == base_hashes[rel], rel
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["haze.safetensors", "noise.safetensors", "rain.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "backbone.safetensors", "estimator.safetensors"]
    old, new = load_estimator(base / "estimator.safetensors"), load_estimator(out / "estimator.safetensors")
    assert new.num_outputs == old.num_outputs + 1 and new.class_names == ["rain", "haze", "noise"]
    assert result["outputs"] == 3 and result["unchanged"] == ["adapters/haze.safetensors", "adapters/rain.safetensors",
                                                               "backbone.safetensors"]

    # evaluated on the new task and the old one, with the real evaluation
    assert {"known/rain/sw/psnr", "unseen/noise/sw/psnr", "unseen/noise/input/psnr", "summary/all/sw/psnr"} <= set(result["metrics"])

    # registered: new versions for the new adapter and the estimator only
    components = result["registered"]["components"]
    assert {label for label, c in components.items() if c["created"]} == {"adapter.noise", "estimator"}
    for label in ("backbone", "adapter.rain", "adapter.haze"):
        assert components[label]["version"] == base_registered[label]["version"], label
    restorer = registry.resolve(f"models:/abair-restorer/{result['registered']['restorer']['version']}")
    assert restorer.tags["abair.adapters"] == "haze,noise,rain" and restorer.tags["abair.suite"]
    assert registry.aliases()["challenger"] == str(restorer.version)
    assert json.loads((tmp_path / "reports" / "add_degradation.json").read_text())["name"] == "noise"

    with pytest.raises(AbairError, match="already has a 'noise' adapter"):
        add_degradation("noise", str(params_path), base=str(out), out=str(tmp_path / "again"), shards=str(tiny_shards),
                        reports=str(tmp_path / "reports"), progress=False, echo=lambda _: None,
                        save_restorer=save_restorer)
    with pytest.raises(AbairError, match="unknown degradation"):
        add_degradation("scratches", str(params_path), base=str(base), shards=str(tiny_shards), echo=lambda _: None,
                        save_restorer=save_restorer)


def test_add_degradation_with_a_hostile_pair_is_one_error_naming_it_and_publishes_nothing(store, tmp_path, tiny_shards,
                                                                                         train_params):
    """--data goes through the one decoding boundary: a truncated PNG among the pairs is one error
    naming it; nothing appears under --out and the base is untouched."""
    import cv2

    from tasks.registry.add_degradation import add_degradation

    base = make_components(tmp_path / "base", seed=3)
    base_hashes = {p.relative_to(base).as_posix(): file_sha256(p) for p in base.rglob("*.safetensors")}
    pairs = tmp_path / "pairs"
    good = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))[1].tobytes()
    for side in ("input", "target"):
        (pairs / side).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            (pairs / side / name).write_bytes(good)
    (pairs / "input" / "b.png").write_bytes(good[: len(good) // 2])   # truncated
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(copy.deepcopy(train_params)))
    out = tmp_path / "with-noise"
    with pytest.raises(AbairError) as caught:
        add_degradation("noise", str(params_path), data=str(pairs), base=str(base), out=str(out), shards=str(tiny_shards),
                        reports=str(tmp_path / "reports"), register=False, progress=False, echo=lambda _: None,
                        save_restorer=save_restorer)
    assert str(caught.value).startswith(f"{pairs / 'input' / 'b.png'}: ")
    assert not out.exists()
    assert {p.relative_to(base).as_posix(): file_sha256(p) for p in base.rglob("*.safetensors")} == base_hashes
