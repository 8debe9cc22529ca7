"""MLflow tracking: one parent run per pipeline run, a nested run per stage (and per adapter).

The store is a SQLite file inside the project (`mlflow.db`, artifacts under `mlartifacts/`)
unless MLFLOW_TRACKING_URI is set. Runs are driven through MlflowClient with explicit run ids:
no fluent global state, so adapter jobs in parallel threads each log to their own run.

Which pipeline run a stage belongs to: ABAIR_PIPELINE_RUN when set (the Prefect flows set it),
else the `dvc repro` process this stage runs under (every stage of one `dvc repro` shares one
parent), else the stage's run is top level.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

EXPERIMENT = os.environ.get("ABAIR_EXPERIMENT", "abair")
PIPELINE_TAG = "abair.pipeline"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client():
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri())


def experiment_id(mlflow_client, name: str = EXPERIMENT) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
        artifact_location = (Path.cwd() / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - created concurrently by another stage
        return mlflow_client.get_experiment_by_name(name).experiment_id


def _dvc_ancestor() -> str | None:
    """`dvc-<pid>-<start>` of the `dvc repro`/`dvc exp run` process above us (Linux /proc)."""
    pid = os.getppid()
    for _ in range(8):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        words = [Path(w.decode(errors="replace")).name for w in cmdline if w]
        if any(w == "dvc" or w.startswith("dvc") and w.endswith((".py", "dvc")) for w in words[:3]) and \
                ("repro" in words or "exp" in words):
            return f"dvc-{pid}-{fields[19]}"  # field 22 of stat: start time in clock ticks
        pid = int(fields[1])
        if pid <= 1:
            return None
    return None


def pipeline_key() -> str | None:
    return os.environ.get("ABAIR_PIPELINE_RUN") or _dvc_ancestor()


def join_flow_pipeline_run() -> None:
    """Stages run by a Prefect flow in this process share one parent run (unless one is set)."""
    os.environ.setdefault("ABAIR_PIPELINE_RUN", f"prefect-{os.getpid()}")


class Run:
    """One MLflow run: params, step metrics, artifacts, tags; end() with a status."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self.ended = False

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = flatten(params, prefix)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
        self.ended = True

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """FAILED when the block raised, else FINISHED (unless the block ended the run itself)."""
        if exc_type is not None:
            self.end("FAILED")
        elif not self.ended:
            self.end()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _parent_run(mlflow_client, exp_id: str, key: str) -> str:
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = mlflow_client.create_run(exp_id, tags={PIPELINE_TAG: key, "abair.kind": "pipeline"}, run_name=f"pipeline {key}")
    return run.info.run_id


HARDWARE_TAG = "abair.hardware"


def hardware() -> str:
    """The machine a run ran on, for the record (model cards quote it): the CPU model and its
    logical cores, and the CUDA devices torch sees when torch is already loaded."""
    import platform
    import sys

    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores"
    torch = sys.modules.get("torch")   # never imported for this: only asked when a stage loaded it
    if torch is not None and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        text += "; GPU: " + ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return text


def start_run(name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Run:
    """A run for one stage (nested under the pipeline run) or, with parent_run_id, for one job;
    tagged with the machine it runs on (HARDWARE_TAG)."""
    mlflow_client = client()
    exp_id = experiment_id(mlflow_client)
    all_tags = {"abair.kind": "stage" if parent_run_id is None else "job", HARDWARE_TAG: hardware(), **(tags or {})}
    if parent_run_id is None:
        key = pipeline_key()
        if key is not None:
            parent_run_id = _parent_run(mlflow_client, exp_id, key)
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(exp_id, tags=all_tags, run_name=name)
    log.info("mlflow: run %s (%s) in %s", run.info.run_id[:8], name, tracking_uri())
    return Run(mlflow_client, run.info.run_id)
