"""params.yaml is parsed once at an entry point; below it, sections travel as values, and an
adapter job's own process gets the section its flow resolved, not a path to parse again."""

from __future__ import annotations

import json
import subprocess

import pytest

from tasks.core.errors import AbairError
from tasks.core.params import Params, load_params

TEXT = "pretrain:\n  lr: 8e-3\n  steps: 10\nadapters:\n  rank: 4\n  alpha: 4.0\n  severity: [0.2, 1.0]\n"


def test_overrides_apply_within_a_section_or_to_the_whole_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(TEXT)
    params = Params.read(path, ["rank=8", "kind=adaptir"], within="adapters")
    assert params.section("adapters") == {"rank": 8, "alpha": 4.0, "severity": [0.2, 1.0], "kind": "adaptir"}
    assert params.section("pretrain") == {"lr": 0.008, "steps": 10}
    whole = Params.read(path, ["adapters.rank=16", "pretrain.steps=3"])
    assert whole.section("adapters")["rank"] == 16 and whole.section("pretrain")["steps"] == 3
    assert load_params(path, "adapters", ["rank=8", "kind=adaptir"]) == params.section("adapters")
    # the whole-file spelling means the same on a stage command; another section's key is refused
    assert Params.read(path, ["adapters.rank=8", "kind=adaptir"], within="adapters").section("adapters") == \
        params.section("adapters")
    with pytest.raises(AbairError, match="sets the `pretrain` section; this command reads `adapters`"):
        Params.read(path, ["pretrain.steps=3"], within="adapters")
    # a section is a copy: changing it changes nothing the entry point hands to the next stage
    params.section("adapters")["rank"] = 99
    assert params.section("adapters")["rank"] == 8


def test_a_missing_section_is_an_error_unless_optional(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(TEXT)
    with pytest.raises(AbairError, match="has no `estimator` section"):
        Params.read(path).section("estimator")
    with pytest.raises(AbairError, match="has no `estimator` section"):
        Params.read(path, ["steps=1"], within="estimator")
    assert Params.read(path).section("estimator", optional=True) == {}
    with pytest.raises(AbairError, match="params file not found"):
        Params.read(tmp_path / "none.yaml")


def test_an_adapter_job_hands_its_process_the_resolved_section(tmp_path, monkeypatch):
    from flows import jobs

    cfg = load_params(_params_file(tmp_path), "adapters", ["rank=8"])
    launched = {}

    def run(cmd, env=None, **kwargs):
        launched.update(cmd=cmd, env=env)
        summary = cmd[cmd.index("--summary") + 1]
        with open(summary, "w") as f:
            json.dump({"name": cmd[cmd.index("adapter") + 1], "skipped": False}, f)
        launched["section"] = load_params(cmd[cmd.index("--params") + 1], "adapters")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(jobs.subprocess, "run", run)
    result = jobs.adapter_job.fn("noise", cfg, "b.safetensors", "shards", "out", "reports", "cuda:1", 3, None)
    assert result == {"name": "noise", "skipped": False}
    assert launched["section"] == {**cfg, "device": "cuda"}  # what the child parses: the flow's values, as they were
    assert "--set" not in launched["cmd"]
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "1" and launched["env"]["OMP_NUM_THREADS"] == "3"
    assert cfg.get("device") != "cuda"  # the flow's own section is left as it was


def _params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(TEXT + "  lr: 2.0e-3\n  min_lr: 1e-5\n  per_degradation: {noise: {steps: 3}}\n  data: {}\n")
    return path
