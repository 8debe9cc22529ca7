"""MODEL_CARD.md: written from a release's facts alone (tasks.release.facts.gather and the release's
config.json), never by hand and never by guessing. A fact the source does not hold is printed as
"not recorded". Sections are short, mostly tables, for a reader who never opens the code.

render_card(facts, config) -> the markdown. Each section is one function of the facts; SECTIONS
lists them in the order they appear.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from tasks.evaluate.run import SERVED_MODE, WORSE_DB
from tasks.evaluate.sets import GROUPS
from tasks.evaluate.tables import GROUP_TITLES, group_table, metrics_tree, mode_label, modes_table

NOT_RECORDED = "not recorded"
PHASES = (("backbone", "Phase I: backbone (pretrain)"), ("estimator", "Phase III: degradation estimator"))


# ------------------------------------------------------------------------------------------------
# Formatting


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    return str(value).replace("|", "\\|").replace("\n", " ")


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def span(values) -> str | None:
    """[lo, hi] -> "0.15 to 0.8"."""
    if not values:
        return None
    values = json.loads(values) if isinstance(values, str) else values
    return f"{values[0]:g} to {values[1]:g}"


def count(n: int | None) -> str | None:
    if n is None:
        return None
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _json(value: str | None):
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def _get(mapping: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _yes(value) -> str | None:
    return None if value is None else ("yes" if value else "no")


# ------------------------------------------------------------------------------------------------
# What the facts say, in the terms the sections use


class View:
    """The facts and the release config, with the lookups the sections share."""

    def __init__(self, facts: dict, config: dict):
        self.facts, self.config = facts, config
        self.record = facts.get("record") or {}
        self.metrics = facts.get("metrics") or {}
        self.components = facts.get("components") or {}
        self.adapters = list(config.get("adapters") or [])
        self.provenance = facts.get("provenance") or {}

    def meta(self, label: str, key: str):
        return _json(_get(self.components, label, "metadata", key))

    def param(self, section: str, *keys):
        return _get(self.record.get("params"), section, *keys)

    def adapter_param(self, name: str, key: str):
        """An adapters-section knob for one adapter: its per_degradation override, else the section's."""
        override = self.param("adapters", "per_degradation", name, key)
        return override if override is not None else self.param("adapters", key)

    def run(self, label: str) -> dict | None:
        return _get(self.record.get("runs"), label)

    def set_order(self) -> list[str]:
        return [s["name"] for s in _get(self.record, "evaluation", "sets") or []]

    @property
    def suite(self) -> str | None:
        return self.provenance.get("abair.suite") or _get(self.record, "evaluation", "suite")


# ------------------------------------------------------------------------------------------------
# Sections


def header(v: View) -> list[str]:
    source = v.facts["source"]
    registry = source.get("registry")
    where = f"`{source['reference']}`"
    if registry:
        where += f" ({registry['name']} version {registry['version']}, registry `{registry['registry']}`)"
    elif source.get("facts_from"):
        where += f" ({source['kind']}; training record read from the project `{source['facts_from']}`)"
    else:
        where += f" ({source['kind']})"
    return [f"# Model card: ABAIR all-in-one restorer ({', '.join(v.adapters)})", "",
            "One image-restoration network (a Restormer-family backbone) with one small adapter per degradation, "
            "blended per image, or per pixel, by a degradation estimator that looks at the input "
            "(ABAIR, arXiv 2411.18412).", "",
            f"Generated by `abair export` from {where}. Every figure below comes from that source's records; "
            f"\"{NOT_RECORDED}\" marks a fact the source does not hold.", ""]


