"""S3 as the storage of every stage, against a real local endpoint (moto's server)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tasks.data import reader

from tasks.core import storage
from tasks.core.errors import AbairError
from tasks.train.pretrain import pretrain
from tasks.data.synthesize import synthesize


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def test_training_reads_shards_straight_from_s3(tmp_path, s3_endpoint, s3_bucket, tiny_shards, train_params, monkeypatch):
    client, bucket = s3_bucket
    upload_folder(client, bucket, tiny_shards, "shards")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri = f"s3://{bucket}/shards"
    assert reader.load_index(uri) == json.loads((tiny_shards / "index.json").read_text())
    remote = pretrain({**train_params["pretrain"], "steps": 6}, shards=uri, out=str(tmp_path / "s3.safetensors"),
                      state_path=str(tmp_path / "s3.pt"), reports=str(tmp_path / "r1"), progress=False)
    local = pretrain({**train_params["pretrain"], "steps": 6}, shards=str(tiny_shards), out=str(tmp_path / "local.safetensors"),
                     state_path=str(tmp_path / "local.pt"), reports=str(tmp_path / "r2"), progress=False)
    # The same bytes arrive through boto3 as from disk, so the same run results.
    assert remote["losses"] == local["losses"]
    assert remote["val_psnr_restored"] == local["val_psnr_restored"]


def corrupt_copy(src: Path, dest: Path) -> Path:
    """The shard set with its first train shard truncated mid-member."""
    dest.mkdir()
    for path in src.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    first = json.loads((src / "index.json").read_text())["splits"]["train"]["shards"][0]
    raw = (src / first).read_bytes()
    (dest / first).write_bytes(raw[: len(raw) // 2 + 100])
    return dest / first


def test_a_corrupt_shard_is_skipped_and_counted_or_a_clear_error(tmp_path, tiny_shards):
    bad = corrupt_copy(tiny_shards, tmp_path / "shards")
    urls = reader.shard_urls(str(tmp_path / "shards"), "train")
    identity = lambda sample, rng: sample["key"]  # noqa: E731

    strict = reader.ShardStream(urls, identity, seed=0, on_error="raise")
    with pytest.raises(AbairError, match=bad.name):
        for _ in zip(strict, range(200)):
            pass
    lenient = reader.ShardStream(urls, identity, seed=0, on_error="skip")
    keys = [key for key, _ in zip(lenient, range(100))]
    assert len(keys) == 100 and lenient.errors >= 1


def test_s3_endpoint_dying_mid_run_leaves_no_partial_objects(tmp_path, photo_folder, synth_cfg, monkeypatch):
    from moto.server import ThreadedMotoServer

    import boto3

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="dying")
    monkeypatch.setenv("ABAIR_S3_MAX_ATTEMPTS", "2")
    storage._client.cache_clear()

    uploads = []
    real_upload = storage.upload_file

    def upload_then_die(local, uri, endpoint_url=None):
        real_upload(local, uri, endpoint_url)
        uploads.append(uri)
        if len(uploads) == 1:
            listing = client.list_objects_v2(Bucket="dying")["Contents"]
            server.stop()
            upload_then_die.listing = listing

    monkeypatch.setattr(storage, "upload_file", upload_then_die)
    cfg = {**synth_cfg, "shard_maxcount": 2, "endpoint_url": endpoint}
    with pytest.raises(AbairError, match=r"s3://dying/out/.*S3 unreachable"):
        synthesize(cfg, source=str(photo_folder), out="s3://dying/out", progress=False)
    # What reached the bucket before the endpoint died is one whole shard and no index: the
    # set is not marked complete, and the object is a readable tar.
    (obj,) = upload_then_die.listing
    assert obj["Key"].endswith(".tar") and not any(o["Key"].endswith("index.json") for o in upload_then_die.listing)
    storage._client.cache_clear()


def test_dvc_push_and_pull_through_an_s3_remote(tmp_path, s3_endpoint, s3_bucket, tiny_shards):
    client, bucket = s3_bucket
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore")
    run("dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint)
    (repo / "data").mkdir()
    import shutil

    shutil.copytree(tiny_shards, repo / "data" / "shards")
    run("dvc", "add", "data/shards")
    run("dvc", "push")
    stored = client.list_objects_v2(Bucket=bucket, Prefix="dvcstore/")["KeyCount"]
    assert stored >= len(list(tiny_shards.iterdir()))

    shutil.rmtree(repo / "data" / "shards")
    shutil.rmtree(repo / ".dvc" / "cache")
    run("dvc", "pull")
    for path in tiny_shards.iterdir():
        assert (repo / "data" / "shards" / path.name).read_bytes() == path.read_bytes()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_server_keeps_registered_models_on_s3(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    import time
    import urllib.request

    from tasks.registry.register import register
    from tasks.serve.pyfunc import save_restorer
    from tests.conftest import make_components

    client, bucket = s3_bucket
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_endpoint)
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        checkpoints = make_components(tmp_path / "checkpoints")
        result = register(checkpoints, {"summary/all/sw/psnr": 21.5}, params="p0", data="d0", suite="s0",
                          commit="c0", save_restorer=save_restorer)
        assert result["restorer"]["created"]
        # The artifacts went through the server into the bucket, not onto this machine.
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="mlartifacts/")
                for o in page.get("Contents", [])]
        assert any(k.endswith("backbone.safetensors") for k in keys)
        assert sum(k.endswith(".safetensors") for k in keys) >= 4  # backbone, 2 adapters, estimator (+ bundled copies)

        # A fresh process loads the champion-to-be by alias from the server and restores.
        probe = ("import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/abair-restorer@challenger'); "
                 "out = m.predict(np.full((20, 24, 3), 128, np.uint8)); print(out.shape, out.dtype)")
        loaded = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MLFLOW_TRACKING_URI": url},
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert loaded.stdout.strip().endswith("(20, 24, 3) uint8")
    finally:
        server.terminate()
        server.wait(timeout=30)
