"""The promotion gate: which abair-restorer version serves.

`promote` compares the `challenger` with the `champion` on one evaluation suite (re-evaluating a
version whose metrics came from another suite) and moves `champion` on pass, the one before
keeping `previous`; with no champion yet an absolute floor decides. `rollback` moves `champion`
back to `previous`. A verdict, pass or fail, is stored as tags on the challenger.

The gate compares one mode (register.gate.mode): a mode the system serves, `sw` (the default of
`abair restore`), `oh`, `pw` (pixel-wise) or `none`; its figures are the evaluation's
`<group>/<set>/<mode>/<metric>` and `summary/all/<mode>/<metric>` keys.
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tasks.core import paths
from tasks.core.errors import AbairError
from tasks.evaluate.sets import GROUPS, suite_fingerprint
from tasks.evaluate.stage import evaluate
from tasks.registry.store import (CHALLENGER, CHAMPION, PREVIOUS, RESTORER, SUITE_TAG, alias_version, delete_alias,
                                  download_components, metrics_of, numeric_metrics, registry_client, registry_errors,
                                  resolve, set_alias)


GATE_MODES = ("sw", "oh", "pw", "none")


def gate_mode(gate: Mapping[str, Any]) -> str:
    """register.gate.mode, checked: one of GATE_MODES (an oracle knows the answer; it serves nothing)."""
    mode = gate.get("mode", "sw")
    if mode not in GATE_MODES:
        raise AbairError("register.gate.mode", f"must be one of {list(GATE_MODES)} (a mode the system serves), got {mode!r}")
    return mode


def _not_evaluated(mode: str) -> str:
    return f"(is `{mode}` in evaluate.modes?)"


@dataclass
class Verdict:
    passed: bool
    against: str                     # "floor" or "champion version N"
    reasons: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "all checks passed"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def compare(challenger: Mapping[str, float], champion: Mapping[str, float], gate: Mapping[str, Any],
            against: str = "champion") -> Verdict:
    """Relative gate: the challenger's average not lower than the champion's (by more than
    avg_tolerance_db) and no task worse by more than task_tolerance_db. Tasks only the challenger
    has (a new degradation) are shown but do not gate."""
    mode, metric = gate_mode(gate), gate.get("metric", "psnr")
    task_tol, avg_tol = float(gate["task_tolerance_db"]), float(gate.get("avg_tolerance_db", 0.0))
    verdict = Verdict(True, against)

    def tasks(metrics):
        return {k for k in metrics if len(k.split("/")) == 4 and k.split("/")[0] in GROUPS
                and k.split("/")[2] == mode and k.split("/")[3] == metric}

    for key in sorted(tasks(challenger) | tasks(champion)):
        task = "/".join(key.split("/")[:2])
        old, new = champion.get(key), challenger.get(key)
        if old is None:
            verdict.rows.append({"task": task, "champion": None, "challenger": new, "change": None, "status": "new task"})
            continue
        if new is None:
            verdict.passed = False
            verdict.reasons.append(f"{task} not evaluated for the challenger")
            verdict.rows.append({"task": task, "champion": old, "challenger": None, "change": None, "status": "FAIL: missing"})
            continue
        change = new - old
        ok = change >= -task_tol
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"{task} {metric} {change:+.2f} dB (worse than the {task_tol:.2f} dB tolerance)")
        verdict.rows.append({"task": task, "champion": old, "challenger": new, "change": change,
                             "status": "ok" if ok else f"FAIL: < -{task_tol:.2f}"})
    key = f"summary/all/{mode}/{metric}"
    old, new = champion.get(key), challenger.get(key)
    if old is None or new is None:
        verdict.passed = False
        verdict.reasons.append(f"no average ({key}) to compare " + _not_evaluated(mode))
        verdict.rows.append({"task": "average", "champion": old, "challenger": new, "change": None, "status": "FAIL: missing"})
    else:
        ok = new - old >= -avg_tol
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"average {metric} {new - old:+.2f} dB ({new:.2f} vs {old:.2f})")
        verdict.rows.append({"task": "average", "champion": old, "challenger": new, "change": new - old,
                             "status": "ok" if ok else "FAIL: lower"})
    return verdict


def floor_check(challenger: Mapping[str, float], gate: Mapping[str, Any]) -> Verdict:
    """The first champion: average PSNR at least floor_psnr_db and at least min_gain_db above
    the unrestored input's."""
    mode = gate_mode(gate)
    verdict = Verdict(True, "floor")
    average, raw = challenger.get(f"summary/all/{mode}/psnr"), challenger.get("summary/all/input/psnr")
    floor, min_gain = float(gate["floor_psnr_db"]), float(gate["min_gain_db"])
    checks = [("average psnr", average, floor), ("gain over input", None if average is None or raw is None else average - raw,
                                                 min_gain)]
    for name, value, threshold in checks:
        ok = value is not None and value >= threshold
        if not ok:
            verdict.passed = False
            verdict.reasons.append(f"{name} {_fmt(value)} dB below the floor {threshold:.2f} dB" if value is not None
                                   else f"{name}: summary/all/{mode}/psnr or summary/all/input/psnr not in the metrics "
                                        + _not_evaluated(mode))
        verdict.rows.append({"task": name, "champion": threshold, "challenger": value,
                             "change": None if value is None else value - threshold, "status": "ok" if ok else "FAIL"})
    return verdict


