"""The synthesize stage's units on a Dask cluster, through Prefect's Dask task runner (the way the
adapters stage spreads its jobs): `synthesize.runner: dask`, with `synthesize.dask_address` of a
running scheduler, or a local cluster of `workers` processes without one.

Each unit is a Prefect task (retried when a worker dies or S3 flakes, never on bad input) that
runs tasks.data.synthesize.run_unit in one Dask worker process. The units' input and output go
through the storage layer, so workers on other machines need the source and `out` where they
can reach them: S3, or a shared filesystem. index.json is still written last, by the caller.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_unless_bad_input
from tasks.core.errors import AbairError
from tasks.data.synthesize import UnitJob, UnitRunner, run_unit, synthesize


@task(name="synthesize-unit", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def unit_task(job: UnitJob) -> dict:
    # A retry finds the unit's marker if the first try completed it, else redoes the unit whole.
    return run_unit(job)


def task_runner(cfg: dict):
    """Dask: a running scheduler (`dask_address`), or a local cluster of `workers` processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise AbairError("params.yaml synthesize.runner", "dask needs the optional extra: pip install -e \".[dask]\"") from None
    if cfg.get("dask_address"):
        return DaskTaskRunner(address=cfg["dask_address"])
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, int(cfg.get("workers", 1))), "threads_per_worker": 1,
                                          "processes": True})


def dask_units(cfg: dict) -> UnitRunner:
    """A runner for tasks.data.synthesize.synthesize: every unit a task on the Dask cluster."""

    def run(jobs: list[UnitJob]) -> list[dict]:
        # The jobs stay out of the flow's parameters (Prefect would store them with the flow run);
        # they travel to the workers with the tasks.
        @flow(name="abair-synthesize-units", task_runner=task_runner(cfg))
        def synthesize_units() -> list[dict]:
            futures = [unit_task.with_options(task_run_name=f"unit-{job.unit.name}").submit(job) for job in jobs]
            return [future.result() for future in futures]

        return synthesize_units()

    return run


def units_runner(cfg: dict) -> UnitRunner | None:
    """What `synthesize.runner` asks for: None runs the units on local processes."""
    return dask_units(cfg) if cfg.get("runner", "processes") == "dask" else None


def run_synthesize(cfg: dict, source: str | None = None, out: str | None = None, progress: bool = True) -> dict:
    """The synthesize stage with the runner its params ask for."""
    return synthesize(cfg, source=source, out=out, progress=progress, run_units=units_runner(cfg))
