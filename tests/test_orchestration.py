"""Prefect orchestration: concurrent adapter jobs that survive a dying worker, the Dask runner,
and the deployments of prefect.yaml."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from flows import jobs
from tasks.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stage_inputs(tmp_path, tiny_shards, train_params) -> dict:
    """A params file and a (barely) trained backbone: what the adapters stage reads."""
    backbone = tmp_path / "checkpoints" / "backbone.safetensors"
    pretrain({**train_params["pretrain"], "steps": 2}, shards=str(tiny_shards), out=str(backbone),
             state_path=str(tmp_path / "state.pt"), reports=str(tmp_path / "reports"), progress=False)
    params = tmp_path / "params.yaml"
    adapters = {**train_params["adapters"], "steps": 2, "parallel": 2}
    params.write_text(yaml.safe_dump({"adapters": adapters}))
    return {"params": params, "backbone": backbone, "shards": tiny_shards, "out": tmp_path / "checkpoints" / "adapters",
            "reports": tmp_path / "reports" / "adapters"}


def run_adapters(inputs: dict, overrides=()) -> list[dict]:
    from flows.adapters import run_adapters_flow

    return run_adapters_flow(str(inputs["params"]), list(overrides), backbone=str(inputs["backbone"]),
                             shards=str(inputs["shards"]), out_dir=str(inputs["out"]), reports=str(inputs["reports"]))


def test_a_worker_killed_mid_job_is_retried(prefect_harness, stage_inputs, monkeypatch):
    real_run = subprocess.run
    launched: list[str] = []

    def run_or_die(cmd, *args, **kwargs):
        name = cmd[cmd.index("adapter") + 1]
        launched.append(name)
        if name == "haze" and launched.count("haze") == 1:
            # As if the OOM killer took the worker process: SIGKILL's exit status.
            return subprocess.CompletedProcess(cmd, -9)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(jobs.subprocess, "run", run_or_die)
    results = run_adapters(stage_inputs)
    assert sorted(launched) == ["haze", "haze", "noise"]
    assert sorted(r["name"] for r in results) == ["haze", "noise"]
    assert sorted(p.name for p in stage_inputs["out"].iterdir()) == ["haze.safetensors", "noise.safetensors"]


def test_bad_input_is_not_retried(prefect_harness, stage_inputs, monkeypatch):
    calls = []
    real_run = subprocess.run

    def count(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(jobs.subprocess, "run", count)
    with pytest.raises(Exception, match="status 2"):
        run_adapters(stage_inputs, overrides=["degradations=[fog]"])
    assert len(calls) == 1


def test_adapter_jobs_on_a_dask_cluster(prefect_harness, stage_inputs):
    pytest.importorskip("prefect_dask")
    results = run_adapters(stage_inputs, overrides=["runner=dask"])
    assert sorted(r["name"] for r in results) == ["haze", "noise"]
    # Up to date the second time: nothing retrained.
    again = run_adapters(stage_inputs, overrides=["runner=dask"])
    assert all(r["skipped"] for r in again)


def test_prefect_yaml_deploys_promote_and_retrain(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    subprocess.run(["prefect", "work-pool", "create", "abair-process", "--type", "process"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    deployed = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    import asyncio

    async def deployments():
        async with get_client() as client:
            return {(await client.read_flow(d.flow_id)).name + "/" + d.name: d for d in await client.read_deployments()}

    found = asyncio.run(deployments())
    assert {"abair-promote/promote", "abair-retrain/retrain"} <= set(found)
    retrain = found["abair-retrain/retrain"]
    assert retrain.work_pool_name == "abair-process"
    assert [s.schedule.cron for s in retrain.schedules] == ["0 3 * * 1"]


def test_synthesize_flow_writes_shards_and_a_summary_artifact(prefect_harness, tmp_path, photo_folder, synth_cfg):
    import asyncio
    import json

    from prefect.client.orchestration import get_client

    from flows.pipeline import synthesize_flow

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synthesize": synth_cfg}))
    index = synthesize_flow(str(params), source=str(photo_folder), out=str(tmp_path / "shards"))
    assert index["counts"]["samples"] == 4 * synth_cfg["samples_per_image"]
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    latest = {a.key: a for a in asyncio.run(artifact())}
    assert f"{index['counts']['samples']} samples from 4 images" in latest["abair-shards"].data
