"""Targets and reports: the seeds' summary, the targets, compat.json/compat.md tables, the README table, the
training curves.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from typing import Any, Optional, Sequence

import numpy as np

from bench.settings import BCT, INDEPENDENT, L2, LCE, LCE_INSTANCE, LCE_TRANSFORM, METRICS, TARGET_METHODS


# ---------------------------------------------------------------------------------------------------
# Targets and reports


ROUTES = ("backward", "forward")
SEED_SCENARIOS = ("S1", "S2")
SEED_METHODS = TARGET_METHODS  # independent, lce, lce-instance
UPDATE_GAIN_TARGET = 0.5      # S2: forward update gain of lce-instance, top-1 and mAP
FORWARD_MARGIN_TARGET = 0.005  # S1: M(lce-instance, T12(old)) - M(old, old) on top-1, every seed
SACRIFICE_TARGET = 0.97        # new/new of lce-instance over independent new/new, top-1 and mAP


def _mean_entry(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean top-1 / top-5 / mAP of several seeds' metric entries (no interval: each seed keeps its own)."""
    return {m: round(float(np.mean([e[m] for e in entries])), 4) for m in ("top1", "top5", "mAP")}


def seed_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the rows that decide the targets, and each seed's criterion verdicts.

    Args:
      per_seed: {seed: {"old": entry, "independent": row, "lce": row, "lce-instance": row}} (rows as `_row` makes
        them; a method missing from every seed is left out).

    Returns:
      {"seeds": [...], "old_old": mean entry, "<method>": {"new_new": mean, "<route>": {"new_old": mean,
       "criterion": on the means, "per_seed_pass": {seed: bool}, "disagreeing_seeds": [...], "per_seed_gap":
       {seed: {metric: M(new, route) - M(old, old) of that seed}}, "update_gain": on the means}},
       "sacrifice": {method: new/new over independent new/new, on the means}}.
    """
    seeds = sorted(per_seed)
    old_old = _mean_entry([per_seed[k]["old"] for k in seeds])
    out: dict[str, Any] = {"seeds": seeds, "old_old": old_old}
    methods = [m for m in SEED_METHODS if all(m in per_seed[k] for k in seeds)]
    means_new_new = {method: _mean_entry([per_seed[k][method]["new_new"] for k in seeds]) for method in methods}
    for method in methods:
        entry: dict[str, Any] = {"new_new": means_new_new[method]}
        for route in ROUTES:
            rows = [per_seed[k][method][route] for k in seeds]
            if any(r["new_old"] is None for r in rows):
                entry[route] = None
                continue
            mean = _mean_entry([r["new_old"] for r in rows])
            criterion = {m: bool(mean[m] > old_old[m]) for m in METRICS}
            criterion["pass"] = all(criterion.values())
            per_seed_pass = {k: bool(r["criterion"]["pass"]) for k, r in zip(seeds, rows)}
            ind = means_new_new[INDEPENDENT]
            entry[route] = {
                "new_old": mean, "criterion": criterion, "per_seed_pass": per_seed_pass,
                "disagreeing_seeds": [k for k, ok in per_seed_pass.items() if ok != criterion["pass"]],
                "per_seed_gap": {k: {m: round(r["new_old"][m] - per_seed[k]["old"][m], 4) for m in METRICS}
                                 for k, r in zip(seeds, rows)},
                "update_gain": {m: round((mean[m] - old_old[m]) / (ind[m] - old_old[m]), 4)
                                if ind[m] != old_old[m] else float("nan") for m in METRICS}}
        out[method] = entry
    out["sacrifice"] = {method: {m: round(means_new_new[method][m] / means_new_new[INDEPENDENT][m], 4) for m in METRICS}
                        for method in methods if method != INDEPENDENT}
    return out


def check_targets(scenarios: dict[str, Any], seeds: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured numbers (met or missed, by how much).

    S1 and S2 are judged on the mean over seeds (`seeds`: {scenario: seed_summary}) when given, else on the
    scenario's single run; the held-out test classes throughout. Entries with "info": True are reported beside the
    targets but are none (lce's rows, the paper's criterion; the S5 chains other than the direct one).
    """
    targets: list[dict[str, Any]] = []

    def add(target: str, met: bool, detail: str, info: bool = False) -> None:
        targets.append({"target": target, "met": bool(met), "detail": detail, **({"info": True} if info else {})})

    def single_seed(key):
        rows = {r["method"]: r for r in scenarios[key]["rows"]}
        seed = scenarios[key].get("seed", 0)
        old_old = rows["old"]["new_new"]
        summary = {"seeds": [seed], "old_old": old_old}
        for method in SEED_METHODS:
            if method not in rows:
                continue
            summary[method] = {"new_new": rows[method]["new_new"]}
            for route in ROUTES:
                r = rows[method][route]
                summary[method][route] = None if r["new_old"] is None else {
                    **r, "per_seed_pass": {}, "disagreeing_seeds": [],
                    "per_seed_gap": {seed: {m: round(r["new_old"][m] - old_old[m], 4) for m in METRICS}}}
        summary["sacrifice"] = {m: rows[m]["new_model_sacrifice"] for m in SEED_METHODS if m in rows and m != INDEPENDENT}
        return summary

    def criterion(key, method, route, summary, over, info=False):
        entry = summary[method][route]
        if entry is None:
            add(f"{key}: {method} {route} route meets the criterion on top-1 and mAP ({over})", False,
                "route not defined", info)
            return
        gaps = {m: entry["new_old"][m] - summary["old_old"][m] for m in METRICS}
        disagree = (f"; seeds disagreeing with the mean's verdict: {entry['disagreeing_seeds']}"
                    if entry["disagreeing_seeds"] else "")
        label = f"M({method}, T12(old))" if route == "forward" else f"M({method}, old)"
        add(f"{key}: {method} {route} route meets the criterion on top-1 and mAP ({over})"
            + ("; the paper's criterion, reported" if info else ""),
            entry["criterion"]["pass"],
            f"{label} - M(old, old): top-1 {gaps['top1']:+.4f}, mAP {gaps['mAP']:+.4f}; update gain "
            f"top-1 {entry['update_gain']['top1']:.2f}, mAP {entry['update_gain']['mAP']:.2f}{disagree}", info)

    def update_gain(key, method, summary, over, info=False):
        entry = summary[method]["forward"]
        ug = entry["update_gain"]
        add(f"{key}: {method} forward update gain >= {UPDATE_GAIN_TARGET} on top-1 and mAP ({over})"
            + ("; reported" if info else ""), all(ug[m] >= UPDATE_GAIN_TARGET for m in METRICS),
            f"update gain top-1 {ug['top1']:.2f}, mAP {ug['mAP']:.2f}; M({method}, T12(old)) "
            f"{entry['new_old']['top1']:.4f} / {entry['new_old']['mAP']:.4f}, M(old, old) "
            f"{summary['old_old']['top1']:.4f} / {summary['old_old']['mAP']:.4f}, M(new*, new*) "
            f"{summary[INDEPENDENT]['new_new']['top1']:.4f} / {summary[INDEPENDENT]['new_new']['mAP']:.4f}", info)

    def margin(key, method, summary, info=False):
        gaps = {k: g["top1"] for k, g in summary[method]["forward"]["per_seed_gap"].items()}
        add(f"{key}: {method} forward top-1 margin >= +{FORWARD_MARGIN_TARGET * 100:g} points on every seed "
            f"(M({method}, T12(old)) - M(old, old) >= {FORWARD_MARGIN_TARGET}; seeds "
            f"{', '.join(map(str, gaps))})" + ("; reported" if info else ""),
            all(g >= FORWARD_MARGIN_TARGET for g in gaps.values()),
            "per seed: " + ", ".join(f"{k}: {g:+.4f}" for k, g in gaps.items()), info)

    for key in SEED_SCENARIOS:
        if key not in scenarios and key not in (seeds or {}):
            continue
        summary = (seeds or {}).get(key) or single_seed(key)
        over = f"mean of seeds {', '.join(map(str, summary['seeds']))}" if len(summary["seeds"]) > 1 else "one seed"
        criterion(key, LCE_INSTANCE, "backward", summary, over)
        if key == "S2":
            update_gain(key, LCE_INSTANCE, summary, over)
        if key == "S1":
            margin(key, LCE_INSTANCE, summary)
        ratio = summary["sacrifice"][LCE_INSTANCE]
        add(f"{key}: {LCE_INSTANCE} new/new >= {SACRIFICE_TARGET} x independent new/new ({over})",
            all(ratio[m] >= SACRIFICE_TARGET for m in METRICS), f"ratio top-1 {ratio['top1']:.4f}, mAP {ratio['mAP']:.4f}")
        ind = summary[INDEPENDENT]["backward"]
        add(f"{key}: independent fails the backward criterion (sanity; {over})",
            ind is None or not ind["criterion"]["pass"],
            "no comparable embedding" if ind is None else
            f"M(new*, old) top-1 {ind['new_old']['top1']:.4f}, mAP {ind['new_old']['mAP']:.4f}")
        # lce (the paper's method) is reported, not a target: the extra seeds do not train it (run_seeds).
        lce_summary, lce_over = (summary, over) if LCE in summary else (single_seed(key), "seed 0 only")
        criterion(key, LCE, "backward", lce_summary, lce_over, info=True)
        if key == "S2":
            update_gain(key, LCE, lce_summary, lce_over, info=True)
        if key == "S1":
            margin(key, LCE, lce_summary, info=True)
    if "S5" in scenarios:
        s5 = scenarios["S5"]

        def pairs(chain):
            return "; ".join(f"{p['new']} vs {p['via']}: top-1 {_yn(p['pass']['top1'])}, mAP {_yn(p['pass']['mAP'])}"
                             for p in s5["forward_pairs"] if chain in p.get("chains", (chain,)))

        for chain, field, text, info in (
                ("direct", "average_compatibility_direct", "direct transformations (T12, T23, T13: each applied to "
                 "the gallery's own vectors)", False),
                ("composed", "average_compatibility_forward", "composed transformations (T12, T23, T23.T12)", True)):
            if field not in s5:
                continue
            ac = s5[field]
            add(f"S5: chain average compatibility through {text} = 1.0 (top-1 and mAP)" + ("; reported" if info else ""),
                all(ac[m] == 1.0 for m in METRICS), f"AC top-1 {ac['top1']:.4f}, mAP {ac['mAP']:.4f} ({pairs(chain)})",
                info)
        backward = s5["average_compatibility"]
        add("S5: chain average compatibility without transformations (backward, M(vt, vk)) = 1.0; reported",
            all(backward[m] == 1.0 for m in METRICS), f"AC top-1 {backward['top1']:.4f}, mAP {backward['mAP']:.4f}",
            True)
    return targets


