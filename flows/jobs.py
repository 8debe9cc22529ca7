"""The adapter job: one Phase II adapter trained by `abair adapter` in a process of its own. The
other Prefect tasks live beside the flow that composes them (flows/training.py, flows/pipeline.py,
flows/evaluate.py, flows/registry.py, flows/add_degradation.py); the work itself is the plain
function in tasks/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.retry import JobFailed, retry_unless_bad_input

@task(name="adapter", task_run_name="adapter-{name}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def adapter_job(name: str, cfg: dict, backbone: str, shards: str, out_dir: str, reports: str, device: str,
                threads: int, parent_run_id: str | None) -> dict:
    """Train one adapter in its own process: its own GPU (CUDA_VISIBLE_DEVICES) or CPU threads,
    and a crash or a killed worker becomes a retry instead of taking the flow down. The process
    reads the `adapters` section `cfg` as the flow resolved it (overrides applied, device
    chosen) from a params file of its own: nothing is parsed or decided twice."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    section = dict(cfg)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        section["device"] = "cuda"
    elif device == "cpu":
        section["device"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="abair-job-") as tmp:
        params, summary = Path(tmp) / "params.json", Path(tmp) / "summary.json"
        params.write_text(json.dumps({"adapters": section}))  # JSON is YAML: the params loader reads it
        cmd = [sys.executable, "-m", "flows.cli", "adapter", name, "--params", str(params), "--backbone", backbone,
               "--shards", shards, "--out-dir", out_dir, "--reports", reports, "--summary", str(summary), "--no-progress"]
        if parent_run_id:
            cmd += ["--parent-run", parent_run_id]
        returncode = subprocess.run(cmd, env=env).returncode
        if returncode != 0:
            raise JobFailed(f"adapter {name}", returncode)
        return json.loads(summary.read_text())