def glance(v: View) -> list[str]:
    params = v.config.get("parameters") or {}
    kind = v.config.get("kind")
    first = f"adapter.{v.adapters[0]}" if v.adapters else None
    rank = v.meta(first, "rank") if first else None
    kind_text = f"{kind}, rank {rank}" if kind and rank is not None else kind
    gate = v.provenance.get("abair.gate")
    rows = [["Degradations (one adapter each)", ", ".join(v.adapters)],
            ["Adapter kind", kind_text],
            ["Weight columns (estimator output)", ", ".join(v.config.get("weight_columns") or [])],
            ["Parameters", f"{count(params.get('total'))} (backbone {count(params.get('backbone'))}, adapters "
                           f"{count(params.get('adapters'))}, estimator {count(params.get('estimator'))})" if params else None],
            ["Served mode", f"{SERVED_MODE} (one blend of the adapters per image); pw: a blend per pixel, map from "
                            f"`{v.config.get('pw_source') or 'none'}`"],
            ["Evaluation suite", f"`{v.suite}`" if v.suite else None],
            ["Content hash", f"`{v.provenance['abair.content_hash']}`" if v.provenance.get("abair.content_hash") else None],
            ["Git commit", f"`{v.provenance['abair.git_commit']}`" if v.provenance.get("abair.git_commit") else None],
            ["Registered", v.provenance.get("abair.registered_at")],
            ["Promotion gate", f"{gate} ({v.provenance.get('abair.gate_reason', '')})" if gate else None]]
    return ["## At a glance", "", table(["Fact", "Value"], rows), ""]


def intended_use(v: View) -> list[str]:
    out = ["## Intended use and limits", "",
           f"**Use**: restoring photographs (RGB; 8- or 16-bit; any size, large ones in tiles) degraded by "
           f"{', '.join(v.adapters)}: one of them, several at once, or different ones in different regions "
           "(mode pw). The estimator also outputs `keep`, the share of the input blended back into the result, "
           "so that an image it cannot improve is left closer to how it came.", "", "**Limits** (from the records below):", ""]
    data = v.record.get("data")
    train = _get(data, "splits", "train")
    if train:
        out.append(f"- Trained on {train['samples']} synthetic crops of {data.get('crop_size')} px cut from "
                   f"{train['source_images']} source images (`{data.get('source')}`), degraded on the fly: "
                   "real photos differ from synthetic degradations.")
    else:
        out.append(f"- Training data: {NOT_RECORDED}.")
    out.append("- Severities outside the trained ranges (table \"Degradations\") and degradations without an adapter "
               "are not what the adapters learnt; the unseen sets of the evaluation show what happens to some.")
    accuracy = v.metrics.get("estimator/accuracy")
    out.append(f"- The estimator names the right degradation for "
               + (f"{100 * accuracy:.0f}% of the known single-degradation test images." if accuracy is not None
                  else f"a share of images that is {NOT_RECORDED}."))
    failures = failure_sets(v.metrics)
    if v.metrics:
        out.append(f"- On {len(failures)} of {len(evaluated_sets(v.metrics))} evaluated sets the served output is worse "
                   "than the input on average (\"Known failure cases\").")
    else:
        out.append(f"- Evaluation: {NOT_RECORDED}.")
    return out + [""]


def degradations(v: View) -> list[str]:
    shard_severity = _get(v.record, "data", "severity") or {}
    options = _get(v.record, "data", "options") or {}
    rows = []
    for name in v.adapters:
        label = f"adapter.{name}"
        opts = options.get(name)
        rows.append([name, span(v.meta(label, "severity")), span(shard_severity.get(name)) if v.record.get("data") else None,
                     "; ".join(f"{k}: {', '.join(map(str, val)) if isinstance(val, list) else val}" for k, val in opts.items())
                     if opts else ("-" if v.record.get("data") else None),
                     v.meta(label, "data"),
                     _validation(v.meta(label, "val_psnr_input"), v.meta(label, "val_psnr_backbone"),
                                 v.meta(label, "val_psnr_adapter"))])
    return ["## Degradations", "",
            "Severity runs from 0 (untouched) to 1 (the strongest the library draws); what a severity means physically "
            "is written in `degradations/<name>.py` of the code at the git commit above.", "",
            table(["Degradation", "Adapter trained on severities", "Backbone (Phase I) severities", "Options drawn",
                   "Adapter data", "Adapter validation PSNR: input / backbone / adapter"], rows), ""]


