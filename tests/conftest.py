"""Shared fixtures: a real local S3 endpoint (moto's server on a free port), small params, and
sample images. Heavier fixtures (Prefect's test harness, MLflow stores) live next to the tests
that need them."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tests call the installed console scripts (abair, dvc, mlflow, prefect) as subprocesses: find the
# ones beside this interpreter even when the venv was not activated (`.venv/bin/python -m pytest`).
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

# What the CLI sets for Prefect's ephemeral server (flows.cli.PREFECT_DEFAULTS), for flows run in-process.
from flows.cli import PREFECT_DEFAULTS  # noqa: E402

for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist runs one test process per core: one thread each (and in their subprocesses) instead
    # of every process fighting over every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every test logs to a throw-away SQLite store, never to the project's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def synth_cfg(project_params) -> dict:
    """The default synthesize section, shrunk to run in about a second."""
    cfg = copy.deepcopy(project_params["synthesize"])
    cfg.update(crop_size=48, samples_per_image=4, workers=1, shard_maxcount=8, min_size=32)
    return cfg


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback; tests talk to it through boto3 as to AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            patch.setenv(key, value)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket per test; returns (client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """A few real colour photos as uint8 RGB (scikit-image ships them)."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


def write_png(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    assert cv2.imwrite(str(path), pixels)
    return path


@pytest.fixture
def photo_folder(tmp_path, photos) -> Path:
    """A source folder with four photos (one in a subfolder, one JPEG) and nothing bad."""
    folder = tmp_path / "clean"
    write_png(folder / "astronaut.png", photos["astronaut"][:200, :200])
    write_png(folder / "sub" / "chelsea.png", photos["chelsea"][:160, :200])
    write_png(folder / "coffee.png", photos["coffee"][:180, :220])
    import cv2
    cv2.imwrite(str(folder / "rocket.jpg"), cv2.cvtColor(photos["rocket"][:200, :200], cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, project_params, photos) -> Path:
    """A small real shard set (3 photos, 48 px crops) shared by the training tests."""
    from tasks.data.synthesize import synthesize

    root = tmp_path_factory.mktemp("shards")
    for name in ("astronaut", "chelsea", "coffee"):
        write_png(root / "clean" / f"{name}.png", photos[name][:160, :160])
    cfg = copy.deepcopy(project_params["synthesize"])
    cfg.update(crop_size=48, samples_per_image=8, workers=1, shard_maxcount=16, min_size=32, val_fraction=0.34)
    synthesize(cfg, source=str(root / "clean"), out=str(root / "shards"), progress=False)
    return root / "shards"


@pytest.fixture
def train_params(project_params) -> dict:
    """The training sections shrunk to seconds: tiny model, 32 px patches, a handful of steps."""
    params = copy.deepcopy(project_params)
    params["pretrain"].update(patch=32, batch=4, steps=12, warmup_steps=2, checkpoint_every=4, log_every=2,
                              workers=0, shuffle_buffer=16, device="cpu")
    params["adapters"].update(patch=32, batch=4, steps=6, warmup_steps=1, log_every=2, device="cpu", val_samples=4,
                              degradations=["noise", "haze"])
    params["estimator"].update(batch=8, steps=6, warmup_steps=1, sw_steps=2, keep_steps=2, keep_samples=16, log_every=2, device="cpu",
                               crop_size=32, view_size=32, val_samples=4)
    return params


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server per session (per xdist worker), shared by every test that runs flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def make_components(folder: Path, names=("rain", "haze"), seed: int = 0) -> Path:
    """A tiny, untrained but complete system in the checkpoints layout: backbone.safetensors,
    adapters/<name>.safetensors (LoRA with non-zero weights, so each changes the output) and
    estimator.safetensors (class names = `names`)."""
    import torch

    from models.adapters import AdapterBank
    from models.backbone import build_backbone
    from models.identity import save_backbone
    from models.estimator import Estimator, save_estimator

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = build_backbone("tiny")
    save_backbone(backbone, folder / "backbone.safetensors")
    bank = AdapterBank(backbone, kind="lora", rank=4, alpha=4.0)
    for name in names:
        bank.add(name)
        with torch.no_grad():
            for param in bank.parameters_of(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        bank.save(name, folder / "adapters" / f"{name}.safetensors")
    estimator = Estimator(len(names), width=4, crops=1, crop_size=16, view_size=16, class_names=list(names))
    save_estimator(estimator, folder / "estimator.safetensors")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registry of this module's own: a temporary SQLite file, artifacts next to it."""
    from tasks.core import tracking

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        tracking.client().create_experiment(tracking.EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        yield root
