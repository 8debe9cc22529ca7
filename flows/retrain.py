"""Scheduled retraining: new clean images in, a gated champion out.

The flow asks the source what it holds (a manifest by content), ends early when nothing changed,
otherwise runs `dvc repro` (so dvc.lock stays the truth; the register stage registers a
challenger and runs the promotion gate), pushes data and models to the DVC remote, and
publishes the metrics and the gate's verdict as a markdown artifact. A retry, or a re-run after
a failure, resumes at the first unfinished stage: DVC skips stages whose outputs are current.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.core import paths
from tasks.core.params import load_params

log = logging.getLogger(__name__)

MANIFEST = paths.SOURCE_MANIFEST


@task(name="source-manifest", retries=3, retry_delay_seconds=[5, 30, 120], cache_policy=NO_CACHE)
def manifest_task(source: str, endpoint_url: str | None) -> dict:
    from tasks.data.manifest import source_manifest

    return source_manifest(source, endpoint_url)


@task(name="dvc", task_run_name="dvc-{args[0]}", retries=2, retry_delay_seconds=[10, 60], cache_policy=NO_CACHE)
def dvc_task(args: list[str], project: str, env: dict | None = None) -> str:
    result = subprocess.run(["dvc", *args], cwd=project, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def stale_stages(project: str) -> set[str]:
    """Stages `dvc repro` would run, apart from the always-run manifest stage."""
    out = subprocess.run(["dvc", "status", "--json"], cwd=project, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out or "{}")) - {"manifest"}


def has_default_remote(project: str) -> bool:
    out = subprocess.run(["dvc", "remote", "default"], cwd=project, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def report(project: Path, manifest: dict, pushed: bool) -> str:
    metrics = json.loads((project / paths.METRICS).read_text()) if (project / paths.METRICS).exists() else {}
    registry = json.loads((project / paths.REGISTRY_REPORT).read_text()) if (project / paths.REGISTRY_REPORT).exists() else {}
    groups = sorted({k.split("/")[2] for k in metrics if k.startswith("summary/") and k.count("/") == 3})
    modes = [m for m in ("input", "none", "oh", "sw", "pw", "oracle", "pw_oracle") if any(f"/{m}/psnr" in k for k in metrics)]
    lines = [f"## ABAIR retraining: {len(manifest['files'])} source images ({manifest['hash']})", "",
             "| group | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for group in groups:
        cells = [f"{metrics[k]:.2f}" if (k := f"summary/{group}/{m}/psnr") in metrics else "-" for m in modes]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    gate = registry.get("gate") or {}
    verdict = "PASS" if gate.get("passed") else "FAIL" if gate else "not run"
    lines += ["", f"PSNR (dB) per group and mode. Gate: **{verdict}** {gate.get('reason', '')}",
              f"Data pushed to the DVC remote: {'yes' if pushed else 'no (no default remote)'}"]
    if gate.get("table"):
        lines += ["", "```", gate["table"], "```"]
    return "\n".join(lines)


@flow(name="abair-retrain", log_prints=True)
def retrain_flow(source: str | None = None, profile: str | None = None, project_dir: str = ".",
                 push: bool = True, force: bool = False) -> dict:
    """Retrain when the clean source changed. `source` and `profile` update params.yaml first."""
    from prefect.runtime import flow_run

    from tasks.data.manifest import read_manifest
    from tasks.core.profiles import apply_profile, merge_into_params

    project = Path(project_dir).resolve()
    params_path = project / paths.PARAMS
    if profile:
        apply_profile(profile, params_path, profiles=project / "profiles")
    if source:
        merge_into_params({"synthesize": {"source": source}}, params_path)
    cfg = load_params(params_path, "synthesize")
    manifest = manifest_task(cfg["source"], cfg.get("endpoint_url"))
    previous = read_manifest(project / MANIFEST)
    if not force and previous is not None and previous.get("hash") == manifest["hash"] and not stale_stages(str(project)):
        message = (f"Nothing new: the {len(manifest['files'])} images of {cfg['source']} are unchanged "
                   f"({manifest['hash']}) and every stage is up to date. No retraining.")
        print(message)
        create_markdown_artifact(message, key="abair-retrain", description="ABAIR scheduled retraining")
        return {"status": "up-to-date", "manifest": manifest["hash"]}

    env = {"ABAIR_PIPELINE_RUN": f"prefect-{flow_run.id or os.getpid()}"}
    dvc_task(["repro"], str(project), env)
    pushed = False
    if push and has_default_remote(str(project)):
        dvc_task(["push"], str(project), env)
        pushed = True
    summary = report(project, manifest, pushed)
    print(summary)
    create_markdown_artifact(summary, key="abair-retrain", description="ABAIR scheduled retraining")
    registry = json.loads((project / paths.REGISTRY_REPORT).read_text()) if (project / paths.REGISTRY_REPORT).exists() else {}
    return {"status": "retrained", "manifest": manifest["hash"], "pushed": pushed, "gate": registry.get("gate")}