def _validation(*values) -> str | None:
    if any(x is None for x in values):
        return None
    return " / ".join(f"{float(x):.2f}" for x in values) + " dB"


def training_data(v: View) -> list[str]:
    data = v.record.get("data")
    if not data:
        return ["## Training data", "", f"Training data: {NOT_RECORDED} (the source holds no record of the shard set).", ""]
    splits = data.get("splits") or {}

    def split(name: str) -> str | None:
        s = splits.get(name)
        return f"{s['samples']} crops from {s['source_images']} source images" if s else None

    kinds = _get(data, "counts", "kinds")
    composite = data.get("composite") or {}
    licenses = data.get("licenses")
    rows = [["Clean source", f"`{data.get('source')}`"],
            ["Shard set", f"params hash `{data.get('params_hash')}`; classes {', '.join(data.get('classes') or [])}"],
            ["Training split", split("train")], ["Validation split (never trained on)", split("val")],
            ["Crop size", f"{data.get('crop_size')} px"],
            ["Sample kinds", ", ".join(f"{k} {n}" for k, n in kinds.items()) if kinds else None],
            ["Composites (degradation CutMix)",
             f"{span(composite.get('regions'))} regions per crop, {span(composite.get('degradations_per_region'))} "
             f"degradations per region; {100 * composite.get('p_single', 0):.0f}% single-degradation, "
             f"{100 * composite.get('p_clean', 0):.0f}% clean" if composite else None],
            ["Licences (samples)", ", ".join(f"{name}: {n}" for name, n in sorted(licenses["licenses"].items(),
                                                                                   key=lambda kv: -kv[1]))
             if licenses else "none recorded for this source (built-in samples or a plain folder)"],
            ["Share-alike", (", ".join(licenses["share_alike"]) or "none") if licenses else "-"],
            ["Attribution (per image)", f"`{licenses['attribution']}`" if licenses else "-"]]
    return ["## Training data", "", table(["Fact", "Value"], rows), ""]


def recipe(v: View) -> list[str]:
    has_params = bool(v.record.get("params"))

    def knob(value):
        return value if value is not None or not has_params else "-"

    rows = []
    run = v.run("backbone")
    model = v.param("pretrain", "model") or {}
    rows.append(["Phase I: backbone", v.meta("backbone", "steps"), knob(v.param("pretrain", "batch")),
                 knob(v.param("pretrain", "lr")),
                 f"size {model.get('size')}, patch {v.param('pretrain', 'patch')}, loss {v.param('pretrain', 'loss')}, "
                 f"seg weight {v.param('pretrain', 'seg_weight')}" if has_params else None,
                 _device(run), duration(_get(run, "wall_s"))])
    stage = v.run("adapters")
    if stage:
        rows.append(["Phase II: all adapters", "-", "-", "-", f"{v.param('adapters', 'parallel')} jobs at a time"
                     if has_params else "-", "-", duration(stage.get("wall_s"))])
    for name in v.adapters:
        label = f"adapter.{name}"
        run = v.run(label)
        rows.append([f"Phase II: adapter {name}", v.meta(label, "steps"), knob(v.adapter_param(name, "batch")),
                     knob(v.adapter_param(name, "lr")),
                     f"{v.meta(label, 'kind')} rank {v.meta(label, 'rank')}, patch {v.adapter_param(name, 'patch')}"
                     if has_params else None, _device(run), duration(_get(run, "wall_s"))])
    run = v.run("estimator")
    rows.append(["Phase III: estimator", _get(v.record, "training", "estimator", "steps", default=v.param("estimator", "steps")),
                 knob(v.param("estimator", "batch")), knob(v.param("estimator", "lr")),
                 (f"width {v.param('estimator', 'width')}; keep head {v.param('estimator', 'keep_steps')} steps; "
                  f"dense head {_yes(v.param('estimator', 'dense'))}") if has_params else None,
                 _device(run), duration(_get(run, "wall_s"))])
    out = ["## Training recipe", "",
           table(["Phase", "Steps", "Batch", "Peak learning rate", "Other settings", "Device setting", "Wall time"], rows), ""]
    machines = list(dict.fromkeys(run["hardware"] for run in (v.record.get("runs") or {}).values()
                                  if isinstance(run, dict) and run.get("hardware")))
    if machines:
        out.append("- Hardware: " + "; ".join(machines) + ".")
    else:
        out.append("- Hardware: the training runs record the device setting above, not the machine "
                   f"(processor or GPU model: {NOT_RECORDED})." if v.record.get("runs") else
                   f"- Hardware and wall time: {NOT_RECORDED} (no training runs in the source's record).")
    pretrain = _get(v.record, "training", "pretrain")
    if pretrain:
        out.append(f"- Phase I validation ({pretrain.get('val_samples')} crops): PSNR {pretrain['val_psnr_input']:.2f} dB in, "
                   f"{pretrain['val_psnr_restored']:.2f} dB out (backbone alone).")
    if has_params:
        out.append("- The full params of each phase are in `facts.json` (`record.params`).")
    return out + [""]


