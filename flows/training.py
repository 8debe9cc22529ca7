"""Phases I-III as one Prefect flow (the same work `dvc repro` runs stage by stage): Phase I and
III are tasks here, Phase II is the adapters flow (flows/adapters.py). Params are read once, at
the flow's entry; everything below takes sections."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.adapters import run_adapters
from flows.retry import retry_unless_bad_input
from tasks.core import paths, tracking
from tasks.core.params import Params


@task(name="pretrain", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def pretrain_task(cfg: dict, shards: str, out: str, state_path: str, reports: str) -> dict:
    # A retry resumes from the last checkpoint (resume="auto"), it does not start over.
    from tasks.train.pretrain import pretrain

    summary = pretrain(cfg, shards=shards, out=out, state_path=state_path, reports=reports, resume="auto", progress=False)
    return {k: v for k, v in summary.items() if k != "losses"}

@task(name="estimator", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input)
def estimator_task(cfg: dict, backbone: str, adapters_dir: str, shards: str, out: str, reports: str) -> dict:
    from tasks.train.estimator import train_estimator

    return train_estimator(cfg, backbone_path=backbone, adapters_dir=adapters_dir, shards=shards, out=out,
                           reports=reports, progress=False)


@flow(name="abair-training")
def training_flow(params_path: str = paths.PARAMS, shards: str = paths.SHARDS, checkpoints: str = paths.CHECKPOINTS,
                  reports: str = paths.TRAINING_REPORTS) -> dict:
    """Phases I-III in order as tasks (the same work `dvc repro` runs stage by stage)."""
    tracking.join_flow_pipeline_run()
    params = Params.read(params_path)
    backbone = f"{checkpoints}/{paths.BACKBONE_FILE}"
    pretrain_summary = pretrain_task(params.section("pretrain"), shards, backbone,
                                          f"{checkpoints}/pretrain.state.pt", reports)
    adapters = run_adapters(params.section("adapters"), backbone=backbone, shards=shards,
                            out_dir=f"{checkpoints}/{paths.ADAPTER_DIR}", reports=f"{reports}/adapters")
    estimator_summary = estimator_task(params.section("estimator"), backbone, f"{checkpoints}/{paths.ADAPTER_DIR}", shards,
                                            f"{checkpoints}/{paths.ESTIMATOR_FILE}", reports)
    return {"pretrain": pretrain_summary, "adapters": adapters, "estimator": estimator_summary}