def cost_parts(models: Sequence[dict[str, Any]], transforms: Sequence[dict[str, Any]], part_seconds: dict[str, float],
               wall: float) -> list[dict[str, Any]]:
    """Where the wall time went: per part of the run (a scenario, the extra seeds), the models trained there and their
    training seconds, the T12 fits and their seconds, and the rest (embeddings, centers, metrics with their bootstrap
    intervals, heatmaps); then the run's remainder (data, reports) and the total."""
    out = []
    for part, seconds in part_seconds.items():
        mine = (lambda where: where == part or (part == "seeds" and str(where).startswith("seed ")))
        trained = [r["seconds"] for r in models if mine(r.get("trained_in"))]
        fitted = [t["seconds"] for t in transforms if mine(t.get("part"))]
        out.append({"part": part, "models": len(trained), "training_seconds": round(sum(trained), 1),
                    "fits": len(fitted), "fit_seconds": round(sum(fitted), 1),
                    "other_seconds": round(seconds - sum(trained) - sum(fitted), 1), "seconds": round(seconds, 1)})
    rest = wall - sum(part_seconds.values())
    out.append({"part": "data and reports", "models": 0, "training_seconds": 0.0, "fits": 0, "fit_seconds": 0.0,
                "other_seconds": round(rest, 1), "seconds": round(rest, 1)})
    out.append({"part": "total", **{k: round(sum(p[k] for p in out), 1) for k in
                                     ("models", "training_seconds", "fits", "fit_seconds", "other_seconds")},
                "seconds": round(wall, 1)})
    return out


