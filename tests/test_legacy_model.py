"""A restorer saved by the pre-restructure code (commit bf9d132: a flat `tasks` package, the
model class pickled as `tasks.pyfunc.RestorerModel`) still serves: it loads and predicts as it
did, and once registered `abair restore models:/abair-restorer/N` restores with it exactly as
the current code does from the same component files."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core import tracking
from tasks.registry.store import RESTORER
from tasks.serve import restore

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_restorer_bf9d132.tar.gz"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """The fixture extracted: pyfunc/ (the model folder), input.npy, expected.npy."""
    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    return root


def fresh_env() -> dict[str, str]:
    """This environment without PYTHONPATH: a subprocess finds only installed and bundled code."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def register_folder(model_dir: Path, artifacts: Path) -> str:
    """Register a pyfunc model folder as a new abair-restorer version in the session's store, the
    way the registry does: the folder logged as a run's artifacts (under `artifacts`), the version
    pointing at them. Returns the version."""
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    experiment = client.create_experiment("legacy-restorer", artifact_location=artifacts.as_uri())
    run = client.create_run(experiment, run_name="legacy restorer")
    client.log_artifacts(run.info.run_id, str(model_dir), "restorer")
    try:
        client.create_registered_model(RESTORER)
    except MlflowException:  # an earlier test of the session registered one
        pass
    version = client.create_model_version(RESTORER, f"{run.info.artifact_uri.rstrip('/')}/restorer",
                                          run_id=run.info.run_id)
    client.set_terminated(run.info.run_id)
    return str(version.version)


def test_legacy_model_loads_and_predicts_as_it_did(legacy, tmp_path):
    script = f"""
import mlflow.pyfunc, numpy as np, sys
model = mlflow.pyfunc.load_model({str(legacy / 'pyfunc')!r})
np.save({str(tmp_path / 'out.npy')!r}, model.predict(np.load({str(legacy / 'input.npy')!r})))
print("loaded from", sys.modules["tasks.pyfunc"].__file__)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=fresh_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{legacy / 'pyfunc' / 'code' / 'tasks' / 'pyfunc.py'}" in result.stdout  # its own bundled code
    got, expected = np.load(tmp_path / "out.npy"), np.load(legacy / "expected.npy")
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_registered_legacy_model_restores_like_the_current_code(legacy, tmp_path):
    version = register_folder(legacy / "pyfunc", tmp_path / "artifacts")
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), cv2.cvtColor(np.load(legacy / "input.npy"), cv2.COLOR_RGB2BGR))

    command = ["abair", "restore", str(image), "--model", f"models:/{RESTORER}/{version}", "--out",
               str(tmp_path / "registered"), "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"models:/{RESTORER}/{version} ({RESTORER} version {version})" in result.stdout

    restore.restore_files([str(image)], model=str(legacy / "pyfunc" / "artifacts"), out=tmp_path / "current",
                          device="cpu", progress=False, echo=lambda _: None)
    registered = cv2.imread(str(tmp_path / "registered" / "photo.png"), cv2.IMREAD_UNCHANGED)
    current = cv2.imread(str(tmp_path / "current" / "photo.png"), cv2.IMREAD_UNCHANGED)
    assert registered.shape == current.shape and np.array_equal(registered, current)
    # and the current code computes what the pre-restructure code did
    assert np.array_equal(cv2.cvtColor(current, cv2.COLOR_BGR2RGB), np.load(legacy / "expected.npy"))
    assert not np.array_equal(registered, cv2.imread(str(image), cv2.IMREAD_UNCHANGED))  # it restored something
