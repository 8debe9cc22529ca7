"""The paper's tables, built from the flat metrics alone (so the registry and Prefect can rebuild
them), and results.md, which puts them in a page with the sets, the estimator and the plots."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from tasks.core.metrics import PSNR_CAP
from tasks.evaluate import baselines
from tasks.evaluate.run import MAP_ACCURACY, SERVED_MODE, WORSE_DB, SetResult, rounded
from tasks.evaluate.sets import GROUPS, parse_sets

GROUP_TITLES = {"known": "Known degradations", "unseen": "Unseen degradations", "mixed": "Mixed degradations",
                "regions": "Regions with different degradations"}
MODE_LABELS = {"input": "Input", "baseline": "Baseline (classical)", "none": "Backbone", "oh": "ABAIR (OH)",
               "sw": "ABAIR (SW)", "pw": "ABAIR (PW)", "oracle": "Oracle", "pw_oracle": "Oracle (pixel-wise)"}
# Modes that know the answer: shown, never bold (the best method "short of the oracle").
ORACLE_MODES = ("oracle", "pw_oracle")
# The modes of the "made worse" table: the served one and what a user would use instead.
WORSE_MODES = (SERVED_MODE, "baseline")


def mode_label(mode: str) -> str:
    return MODE_LABELS.get(mode) or (f"Adapter {mode[len('adapter_'):]}" if mode.startswith("adapter_") else mode)


def metrics_tree(metrics: dict) -> dict:
    """{group: {set: {mode: {metric: value}}}} from the flat keys."""
    tree: dict = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] in GROUPS:
            group, name, mode, metric = parts
            tree.setdefault(group, {}).setdefault(name, {}).setdefault(mode, {})[metric] = value
    return tree


def ordered_sets(names: Iterable[str], set_order: Sequence[str]) -> list[str]:
    """The sets in `set_order` first (in that order), then the others by name."""
    names = list(names)
    return [s for s in set_order if s in names] + sorted(s for s in names if s not in set_order)


def ordered_modes(modes: Iterable[str], set_order: Sequence[str] = ()) -> list[str]:
    """Input, Baseline, Backbone, adapters (in the order of the sets they serve, then by name), OH,
    SW, PW, Oracle, Oracle (pixel-wise)."""
    modes = set(modes)
    adapters = [m for m in modes if m.startswith("adapter_")]
    rank = {name: i for i, name in enumerate(set_order)}
    adapters.sort(key=lambda m: (rank.get(m[len("adapter_"):], len(rank)), m))
    head = [m for m in ("input", "baseline", "none") if m in modes]
    tail = [m for m in ("oh", "sw", "pw", "oracle", "pw_oracle") if m in modes]
    rest = sorted(modes - set(head) - set(tail) - set(adapters))
    return head + adapters + rest + tail


def method_params(metrics: dict, mode: str) -> int | None:
    """Parameters a method runs with (the paper's Params column)."""
    backbone = metrics.get("params/backbone")
    if mode in ("input", "baseline") or backbone is None:
        return None
    if mode == "none":
        return backbone
    if mode.startswith("adapter_"):
        return backbone + metrics.get(f"params/adapter/{mode[len('adapter_'):]}", 0)
    if mode in ORACLE_MODES:
        return backbone + metrics.get("params/adapters", 0)
    return metrics.get("params/total")


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def group_table(metrics: dict, group: str, set_order: Sequence[str] = ()) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, markdown rows, table-artifact rows) for one group: methods x sets, PSNR/SSIM cells,
    the group average and the method's parameter count; the best non-oracle PSNR per column in bold."""
    tree = metrics_tree(metrics).get(group, {})
    sets = ordered_sets(tree, set_order)
    modes = ordered_modes({m for s in sets for m in tree[s]}, [n for n in set_order])
    header = ["Method", *sets, "Average", "Params"]

    def pair(mode: str, name: str | None) -> tuple[float | None, float | None]:
        if name is None:
            return metrics.get(f"summary/{group}/{mode}/psnr"), metrics.get(f"summary/{group}/{mode}/ssim")
        values = tree[name].get(mode, {})
        return values.get("psnr"), values.get("ssim")

    columns = [*sets, None]
    best = {}
    for col in columns:
        scores = [pair(m, col)[0] for m in modes if m not in ORACLE_MODES]
        scores = [s for s in scores if s is not None]
        best[col] = max(scores) if scores else None
    rows, records = [], []
    for mode in modes:
        cells, record = [mode_label(mode)], {"method": mode_label(mode)}
        for col in columns:
            p, s = pair(mode, col)
            label = col or "average"
            if p is None:
                cells.append("-")
            else:
                text = f"{p:.2f}/{s:.3f}" if s is not None else f"{p:.2f}"
                cells.append(f"**{text}**" if mode not in ORACLE_MODES and p == best[col] else text)
            record[f"{label} psnr"] = p
            record[f"{label} ssim"] = s
        n = method_params(metrics, mode)
        cells.append(format_params(n))
        record["params"] = n
        rows.append(cells)
        records.append(record)
    return header, rows, records