def cost_table(cost: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown table of `cost_parts`."""
    lines = ["| part | models trained | training min | T12 fits | fitting min | evaluation and the rest min | "
             "total min |", "|---|---|---|---|---|---|---|"]
    for p in cost:
        bold = "**" if p["part"] == "total" else ""
        lines.append(f"| {bold}{p['part']}{bold} | {p['models']} | {p['training_seconds'] / 60:.1f} | {p['fits']} | "
                     f"{p['fit_seconds'] / 60:.1f} | {p['other_seconds'] / 60:.1f} | {bold}{p['seconds'] / 60:.1f}{bold} |")
    return lines


def results_table(report: dict[str, Any]) -> list[str]:
    """The README's results table: one row per scenario and route (old/old, lce-instance when the run has it, LCE,
    independent, the best baseline by the mean of top-1 and mAP, the criterion of lce-instance and of LCE). S1 and S2
    show the mean over seeds when the report has them."""
    instance = any(r["method"] == LCE_INSTANCE for sc in report["scenarios"].values() for r in sc.get("rows", ()))
    lines = ["| scenario | route | old/old top-1 / mAP | " + (f"{LCE_INSTANCE} | " if instance else "")
             + "LCE | independent | best baseline | " + (f"{LCE_INSTANCE} criterion top-1 / mAP | " if instance else "")
             + "LCE criterion top-1 / mAP |", "|---|---|---|---|---|---|---|" + ("---|---|" if instance else "")]

    def cell(entry):
        return "n/a" if entry is None else f"{entry['top1']:.3f} / {entry['mAP']:.3f}"

    def crit_cell(crit):
        return f"{_yn(crit['top1'])} / {_yn(crit['mAP'])}" if crit else "n/a"

    for key, sc in report["scenarios"].items():
        if "rows" not in sc or key == "cross":
            continue
        rows = {r["method"]: r for r in sc["rows"]}
        lce_name = LCE if LCE in rows else LCE_TRANSFORM
        summary = report.get("seeds", {}).get(key)
        old_old = summary["old_old"] if summary else rows["old"]["new_new"]
        label = f"{key} {sc['title']}" + (f" (mean of {len(summary['seeds'])} seeds)" if summary else "")
        for route in ROUTES:
            values, own = {}, ""
            for method, name in ((LCE_INSTANCE, LCE_INSTANCE), (LCE, lce_name), (INDEPENDENT, INDEPENDENT)):
                if summary and method in summary:
                    entry = summary[method][route]
                    values[method] = (entry and entry["new_old"], entry["criterion"] if entry else None)
                    continue
                entry = rows[name][route] if name in rows else {"new_old": None}
                if entry["new_old"] is None and route == "forward" and "forward_own" in rows.get(name, {}):
                    entry, own = rows[name]["forward_own"], ", own T12"  # lce-transform's jointly trained T12
                values[method] = (entry["new_old"], entry.get("criterion")) if entry["new_old"] else (None, None)
            baselines = [(m, rows[m][route]["new_old"]) for m in (BCT, L2) if m in rows and rows[m][route]["new_old"]]
            best = max(baselines, key=lambda b: b[1]["top1"] + b[1]["mAP"], default=None)
            lines.append(f"| {label if route == 'backward' else ''} | {route} | {cell(old_old) if route == 'backward' else ''}"
                         + (f" | {cell(values[LCE_INSTANCE][0])}" if instance else "")
                         + f" | {cell(values[LCE][0])}{'' if lce_name == LCE else f' ({LCE_TRANSFORM}{own})'} | "
                         f"{cell(values[INDEPENDENT][0])} | " + (f"{best[0]} {cell(best[1])}" if best else "n/a") + " | "
                         + (f"{crit_cell(values[LCE_INSTANCE][1])} | " if instance else "")
                         + f"{crit_cell(values[LCE][1])} |")
    return lines


def _fmt(entry: Optional[dict], metric: str, ci: bool = True) -> str:
    if entry is None:
        return "n/a"
    text = f"{entry[metric]:.3f}"
    if ci and f"{metric}_ci95" in entry:
        low, high = entry[f"{metric}_ci95"]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _yn(value: Optional[bool]) -> str:
    return "n/a" if value is None else ("pass" if value else "FAIL")


def _route_cells(route: Optional[dict[str, Any]]) -> str:
    """'top-1 [CI] | mAP [CI] | criterion top-1 / mAP | UG top-1 / mAP' of one route (4 cells)."""
    if not route or route.get("new_old") is None:
        return "n/a | n/a | n/a | n/a"
    crit, ug = route["criterion"], route.get("update_gain")
    return (f"{_fmt(route['new_old'], 'top1')} | {_fmt(route['new_old'], 'mAP')} | {_yn(crit['top1'])} / "
            f"{_yn(crit['mAP'])} | " + (f"{ug['top1']:.2f} / {ug['mAP']:.2f}" if ug else "n/a"))


def scenario_table(scenario: dict[str, Any]) -> list[str]:
    """The markdown table of one upgrade scenario (S1-S4, cross): both routes side by side."""
    lines = ["| model | M(self, self) top-1 / mAP | route | M(model, old route) top-1 [95% CI] | mAP [95% CI] | "
             "criterion top-1 / mAP | update gain top-1 / mAP | sacrifice top-1 / mAP |",
             "|---|---|---|---|---|---|---|---|"]
    for row in scenario["rows"]:
        if row["method"] == "old":
            lines.append(f"| old: {row['model']} | {_fmt(row['new_new'], 'top1')} / {_fmt(row['new_new'], 'mAP')} | "
                         "(= the bar M(old, old)) | | | | | |")
            continue
        sac = row.get("new_model_sacrifice")
        own = f"{_fmt(row['new_new'], 'top1', False)} / {_fmt(row['new_new'], 'mAP', False)}"
        sacrifice = f"{sac['top1']:.3f} / {sac['mAP']:.3f}" if sac else "n/a"
        objective = row["forward"].get("objective")
        routes = [("backward", "backward")]
        if not row["forward"].get("not_measured"):
            routes.append(("forward", "forward (fitted T12" + (f", {objective})" if objective else ")")))
        if "forward_cosine" in row:
            routes.append(("forward_cosine", "forward (fitted T12, cosine)"))
        if "forward_own" in row:
            routes.append(("forward_own", "forward (own T12)"))
        for i, (key, label) in enumerate(routes):
            first = i == 0
            lines.append(f"| {row['method'] if first else ''} | {own if first else ''} | {label} | "
                         f"{_route_cells(row.get(key))} | {sacrifice if first else ''} |")
    for method, reason in scenario.get("not_applicable", {}).items():
        lines.append(f"| {method} | not applicable: {reason} | | | | | | |")
    skipped = [row["method"] for row in scenario["rows"] if row.get("forward", {}).get("not_measured")]
    if skipped:
        lines.append(f"\nForward route through a fitted T12 not measured for {', '.join(skipped)}: rows that decide no "
                     "target get no fit (about 40 s each on the full profile).")
    return lines


def seeds_table(key: str, summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The seeds of one scenario: each seed's M(old, old) and both routes of the target rows (TARGET_METHODS), then
    the mean (on which the targets are judged)."""
    lines = [f"### {key}: {len(summary['seeds'])} seeds", "",
             "| seed | M(old, old) top-1 / mAP | model | M(self, self) top-1 / mAP | backward top-1 / mAP | "
             "forward top-1 / mAP |", "|---|---|---|---|---|---|"]

    def pair(entry):
        return "n/a" if entry is None else f"{entry['top1']:.3f} / {entry['mAP']:.3f}"

    def cis(entry):
        if entry is None:
            return "n/a"
        return (f"{entry['top1']:.3f} [{entry['top1_ci95'][0]:.3f}, {entry['top1_ci95'][1]:.3f}] / "
                f"{entry['mAP']:.3f} [{entry['mAP_ci95'][0]:.3f}, {entry['mAP_ci95'][1]:.3f}]")

    methods = [m for m in SEED_METHODS if m in summary]
    for seed in summary["seeds"]:
        for i, method in enumerate(methods):
            row = per_seed[seed][method]
            lines.append(f"| {seed if i == 0 else ''} | {cis(per_seed[seed]['old']) if i == 0 else ''} | {method} | "
                         f"{pair(row['new_new'])} | {cis(row['backward']['new_old'])} | {cis(row['forward']['new_old'])} |")
    for i, method in enumerate(methods):
        entry = summary[method]
        lines.append(f"| **mean** | {pair(summary['old_old']) if i == 0 else ''} | {method} | {pair(entry['new_new'])} | "
                     + " | ".join(pair(entry[r]['new_old'] if entry[r] else None) + (
                         f" ({_yn(entry[r]['criterion']['pass'])})" if entry[r] else "") for r in ROUTES) + " |")
    for method, route in ((m, r) for m in methods if m != INDEPENDENT for r in ROUTES):
        entry = summary[method][route]
        if entry and entry["disagreeing_seeds"]:
            lines.append(f"\n{method} {route}: seed(s) {', '.join(map(str, entry['disagreeing_seeds']))} disagree with the "
                         f"mean's verdict ({_yn(entry['criterion']['pass'])}); per seed: "
                         + ", ".join(f"{k}: {_yn(v)}" for k, v in entry["per_seed_pass"].items()) + ".")
    return lines


