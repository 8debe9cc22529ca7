"""The adapters stage as a Prefect flow: one job per degradation, concurrently (one per GPU, or a
bounded pool of CPU jobs; threads on one machine or Dask across machines), a results table as
an artifact. `run_adapters_flow` reads params once; everything below it takes the section."""

from __future__ import annotations

import logging
import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import jobs
from tasks.core import paths, tracking
from tasks.core.errors import AbairError
from tasks.core.params import load_params
from tasks.train.adapters import prune_adapters

log = logging.getLogger(__name__)


def plan_devices(cfg: dict, n_jobs: int) -> tuple[list[str], list[int], int]:
    """(device per job, CPU threads per job, concurrent jobs): one job per GPU when there are
    GPUs, else `parallel` jobs sharing the cores."""
    import torch

    gpus = torch.cuda.device_count() if cfg.get("device", "auto") in ("auto", "cuda") else 0
    if gpus:
        devices = [f"cuda:{i % gpus}" for i in range(n_jobs)]
        parallel = min(gpus, n_jobs)
    else:
        devices = ["cpu"] * n_jobs
        parallel = max(1, min(int(cfg.get("parallel", 1)), n_jobs))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return devices, [threads] * n_jobs, parallel


def results_table(results: list[dict]) -> str:
    lines = ["| adapter | status | val PSNR input | backbone alone | with adapter |", "|---|---|---|---|---|"]
    for r in results:
        fmt = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-"  # noqa: E731
        status = "up to date" if r.get("skipped") else "trained"
        lines.append(f"| {r['name']} | {status} | {fmt('val_psnr_input')} | {fmt('val_psnr_backbone')} | {fmt('val_psnr_adapter')} |")
    return "\n".join(lines)


@flow(name="abair-adapters")
def adapters_flow(cfg: dict, backbone: str = paths.BACKBONE, shards: str = paths.SHARDS,
                  out_dir: str = paths.ADAPTERS, reports: str = paths.ADAPTER_REPORTS) -> list[dict]:
    """One job per degradation of the `adapters` section `cfg`, concurrently."""
    removed = prune_adapters(cfg, out_dir)
    if removed:
        log.info("adapters: removed %s (no longer in params)", removed)
    names = list(cfg["degradations"])
    devices, threads, _ = plan_devices(cfg, len(names))
    with tracking.start_run("adapters", tags={"abair.stage": "adapters"}) as run:
        run.log_params({"degradations": names, "devices": devices})
        futures = [jobs.adapter_job.submit(name, cfg, backbone, shards, out_dir, reports, devices[i], threads[i],
                                           run.run_id) for i, name in enumerate(names)]
        results = [f.result() for f in futures]
    table = results_table(results)
    create_markdown_artifact(table, key="abair-adapters", description="Phase II adapters")
    log.info("adapters:\n%s", table)
    return results


def task_runner(cfg: dict):
    """Threads on one machine (each job is its own process anyway), or Dask across machines:
    `runner: dask` with `dask_address` of a running scheduler, or a local cluster without one."""
    _, _, parallel = plan_devices(cfg, len(cfg["degradations"]))
    if cfg.get("runner", "threads") == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise AbairError("params.yaml adapters.runner", "dask needs the optional extra: pip install -e \".[dask]\"") from None
        if cfg.get("dask_address"):
            return DaskTaskRunner(address=cfg["dask_address"])
        return DaskTaskRunner(cluster_kwargs={"n_workers": parallel, "threads_per_worker": 1, "processes": True})
    if cfg.get("runner", "threads") != "threads":
        raise AbairError("params.yaml adapters.runner", f"unknown runner {cfg['runner']!r} (threads or dask)")
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=parallel)


def run_adapters(cfg: dict, **paths) -> list[dict]:
    """Run adapters_flow with the task runner the `adapters` section asks for, sized to the job plan."""
    return adapters_flow.with_options(task_runner=task_runner(cfg))(cfg, **paths)


def run_adapters_flow(params_path: str, overrides: list[str], **paths) -> list[dict]:
    """The adapters stage from a params file and `--set` overrides of its section (read here, once)."""
    return run_adapters(load_params(params_path, "adapters", overrides), **paths)