def modes_table(metrics: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    """OH vs SW vs PW vs Oracle (and the classical baseline, the backbone and the pixel-wise
    oracle), averaged per group over the sets where all of them exist. The pixel-wise oracle runs
    on regions sets only: it does not narrow the sets, and shows where every counted set has it."""
    tree = metrics_tree(metrics)
    compared = ["baseline", "none", "oh", "sw", "pw", "oracle", "pw_oracle"]
    optional = ("pw_oracle",)
    header = ["Group", "Sets", *[mode_label(m) for m in compared]]
    rows, records = [], []
    for scope in (*GROUPS, "all"):
        groups = GROUPS if scope == "all" else (scope,)
        members = [tree[g][s] for g in groups for s in tree.get(g, {})]
        present = [m for m in compared if any(m in s for s in members)]
        if not members or not present:
            continue
        common = [s for s in members if all(m in s for m in present if m not in optional)]
        if not common:
            continue
        cells = [scope, f"{len(common)}/{len(members)}"]
        record = {"group": scope, "sets": len(common), "of": len(members)}
        for mode in compared:
            if mode not in present or not all(mode in s for s in common):
                cells.append("-")
                record[f"{mode} psnr"] = record[f"{mode} ssim"] = None
                continue
            p = float(np.mean([s[mode]["psnr"] for s in common]))
            q = float(np.mean([s[mode]["ssim"] for s in common]))
            cells.append(f"{p:.2f}/{q:.3f}")
            record[f"{mode} psnr"], record[f"{mode} ssim"] = rounded(p), rounded(q)
        rows.append(cells)
        records.append(record)
    return header, rows, records


def paper_tables(metrics: dict, cfg: dict | None = None) -> dict[str, list[dict]]:
    """Table rows (lists of dicts) keyed by table name, for Prefect table artifacts."""
    order = [s.name for s in parse_sets(cfg)] if cfg else []
    tables = {}
    tree = metrics_tree(metrics)
    for group in GROUPS:
        if group in tree:
            tables[group] = group_table(metrics, group, order)[2]
    tables["modes"] = modes_table(metrics)[2]
    worse = worse_table(metrics, order)[2]
    if worse:
        tables["worse"] = worse
    return tables


def worse_table(metrics: dict, set_order: Sequence[str] = ()) -> tuple[list[str], list[list[str]], list[dict]]:
    """Per set, the share of images that the served mode and the baseline left more than
    WORSE_DB below the input's PSNR (with the image counts), then the group and overall means
    over the sets. No rows when neither mode has the figure."""
    tree = metrics_tree(metrics)
    modes = [m for m in WORSE_MODES if any(m in tree[g][s] and "worse" in tree[g][s][m] for g in tree for s in tree[g])]
    header = ["Set", "Group", "Images", *[mode_label(m) for m in modes]]
    rows, records = [], []
    if not modes:
        return header, rows, records

    def cell(share: float | None, images: int | None) -> str:
        if share is None:
            return "-"
        return f"{100 * share:.0f}%" + (f" ({round(share * images)}/{images})" if images else "")

    for group in GROUPS:
        for name in ordered_sets(tree.get(group, {}), set_order):
            images = metrics.get(f"sets/{group}/{name}/images")
            shares = {m: tree[group][name].get(m, {}).get("worse") for m in modes}
            rows.append([f"`{name}`", group, str(images or "-"), *[cell(shares[m], images) for m in modes]])
            records.append({"set": name, "group": group, "images": images, **{f"{m} worse": shares[m] for m in modes}})
    for scope in (*GROUPS, "all"):
        shares = {m: metrics.get(f"summary/{scope}/{m}/worse") for m in modes}
        if all(v is None for v in shares.values()):
            continue
        rows.append([f"**mean ({scope})**", scope, "", *[cell(shares[m], None) for m in modes]])
        records.append({"set": f"mean ({scope})", "group": scope, "images": None,
                        **{f"{m} worse": shares[m] for m in modes}})
    return header, rows, records


# ------------------------------------------------------------------------------------------------
# results.md


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _preamble(results: list[SetResult], info: dict) -> list[str]:
    return ["# ABAIR evaluation", "",
            f"Checkpoints `{info['checkpoints']}`; suite `{info['suite']}`; device {info['device']}; "
            f"{sum(r.images for r in results)} images in {len(results)} sets.", "",
            f"Protocol: images centre-cropped to a multiple of {info['protocol']['multiple']} px; PSNR (dB) / SSIM "
            f"on RGB in [0, 1] (torchmetrics, per image, then the set mean; PSNR capped at {PSNR_CAP:g} dB)"
            + ("; Y-channel (BT.601) figures in metrics.json" if info["protocol"]["y_channel"] else "")
            + ". Cells are PSNR/SSIM; **bold** is the best method short of the oracle. Params: parameters the "
              "method runs with (backbone, + its adapter(s), + the estimator for OH/SW/PW). Baseline (classical): what a "
              "user would reach for instead, chosen by the set's task (dark channel prior for haze, gamma + CLAHE for "
              "low light, non-local means for noise; the input where none exists; tasks/evaluate/baselines.py).", ""]


def _group_sections(metrics: dict, results: list[SetResult], tree: dict) -> list[str]:
    """Tables 1..n: one per group present, then the OH/SW/oracle table."""
    order = [r.spec.name for r in results]
    out = []
    table_no = 1
    for group in GROUPS:
        if group not in tree:
            continue
        header, rows, _ = group_table(metrics, group, order)
        sets = [r for r in results if r.spec.group == group]
        out += [f"## Table {table_no}: {GROUP_TITLES[group].lower()}", ""]
        if group == "unseen":
            out += ["No adapter was trained for these degradations; an oracle row appears only where one exists.", ""]
        if group == "regions":
            out += _regions_note(metrics, sets)
        out += [_markdown(header, rows), ""]
        out += ["Sets: " + "; ".join(f"`{r.spec.name}` = {r.spec.describe()}, {r.images} images" for r in sets), ""]
        table_no += 1
    header, rows, _ = modes_table(metrics)
    out += [f"## Table {table_no}: OH vs SW vs PW vs oracle", "",
            "Means over the sets of each group where every listed mode ran (Sets: used/all), next to the "
            "classical baseline and the backbone alone. PW: the pixel-wise mode (a weight map per image); "
            "Oracle (pixel-wise): the true mask as the map, on regions sets only (shown where every "
            "counted set has it).", "",
            _markdown(header, rows), ""]
    table_no += 1
    header, rows, _ = worse_table(metrics, order)
    if rows:
        out += [f"## Table {table_no}: made worse (>{WORSE_DB:g} dB)", "",
                f"Share of each set's images whose PSNR is more than {WORSE_DB:g} dB below the degraded input's "
                "(the design's \"never makes an image worse\", measured per image); means are over the sets. "
                "Every mode's share is in metrics.json (`<group>/<set>/<mode>/worse`).", "",
                _markdown(header, rows), ""]
    return out


def _regions_note(metrics: dict, sets: list[SetResult]) -> list[str]:
    """What a regions table compares, and how well the pw maps found the regions."""
    note = ("Each image is split into regions, each with one degradation (or none). Oracle: the set's adapters "
            "blended uniformly over the whole image; Oracle (pixel-wise): at each pixel its region's adapter "
            "(the backbone alone on clean regions and on degradations without an adapter).")
    accuracy = [(r.spec.name, metrics.get(f"regions/{r.spec.name}/pw/{MAP_ACCURACY}")) for r in sets]
    accuracy = [(name, value) for name, value in accuracy if value is not None]
    if accuracy:
        note += (" PW map accuracy (share of pixels whose strongest map column, an adapter or the backbone "
                 "alone, is the true one): " + ", ".join(f"`{name}` {100 * value:.0f}%" for name, value in accuracy)
                 + ".")
    return [note, ""]


def _sets_table(results: list[SetResult], table_no: int) -> list[str]:
    size_rows = []
    for r in results:
        sizes = sorted(set(r.sizes))
        size_text = ", ".join(f"{w}x{h}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        size_rows.append([f"`{r.spec.name}`", r.spec.group, r.spec.describe(), ", ".join(r.spec.task) or "-",
                          baselines.describe(r.spec.task), str(r.images), size_text])
    return [f"## Table {table_no}: evaluation sets", "",
            _markdown(["Set", "Group", "Images from", "Right adapter(s)", "Classical baseline", "Images", "Size (WxH)"],
                      size_rows), ""]