def write_markdown(path: str, report: dict[str, Any]) -> None:
    m = report["machine"]
    lines = [f"# lce-tf compatibility benchmark ({report['profile']['name']})", "",
             f"- date: {report['date']}; wall time: {report['wall_time_seconds'] / 60:.1f} min "
             f"(training {report['training_seconds'] / 60:.1f} min)",
             f"- machine: {m['hostname']}, {m['cpu']}, {m['cpus_available']} CPU cores available, "
             f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end; "
             f"Python {m['python']}, TensorFlow {m['tensorflow']}, lce_tf {report['lce_tf_version']}",
             f"- seed: {report['seed']} (every model; TensorFlow op determinism on, "
             f"{m.get('tf_inter_op_threads') or 'default'} inter-op threads)",
             f"- command: `{report['command']}`"]
    d = report["dataset"]
    lines.append(f"- data: {d['kind']} ({d['path']}): {d['train_classes']} training classes / {d['train_images']} "
                 f"images; {d['test_classes']} held-out test classes, {d['query_images']} queries, "
                 f"{d['gallery_images']} gallery images"
                 + (f"; {d['font_designs']} font designs, query fonts {', '.join(d['query_fonts'])}"
                    if d.get("font_designs") else "") + f"; images {'x'.join(map(str, d['image_shape']))}")
    p = report["profile"]
    lines.append(f"- training: {p['epochs']} epochs (old models {p['old_epochs']}), batch {p['batch_size']}, Adam "
                 f"1e-3, 2-px random shifts; new network {p['new_arch']} {p['dim']}-d ArcFace s=16 m=0.1; LCE "
                 f"boundary {p['boundary']}, λ_a = {p['lambda_align']:g}, λ_b = {p['lambda_boundary']:g}; "
                 f"BCT/L2 weight {p['lambda_compat']:g}; BCT uses the old class centers as the old classifier")
    if report.get("validation"):
        lines.append(f"- LCE settings chosen on training classes only: {report['validation']}")
    lines += ["", "M(Q, G): queries embedded by Q, gallery by G, on the held-out test classes. Two upgrade routes: "
              "backward M(new, old), new queries against the untouched old gallery (transformation models answer "
              "through T21; the paper's criterion); forward M(new, T12(old)), new queries against the old gallery's "
              "vectors moved into the new space by a T12 fitted on the training pairs (lce_tf.transform_fit defaults; "
              "no image re-encoded; the target rows of S1 and S2 also through a cosine-only T12 when the default fit "
              "objective is another one, seed 0). Criterion: M(new, route) > M(old, old). Update gain: (M(new, route) − M(old, old)) "
              "/ (M(new*, new*) − M(old, old)). Sacrifice: M(new, new) / M(new*, new*), new* = the independently "
              "trained new model. Intervals: 95% bootstrap over the queries.", ""]
    lines += ["## Targets", ""]
    for t in report["targets"]:
        if t.get("info"):
            continue
        lines.append(f"- {'met' if t['met'] else '**MISSED**'}: {t['target']} ({t['detail']})")
    info = [t for t in report["targets"] if t.get("info")]
    if info:
        lines += ["", "Reported beside the targets (not targets):", ""]
        lines += [f"- {'yes' if t['met'] else 'no'}: {t['target']} ({t['detail']})" for t in info]
    if report.get("seeds"):
        methods = ", ".join(m for m in SEED_METHODS if m in next(iter(report["seeds"].values())))
        lines += ["", "## Seeds", "", f"The rows that decide the targets (old, {methods} in S1 and S2, both "
                  "routes) trained with every seed (data, splits and settings fixed); the targets are judged on the "
                  "mean. Each seed's values carry their own 95% bootstrap interval.", ""]
        for key, summary in report["seeds"].items():
            per_seed = {int(k): v for k, v in report["seed_rows"][key].items()}
            lines += seeds_table(key, summary, per_seed) + [""]
    if report.get("curves"):
        lines += ["", "## Training curves", "", "Per-epoch training loss (classification term) of the old and new "
                  "models of S1 and S2 (seed 0); 'last-epoch change' in the models table is the relative drop of the "
                  "loss over the last epoch (small = converged at this learning rate).", "",
                  f"![training curves]({report['curves']})"]
    for key, sc in report["scenarios"].items():
        lines += ["", f"## {key}: {sc['title']}", "", sc["description"] + ".", ""]
        if key == "S5":
            versions = list(sc["versions"])
            lines += ["| query \\ gallery | " + " | ".join(versions) + " |", "|---" * (len(versions) + 1) + "|"]
            entries = {(e["query"], e["gallery"]): e for e in sc["matrix"]}
            for metric in METRICS:
                for q in versions:
                    lines.append(f"| {q} ({metric}) | " + " | ".join(_fmt(entries[(q, g)], metric) for g in versions) + " |")
            ac = sc["average_compatibility"]
            pair_text = ", ".join(f"{q['new']}→{q['old']}: top-1 {_yn(q['top1'])}, mAP {_yn(q['mAP'])}"
                                  for q in sc["pairs"])
            lines += ["", f"Without transformations (backward, M(vt, vk)): average compatibility top-1 {ac['top1']:.2f}, "
                      f"mAP {ac['mAP']:.2f} ({pair_text}).", "", "| forward pair | chains | top-1 [95% CI] | mAP [95% CI] | "
                      "bar M(old, old) top-1 / mAP | criterion top-1 / mAP |", "|---|---|---|---|---|---|"]
            for q in sc["forward_pairs"]:
                bar = entries[(q["old"], q["old"])]
                lines.append(f"| M({q['new']}, {q['via']}) | {', '.join(q.get('chains', ['composed']))} | "
                             f"{_fmt(q, 'top1')} | {_fmt(q, 'mAP')} | {bar['top1']:.3f} / {bar['mAP']:.3f} | "
                             f"{_yn(q['pass']['top1'])} / {_yn(q['pass']['mAP'])} |")
            acf = sc["average_compatibility_forward"]
            text = ""
            if "average_compatibility_direct" in sc:
                acd = sc["average_compatibility_direct"]
                text = (f"Through direct transformations (T12(v1), T23(v2), T13(v1): every T applied to the gallery's "
                        f"own vectors): average compatibility top-1 {acd['top1']:.2f}, mAP {acd['mAP']:.2f}. ")
            lines += ["", text + f"Through composed transformations (T12(v1), T23(v2), T23.T12(v1)): average "
                      f"compatibility top-1 {acf['top1']:.2f}, mAP {acf['mAP']:.2f}."]
        else:
            lines += scenario_table(sc)
            for row in sc["rows"]:
                if row.get("note"):
                    lines.append(f"\n- {row['method']}: {row['note']}")
        lines += ["", f"![{key} heatmap]({sc['heatmap']})"]
    if report.get("analysis"):
        lines += ["", "## Analysis", ""] + report["analysis"]
    if report.get("cost"):
        lines += ["", "## Cost", "", "Wall time per part of this run, measured: the models trained in each part, the "
                  "T12 fits (forward route), and the rest (embeddings, class centers, retrieval metrics with their "
                  "bootstrap intervals, heatmaps). A model shared by several scenarios is counted where it was "
                  "trained first.", ""] + cost_table(report["cost"])
    lines += ["", "## Models", "", "Each distinct model is trained once per seed; 'used in' lists the scenarios that "
              "share it (identical settings and seed).", "",
              "| model | seed | settings | trained on | seconds | used in | last epoch | last-epoch change of the loss |",
              "|---|---|---|---|---|---|---|---|"]
    for rec in report["models"]:
        spec = rec["spec"]
        settings = f"{spec['arch']} {spec['dim']}-d {spec['loss']} {spec['compat']}" + (
            f" vs {rec['parent']}" if rec.get("parent") else "")
        final = ", ".join(f"{k} {v}" for k, v in rec["final_epoch"].items())
        losses = rec.get("history", {}).get("loss", [])
        change = f"{(losses[-1] - losses[-2]) / losses[-2]:+.1%}" if len(losses) > 1 and losses[-2] else "n/a"
        lines.append(f"| {rec['name']} | {rec.get('seed', report['seed'])} | {settings} | {rec['train_classes']} classes, "
                     f"{spec['epochs']} epochs | {rec['seconds']} | {', '.join(rec.get('used_in', []))} | {final} | "
                     f"{change} |")
    if report.get("transforms"):
        lines += ["", "Fitted transformations T12 (forward route): " + "; ".join(
            f"{t['old']} -> {t['new']}" + (f" ({t['objective']}, seed {t.get('seed', report['seed'])})"
                                             if "objective" in t else "")
            + f" ({t['pairs']} pairs, loss {t['fit_loss']}, {t['seconds']} s)"
            for t in report["transforms"]) + "."]
    _write_text(path, "\n".join(lines) + "\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_with_analysis(path: str, notes_path: str) -> dict[str, Any]:
    """A results JSON (e.g. compat.json) with its "analysis" field set to the markdown lines of `notes_path`
    (`--annotate`: the analysis of a run lives next to that run's numbers, which are untouched).

    Raises:
      ValueError: `path` does not exist (the benchmark has not run).
    """
    if not os.path.exists(path):
        raise ValueError(f"--annotate: {path} does not exist; run the benchmark first")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    with open(notes_path, encoding="utf-8") as f:
        report["analysis"] = f.read().rstrip("\n").splitlines()
    return report


def machine_info() -> dict[str, Any]:
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu,
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def plot_training_curves(records: Sequence[dict[str, Any]], path: str) -> str:
    """The per-epoch classification loss of the S1/S2 old and new models (seed 0) as one PNG."""
    from lce_tf.report import plot_curves

    curves = {}
    for rec in records:
        history = rec.get("history", {})
        loss = history.get("cls_loss") or history.get("loss")
        if loss and rec["name"].split(" ")[0] in ("S1", "S2", "new*") and rec.get("seed", 0) == 0 and \
                rec["spec"]["compat"] in (INDEPENDENT, LCE):
            curves[rec["name"]] = (list(range(1, len(loss) + 1)), loss)
    plot_curves(curves, xlabel="epoch", ylabel="training loss (classification term)",
                title="Training curves (S1 / S2, seed 0)", path=path)
    return os.path.basename(path)


def _read_validation_choice(out_dir: str) -> Optional[str]:
    path = os.path.join(out_dir, "validation.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        chosen = json.load(f).get("chosen")
    return None if not chosen else (f"boundary {chosen['boundary']}, λ_a = {chosen['lambda_align']:g}, "
                                    f"λ_b = {chosen['lambda_boundary']:g} (validation.md)")