def _device(run: dict | None) -> str | None:
    if not run:
        return None
    text = str(run.get("device", "-"))
    if run.get("world_size") and str(run["world_size"]) != "1":
        text += f", {run['world_size']} processes"
    return text


def evaluated_sets(metrics: dict) -> list[tuple[str, str]]:
    tree = metrics_tree(metrics)
    return [(group, name) for group in GROUPS for name in sorted(tree.get(group, {}))]


def failure_sets(metrics: dict) -> list[dict]:
    """Sets whose served output's mean PSNR is below the input's: group, set, input, served, and
    the share of images made worse (more than WORSE_DB below the input) where recorded."""
    tree = metrics_tree(metrics)
    found = []
    for group, name in evaluated_sets(metrics):
        modes = tree[group][name]
        served, given = _get(modes, SERVED_MODE, "psnr"), _get(modes, "input", "psnr")
        if served is not None and given is not None and served < given:
            found.append({"group": group, "set": name, "input": given, "served": served,
                          "worse": _get(modes, SERVED_MODE, "worse"), "images": metrics.get(f"sets/{group}/{name}/images")})
    return found


def evaluation(v: View) -> list[str]:
    out = ["## Evaluation", ""]
    if not v.metrics:
        return out + [f"Evaluation: {NOT_RECORDED} (the source holds no metrics).", ""]
    registry = v.facts["source"].get("registry")
    origin = (f"the `metric.*` tags of {registry['name']} version {registry['version']}" if registry
              else "the metrics in the source's record")
    out += [f"Suite `{v.suite or NOT_RECORDED}`; numbers from {origin}. PSNR (dB) / SSIM on RGB in [0, 1], per image "
            "then the set's mean; **bold**: the best method short of the oracle (which is told the right adapter).", ""]
    sets = _get(v.record, "evaluation", "sets")
    order = v.set_order()
    if sets:
        rows = [[f"`{s['name']}`", s["group"], s["from"], ", ".join(s.get("task") or []) or "-",
                 _int(v.metrics.get(f"sets/{s['group']}/{s['name']}/images"))] for s in sets]
        out += [table(["Set", "Group", "Made from", "Right adapter(s)", "Images"], rows), ""]
    else:
        out += [f"How each set was made: {NOT_RECORDED}.", ""]
    tree = metrics_tree(v.metrics)
    for group in GROUPS:
        if group in tree:
            head, rows, _ = group_table(v.metrics, group, order)
            out += [f"### {GROUP_TITLES[group]}", "", table(head, rows), ""]
    head, rows, _ = modes_table(v.metrics)
    if rows:
        out += ["### Modes compared (mean over the sets where all ran)", "", table(head, rows), ""]
    return out