def table(verdict: Verdict, champion_label: str, challenger_label: str) -> str:
    head = ["task", champion_label, challenger_label, "change", "verdict"]
    lines = [[r["task"], _fmt(r["champion"]), _fmt(r["challenger"]), _fmt(r["change"], True), r["status"]] for r in verdict.rows]
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class Evaluator:
    """What the gate needs from evaluation: the suite fingerprint and a fresh evaluation of a
    folder of components (tasks.evaluate; replaceable in tests)."""

    def suite(self, cfg: dict, shards: str) -> str:
        return suite_fingerprint(cfg, shards)

    def evaluate(self, cfg: dict, checkpoints: str, shards: str) -> dict:
        return evaluate(cfg, checkpoints=checkpoints, shards=shards, reports=None, progress=False)


def _on_one_suite(new, old, evaluator: Evaluator, eval_cfg: dict, shards: str, client,
                  echo: Callable[[str], None]) -> tuple[dict, dict, dict]:
    """(challenger metrics, champion metrics, {which: suite re-evaluated on}): the stored metrics,
    or, when the two came from different suites, fresh ones on the current suite for each
    version whose stored metrics are not from it."""
    new_metrics, old_metrics, suites = metrics_of(new), metrics_of(old), {}
    new_suite, old_suite = (new.tags or {}).get(SUITE_TAG), (old.tags or {}).get(SUITE_TAG)
    if new_suite and new_suite == old_suite:
        return new_metrics, old_metrics, suites
    current = evaluator.suite(eval_cfg, shards)
    with tempfile.TemporaryDirectory(prefix="abair-gate-") as tmp:
        for which, version in (("challenger", new), ("champion", old)):
            if (version.tags or {}).get(SUITE_TAG) != current:
                echo(f"re-evaluating the {which} (version {version.version}) on the current suite {current}")
                folder = download_components(version, Path(tmp) / which, client)
                fresh = numeric_metrics(evaluator.evaluate(eval_cfg, str(folder), shards))
                if which == "challenger":
                    new_metrics = fresh
                else:
                    old_metrics = fresh
                suites[which] = current
    return new_metrics, old_metrics, suites