def _estimator_section(confusion: dict | None) -> list[str]:
    out = ["## Degradation estimator", ""]
    if confusion is None or not confusion["rows"]:
        return out + ["No estimator in the checkpoints (or no single-degradation set): OH/SW not evaluated.", ""]
    if confusion["accuracy"] is not None:
        out += [f"Accuracy on the known single-degradation sets: **{confusion['accuracy']:.3f}** "
                f"({confusion['correct']}/{confusion['total']} images, argmax of the estimator vs the set's task). "
                "Unseen sets are listed to show which adapter the estimator reaches for.", ""]
    header = ["Set (truth)", *[f"-> {n}" for n in confusion["names"]]]
    rows = [[f"{row['set']} ({row['truth']}{', unseen' if row['group'] == 'unseen' else ''})",
             *[str(c) for c in row["counts"]]] for row in confusion["rows"]]
    return out + [_markdown(header, rows), ""]


def _plot_links(results: list[SetResult], confusion: dict | None, tree: dict) -> list[str]:
    out = ["## Plots", "", "![radar](plots/radar.png)", ""]
    out += [f"- [{GROUP_TITLES[g]}](plots/bars_{g}.png)" for g in GROUPS if g in tree]
    if confusion is not None and confusion["rows"]:
        out.append("- [Estimator confusion](plots/confusion.png)")
    out += [f"- strip `{r.spec.name}`: [input / output{' / pw and its weight map' if r.strips.get('pw_map') else ''}"
            f"{' / true weights' if r.strips.get('true_map') else ''} / target](plots/strips/{r.spec.name}.png)"
            for r in results if r.strips.get("output")]
    return out


def results_markdown(metrics: dict, results: list[SetResult], confusion: dict | None, info: dict) -> str:
    tree = metrics_tree(metrics)
    # The group tables, the OH/SW/oracle table and the "made worse" table come first, numbered from 1.
    sets_table_no = sum(group in tree for group in GROUPS) + 2 + bool(worse_table(metrics)[1])
    out = _preamble(results, info) + _group_sections(metrics, results, tree) + _sets_table(results, sets_table_no)
    out += _estimator_section(confusion)
    out += ["## Parameters", "",
            _markdown(["Component", "Parameters"],
                      [[k, f"{metrics[f'params/{k}']:,}"] for k in ("backbone", "adapters", "estimator", "total")]), ""]
    out += _plot_links(results, confusion, tree)
    return "\n".join(out) + "\n"