def estimator(v: View) -> list[str]:
    out = ["## Degradation estimator", ""]
    accuracy, images = v.metrics.get("estimator/accuracy"), v.metrics.get("estimator/images")
    per_set = {key.split("/")[2]: value for key, value in v.metrics.items()
               if key.startswith("estimator/known/") and key.endswith("/accuracy")}
    if accuracy is not None:
        out.append(f"Accuracy on the known single-degradation sets (argmax against the set's degradation): "
                   f"**{accuracy:.3f}**" + (f" over {int(images)} images" if images is not None else "") + ".")
        if per_set:
            out += ["", table(["Set", *per_set], [["accuracy", *[f"{a:.2f}" for a in per_set.values()]]])]
    else:
        out.append(f"Accuracy on the evaluation sets: {NOT_RECORDED}.")
    report = _get(v.record, "training", "estimator") or {}
    val = report.get("val_accuracy", v.meta("estimator", "val_accuracy"))
    out += ["", f"- Training validation accuracy: {float(val):.3f}." if val is not None else
            f"- Training validation accuracy: {NOT_RECORDED}."]
    keep = report.get("keep_val")
    if keep:
        out.append(f"- Do-no-harm `keep` head on {keep['samples']} held-out samples: PSNR {keep['psnr_input']:.2f} dB in, "
                   f"{keep['psnr_network']:.2f} dB from the network alone, {keep['psnr_served']:.2f} dB served with keep; "
                   f"{100 * keep['worse_share']:.0f}% of the samples served worse than the input"
                   + (f"; mean tone-lock share {keep['tone_share_mean']:.2f}." if keep.get("tone_share_mean") is not None
                      else "."))
    dense = report.get("dense_val")
    if dense:
        out.append(f"- Dense (per-pixel) head on {dense['samples']} validation crops: mean IoU {dense['mean_iou']:.3f}, "
                   f"pixel accuracy {dense['pixel_accuracy']:.3f}.")
    return out + [""]


def failures(v: View) -> list[str]:
    out = ["## Known failure cases", ""]
    if not v.metrics:
        return out + [f"Failure cases: {NOT_RECORDED} (no evaluation metrics).", ""]
    found = failure_sets(v.metrics)
    served = mode_label(SERVED_MODE)
    if found:
        out += [f"Sets where the served output ({served}) is worse than the input, mean PSNR over the set:", "",
                table(["Set", "Group", "Input", served, "Difference", f"Images made worse by > {WORSE_DB:g} dB"],
                      [[f"`{f['set']}`", f["group"], f"{f['input']:.2f}", f"{f['served']:.2f}",
                        f"{f['served'] - f['input']:+.2f} dB", _share(f["worse"], f["images"])] for f in found]), ""]
    else:
        out += [f"None found: on every evaluated set the served output's ({served}) mean PSNR is at least the input's.", ""]
    listed = {(f["group"], f["set"]) for f in found}
    worse = [(group, name, v.metrics.get(f"{group}/{name}/{SERVED_MODE}/worse"), v.metrics.get(f"sets/{group}/{name}/images"))
             for group, name in evaluated_sets(v.metrics) if (group, name) not in listed]
    worse = [w for w in worse if w[2]]
    if worse:
        out += [f"{'Other sets' if found else 'Sets'} where some images came out more than {WORSE_DB:g} dB (PSNR) worse "
                "than they went in, though not the set's mean:", "",
                table(["Set", "Group", "Images made worse"],
                      [[f"`{name}`", group, _share(share, images)] for group, name, share, images in worse]), ""]
    elif not any(k.endswith(f"/{SERVED_MODE}/worse") for k in v.metrics):
        out += [f"Shares of images made worse: {NOT_RECORDED}.", ""]
    elif not found:
        out += [f"No image of any set came out more than {WORSE_DB:g} dB worse than it went in.", ""]
    return out


