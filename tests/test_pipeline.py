"""The DVC pipeline as users run it: the stage graph, and `dvc repro` end to end on a copy of
the project with the minimal profile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_EDGES = {
    ("synthesize", "pretrain"), ("synthesize", "adapters"), ("pretrain", "adapters"),
    ("synthesize", "estimator"), ("pretrain", "estimator"), ("adapters", "estimator"),
}


def dag_edges(cwd: Path) -> set[tuple[str, str]]:
    dot = subprocess.run(["dvc", "dag", "--dot"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    return {(a, b) for a, b in re.findall(r'"(\w+)"\s*->\s*"(\w+)"', dot)}


def test_stage_graph_has_the_expected_edges():
    edges = dag_edges(ROOT)
    assert EXPECTED_EDGES <= edges
    stages = {s for edge in edges for s in edge}
    assert {"synthesize", "pretrain", "adapters", "estimator"} <= stages


def project_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def changed_stages(cwd: Path) -> set[str]:
    out = subprocess.run(["dvc", "status", "--json"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    # `manifest` always runs (it is how new source images are noticed), so it is always listed.
    return set(json.loads(out or "{}")) - {"manifest"}


@pytest.mark.slow
def test_retrain_flow_runs_the_pipeline_then_finds_nothing_new(tmp_path, prefect_harness, monkeypatch):
    """The scheduled retraining on a copy of the project with the minimal profile: the first run
    is a full `dvc repro` ending with a champion, the second ends early; then changing only an
    adapter's params re-runs only `adapters` and what follows."""
    from flows.retrain import retrain_flow

    project = project_copy(tmp_path / "project")
    subprocess.run(["abair", "profile", "apply", "minimal"], cwd=project, check=True, capture_output=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own store, as for users
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))

    first = retrain_flow(project_dir=str(project), push=False)
    assert first["status"] == "retrained"
    index = json.loads((project / "data/shards/index.json").read_text())
    assert index["counts"]["samples"] > 0
    assert sorted(p.name for p in (project / "checkpoints/adapters").iterdir()) == ["haze.safetensors", "noise.safetensors"]
    assert (project / "checkpoints/estimator.safetensors").exists()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert "known/noise/sw/psnr" in metrics and "summary/all/sw/psnr" in metrics
    assert (project / "reports/results.md").exists() and (project / "reports/plots/radar.png").exists()
    registry = json.loads((project / "reports/registry.json").read_text())
    assert registry["aliases"]["champion"] == registry["aliases"]["challenger"]
    assert (project / "mlflow.db").exists(), "MLflow must default to a SQLite store inside the project"
    assert changed_stages(project) == set(), "dvc.lock must describe what was just built"

    second = retrain_flow(project_dir=str(project), push=False)
    assert second["status"] == "up-to-date" and second["manifest"] == first["manifest"]

    # Changing only an adapter's params re-runs only `adapters` and what follows.
    (project / "longer.yaml").write_text("adapters:\n  steps: 5\n")
    subprocess.run(["abair", "profile", "apply", "longer.yaml"], cwd=project, check=True, capture_output=True)
    assert changed_stages(project) == {"adapters"}
    rerun = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-5000:]
    ran = set(re.findall(r"Running stage '(\w+)'", rerun.stdout))
    assert {"adapters", "estimator"} <= ran
    assert not {"synthesize", "pretrain"} & ran


def test_params_read_exponent_floats_as_dvc_does(tmp_path):
    """PyYAML (YAML 1.1) reads `8e-3` as a string; DVC and ruamel (YAML 1.2) read a number."""
    from tasks.core.params import load_params

    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  lr: 8e-3\n  min_lr: 1.0e-5\n  steps: 100\n  loss: l1\n  betas: [0.9, 1e-3]\n")
    cfg = load_params(params, "pretrain", ["warmup_steps=10", "weight_decay=1e-4", "name=1e5x"])
    assert cfg == {"lr": 0.008, "min_lr": 1e-5, "steps": 100, "loss": "l1", "betas": [0.9, 0.001],
                   "warmup_steps": 10, "weight_decay": 0.0001, "name": "1e5x"}
    assert isinstance(cfg["steps"], int) and isinstance(cfg["warmup_steps"], int)