def _record(client, ref: str, new, old, verdict: Verdict, echo: Callable[[str], None]) -> bool:
    """Store the verdict as tags on the challenger and, on pass, move the aliases. True when moved."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with registry_errors(ref):
        client.set_model_version_tag(RESTORER, new.version, "abair.gate", "passed" if verdict.passed else "failed")
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_reason", verdict.reason()[:4900])
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_against", verdict.against)
        client.set_model_version_tag(RESTORER, new.version, "abair.gate_at", stamp)
        if verdict.passed:
            if old is not None:
                set_alias(client, old.version, PREVIOUS, mirror=True)
            set_alias(client, new.version, CHAMPION, mirror=True)
            echo(f"champion: {RESTORER} version {new.version}" + (f" (previous: version {old.version})" if old else ""))
        else:
            echo(f"champion unchanged: {f'version {old.version}' if old else 'none yet'}")
    return verdict.passed


def promote(gate: Mapping[str, Any], *, eval_cfg: dict | None = None, shards: str = paths.SHARDS,
            challenger: str | None = None, dry_run: bool = False, evaluator: Evaluator | None = None,
            echo: Callable[[str], None] = print) -> dict:
    """Run the gate for the `challenger` (alias, or a version number) and move the aliases on pass.

    With a champion: the relative gate on the same evaluation suite (versions evaluated on
    another suite than the current one are re-evaluated first). Without one: the absolute floor.
    On fail nothing moves and the reason is stored as a tag on the challenger; dry_run changes
    nothing at all.
    """
    gate_mode(gate)   # a wrong mode is one error before the registry is touched
    client = registry_client(must_exist=True)
    evaluator = evaluator or Evaluator()
    ref = f"models:/{RESTORER}/{challenger}" if challenger else f"models:/{RESTORER}@{CHALLENGER}"
    with registry_errors(ref):
        new = resolve(ref, client)
        old = alias_version(client, RESTORER, CHAMPION)
    result = {"challenger": str(new.version), "champion_before": str(old.version) if old else None, "dry_run": dry_run,
              "moved": False}
    if old is not None and str(old.version) == str(new.version):
        echo(f"{RESTORER} version {new.version} is already the champion; nothing to do")
        return {**result, "passed": True, "reason": "already champion", "champion": str(new.version)}

    if old is None:
        verdict, suites = floor_check(metrics_of(new), gate), {}
        labels = ("threshold", f"v{new.version}")
    else:
        new_metrics, old_metrics, suites = _on_one_suite(new, old, evaluator, eval_cfg or {}, shards, client, echo)
        verdict = compare(new_metrics, old_metrics, gate, against=f"champion version {old.version}")
        labels = (f"champion v{old.version}", f"challenger v{new.version}")
    text = table(verdict, *labels)
    echo(f"gate ({verdict.against}, mode {gate.get('mode', 'sw')}):\n{text}")
    echo(f"{'PASS' if verdict.passed else 'FAIL'}: {verdict.reason()}")
    result.update(passed=verdict.passed, reason=verdict.reason(), against=verdict.against, rows=verdict.rows,
                  table=text, reevaluated=suites)
    if dry_run:
        echo("dry run: no alias moved")
        result["champion"] = str(old.version) if old else None
        return result
    result["moved"] = _record(client, ref, new, old, verdict, echo)
    result["champion"] = str(new.version) if result["moved"] else (str(old.version) if old else None)
    return result


def rollback(echo: Callable[[str], None] = print) -> dict:
    """Move `champion` back to the `previous` version; `previous` is cleared (one step back)."""
    client = registry_client(must_exist=True)
    what = f"models:/{RESTORER}@{PREVIOUS}"
    with registry_errors(what):
        previous = alias_version(client, RESTORER, PREVIOUS)
        if previous is None:
            raise AbairError(what, "no previous champion to roll back to")
        current = alias_version(client, RESTORER, CHAMPION)
        set_alias(client, previous.version, CHAMPION, mirror=True)
        delete_alias(client, PREVIOUS, [previous] + ([current] if current else []))
        if current is not None:
            stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            client.set_model_version_tag(RESTORER, current.version, "abair.rolled_back",
                                         f"replaced by version {previous.version} at {stamp}")
    echo(f"champion: {RESTORER} version {previous.version} (was version {current.version if current else 'none'})")
    return {"champion": str(previous.version), "replaced": str(current.version) if current else None}