def _share(share: float | None, images) -> str | None:
    if share is None:
        return None
    return f"{100 * share:.0f}%" + (f" ({round(share * images)} of {int(images)})" if images else "")


def onnx(v: View) -> list[str]:
    record = v.config.get("onnx")
    if not record:
        return []
    out = ["## ONNX graphs", "",
           f"Exported with {record.get('exporter')} at opset {record.get('opset')} (torch {record.get('torch')}); checked "
           f"with onnxruntime {record.get('onnxruntime')} against the torch model on each size below.", ""]
    graphs = record.get("graphs") or []
    out += [table(["Graph", "Role", "Inputs", "Outputs"],
                  [[f"`{g['file']}`", g.get("role"), ", ".join(map(str, g.get("inputs") or [])),
                    ", ".join(map(str, g.get("outputs") or []))] for g in graphs]), ""]
    checks = [[f"`{g['file']}`", f"{c['size'][0]}x{c['size'][1]}", f"{c['max_abs_diff']:.2e}", f"{c['bound']:.0e}",
               "yes" if c["passed"] else "**no**"] for g in graphs for c in g.get("checks") or []]
    out += [table(["Graph", "Size (HxW)", "Max abs difference", "Bound", "Passed"], checks) if checks
            else f"Equality checks: {NOT_RECORDED}.", ""]
    return out


def versions(v: View) -> list[str]:
    files = v.config.get("files") or {}
    weights = v.config.get("weights") or {}
    paths = {"backbone": weights.get("backbone"), "estimator": weights.get("estimator"),
             **{f"adapter.{name}": path for name, path in (weights.get("adapters") or {}).items()}}
    rows = [[label, f"`{paths.get(label)}`", entry.get("registry"), f"`{entry['sha256']}`"]
            for label, entry in v.components.items()]
    registry = v.facts["source"].get("registry")
    out = ["## Versions and hashes", "",
           (f"Restorer: {registry['name']} version {registry['version']}"
            + (f" (aliases: {', '.join(registry['aliases'])})" if registry.get("aliases") else "") + "; "
            if registry else "Restorer registry version: not recorded (not exported from the registry); ")
           + (f"content hash `{v.provenance['abair.content_hash']}` (over the component files and the training params)."
              if v.provenance.get("abair.content_hash") else f"content hash: {NOT_RECORDED}."), "",
           table(["Component", "File", "Registry version", "sha256"], rows), ""]
    others = [[f"`{path}`", f"`{digest}`"] for path, digest in files.items() if not path.startswith("weights/")
              and path != "MODEL_CARD.md"]
    if others:
        out += ["Other files of the release (`config.json` lists every file's sha256, this card's included):", "",
                table(["File", "sha256"], others), ""]
    return out


def usage(v: View) -> list[str]:
    return ["## Using this release", "",
            "```bash",
            "abair restore photo.jpg --model THIS_FOLDER --out restored/   # checks every file's sha256 first",
            "```", "", "```python",
            "from models.restorer import Restorer",
            "restorer = Restorer.from_release(\"THIS_FOLDER\")            # safetensors only: nothing is unpickled",
            "restored, weights = restorer.restore(images)                # B x 3 x H x W in [0, 1]; weights: "
            + ", ".join(v.config.get("weight_columns") or []),
            "```", ""]


SECTIONS: tuple[Callable[[View], list[str]], ...] = (header, glance, intended_use, degradations, training_data, recipe,
                                                      evaluation, estimator, failures, onnx, versions, usage)


def render_card(facts: dict, config: dict) -> str:
    """MODEL_CARD.md for a release: `facts` from tasks.release.facts.gather, `config` the release's
    config.json (weight columns, kind, parameters, files, onnx record)."""
    view = View(facts, config)
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(view)
    return "\n".join(lines).rstrip() + "\n"
