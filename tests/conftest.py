"""Shared fixtures: a real local S3 endpoint (moto's server on a free port), small params, and
sample images. Heavier fixtures (Prefect's test harness, MLflow stores) live next to the tests
that need them."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


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
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
