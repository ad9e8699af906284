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

from bench.settings import BCT, INDEPENDENT, L2, LCE, LCE_TRANSFORM, METRICS


# ---------------------------------------------------------------------------------------------------
# Targets and reports


ROUTES = ("backward", "forward")
SEED_SCENARIOS = ("S1", "S2")
SEED_METHODS = (INDEPENDENT, LCE)


def _mean_entry(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean top-1 / top-5 / mAP of several seeds' metric entries (no interval: each seed keeps its own)."""
    return {m: round(float(np.mean([e[m] for e in entries])), 4) for m in ("top1", "top5", "mAP")}


def seed_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the rows that decide the targets, and each seed's criterion verdicts.

    Args:
      per_seed: {seed: {"old": entry, "independent": row, "lce": row}} (rows as `_row` makes them).

    Returns:
      {"seeds": [...], "old_old": mean entry, "<method>": {"new_new": mean, "<route>": {"new_old": mean,
       "criterion": on the means, "per_seed_pass": {seed: bool}, "disagreeing_seeds": [...], "update_gain": on the
       means}}, "sacrifice": LCE new/new over independent new/new, on the means}.
    """
    seeds = sorted(per_seed)
    old_old = _mean_entry([per_seed[k]["old"] for k in seeds])
    out: dict[str, Any] = {"seeds": seeds, "old_old": old_old}
    means_new_new = {method: _mean_entry([per_seed[k][method]["new_new"] for k in seeds]) for method in SEED_METHODS}
    for method in SEED_METHODS:
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
                "update_gain": {m: round((mean[m] - old_old[m]) / (ind[m] - old_old[m]), 4)
                                if ind[m] != old_old[m] else float("nan") for m in METRICS}}
        out[method] = entry
    out["sacrifice"] = {m: round(means_new_new[LCE][m] / means_new_new[INDEPENDENT][m], 4) for m in METRICS}
    return out


def check_targets(scenarios: dict[str, Any], seeds: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured numbers (met or missed, by how much).

    S1 and S2 are judged on the mean over seeds (`seeds`: {scenario: seed_summary}) when given, else on the
    scenario's single run. Forward-route targets have "forward" in their names.
    """
    targets = []

    def single_seed(key):
        rows = {r["method"]: r for r in scenarios[key]["rows"]}
        summary = {"seeds": [scenarios.get("seed", 0)], "old_old": rows["old"]["new_new"]}
        for method in SEED_METHODS:
            summary[method] = {"new_new": rows[method]["new_new"],
                               **{route: {**rows[method][route], "per_seed_pass": {}, "disagreeing_seeds": []}
                                  if rows[method][route]["new_old"] is not None else None for route in ROUTES}}
        summary["sacrifice"] = rows[LCE]["new_model_sacrifice"]
        return summary

    for key in SEED_SCENARIOS:
        if key not in scenarios and key not in (seeds or {}):
            continue
        summary = (seeds or {}).get(key) or single_seed(key)
        over = f"mean of seeds {', '.join(map(str, summary['seeds']))}" if len(summary["seeds"]) > 1 else "one seed"
        old_old = summary["old_old"]
        for route in ("forward", "backward"):
            entry = summary[LCE][route]
            gaps = {m: entry["new_old"][m] - old_old[m] for m in METRICS}
            disagree = (f"; seeds disagreeing with the mean's verdict: {entry['disagreeing_seeds']}"
                        if entry["disagreeing_seeds"] else "")
            label = "M(LCE, T12(old))" if route == "forward" else "M(LCE, old)"
            targets.append({
                "target": f"{key}: LCE {route} route meets the criterion on top-1 and mAP ({over})",
                "met": bool(entry["criterion"]["pass"]),
                "detail": f"{label} - M(old, old): top-1 {gaps['top1']:+.4f}, mAP {gaps['mAP']:+.4f}; update gain "
                          f"top-1 {entry['update_gain']['top1']:.2f}, mAP {entry['update_gain']['mAP']:.2f}{disagree}"})
        ratio = summary["sacrifice"]
        targets.append({"target": f"{key}: LCE new/new >= 0.97 x independent new/new ({over})",
                        "met": all(ratio[m] >= 0.97 for m in METRICS),
                        "detail": f"ratio top-1 {ratio['top1']:.4f}, mAP {ratio['mAP']:.4f}"})
        ind = summary[INDEPENDENT]["backward"]
        targets.append({"target": f"{key}: independent fails the backward criterion (sanity; {over})",
                        "met": ind is None or not ind["criterion"]["pass"],
                        "detail": "no comparable embedding" if ind is None else
                        f"M(new*, old) top-1 {ind['new_old']['top1']:.4f}, mAP {ind['new_old']['mAP']:.4f}"})
    if "S5" in scenarios:
        ac = scenarios["S5"]["average_compatibility_forward"]
        pairs = "; ".join(f"{p['new']} vs {p['via']}: top-1 {_yn(p['pass']['top1'])}, mAP {_yn(p['pass']['mAP'])}"
                          for p in scenarios["S5"]["forward_pairs"])
        targets.append({"target": "S5: chain average compatibility through composed transformations (forward) = 1.0 "
                                  "(top-1 and mAP)",
                        "met": all(ac[m] == 1.0 for m in METRICS),
                        "detail": f"AC top-1 {ac['top1']:.4f}, mAP {ac['mAP']:.4f} ({pairs})"})
        direct = scenarios["S5"]["average_compatibility"]
        targets.append({"target": "S5: chain average compatibility of the direct chain (backward) = 1.0 (reported)",
                        "met": all(direct[m] == 1.0 for m in METRICS),
                        "detail": f"AC top-1 {direct['top1']:.4f}, mAP {direct['mAP']:.4f}"})
    return targets


def results_table(report: dict[str, Any]) -> list[str]:
    """The README's results table: one row per scenario and route (old/old, LCE, independent, the best baseline by
    the mean of top-1 and mAP, LCE's criterion). S1 and S2 show the mean over seeds when the report has them."""
    lines = ["| scenario | route | old/old top-1 / mAP | LCE | independent | best baseline | LCE criterion top-1 / mAP |",
             "|---|---|---|---|---|---|---|"]

    def cell(entry):
        return "n/a" if entry is None else f"{entry['top1']:.3f} / {entry['mAP']:.3f}"

    for key, sc in report["scenarios"].items():
        if "rows" not in sc or key == "cross":
            continue
        rows = {r["method"]: r for r in sc["rows"]}
        lce_name = LCE if LCE in rows else LCE_TRANSFORM
        summary = report.get("seeds", {}).get(key)
        old_old = summary["old_old"] if summary else rows["old"]["new_new"]
        label = f"{key} {sc['title']}" + (f" (mean of {len(summary['seeds'])} seeds)" if summary else "")
        for route in ROUTES:
            if summary:
                lce = summary[LCE][route] and summary[LCE][route]["new_old"]
                ind = summary[INDEPENDENT][route] and summary[INDEPENDENT][route]["new_old"]
                crit = summary[LCE][route]["criterion"] if summary[LCE][route] else None
            else:
                lce, ind = rows[lce_name][route]["new_old"], rows[INDEPENDENT][route]["new_old"]
                crit = rows[lce_name][route]["criterion"] if lce else None
            baselines = [(m, rows[m][route]["new_old"]) for m in (BCT, L2) if m in rows and rows[m][route]["new_old"]]
            best = max(baselines, key=lambda b: b[1]["top1"] + b[1]["mAP"], default=None)
            lines.append(f"| {label if route == 'backward' else ''} | {route} | {cell(old_old) if route == 'backward' else ''}"
                         f" | {cell(lce)}{'' if lce_name == LCE else f' ({LCE_TRANSFORM})'} | {cell(ind)} | "
                         + (f"{best[0]} {cell(best[1])}" if best else "n/a") + " | "
                         + (f"{_yn(crit['top1'])} / {_yn(crit['mAP'])}" if crit else "n/a") + " |")
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
        routes = [("backward", "backward"), ("forward", "forward (fitted T12)")]
        if "forward_own" in row:
            routes.append(("forward_own", "forward (own T12)"))
        for i, (key, label) in enumerate(routes):
            first = i == 0
            lines.append(f"| {row['method'] if first else ''} | {own if first else ''} | {label} | "
                         f"{_route_cells(row.get(key))} | {sacrifice if first else ''} |")
    for method, reason in scenario.get("not_applicable", {}).items():
        lines.append(f"| {method} | not applicable: {reason} | | | | | | |")
    return lines


def seeds_table(key: str, summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The seeds of one scenario: each seed's M(old, old) and both routes of LCE and the independent model, then
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

    for seed in summary["seeds"]:
        for i, method in enumerate(SEED_METHODS):
            row = per_seed[seed][method]
            lines.append(f"| {seed if i == 0 else ''} | {cis(per_seed[seed]['old']) if i == 0 else ''} | {method} | "
                         f"{pair(row['new_new'])} | {cis(row['backward']['new_old'])} | {cis(row['forward']['new_old'])} |")
    for i, method in enumerate(SEED_METHODS):
        entry = summary[method]
        lines.append(f"| **mean** | {pair(summary['old_old']) if i == 0 else ''} | {method} | {pair(entry['new_new'])} | "
                     + " | ".join(pair(entry[r]['new_old'] if entry[r] else None) + (
                         f" ({_yn(entry[r]['criterion']['pass'])})" if entry[r] else "") for r in ROUTES) + " |")
    for route in ROUTES:
        entry = summary[LCE][route]
        if entry and entry["disagreeing_seeds"]:
            lines.append(f"\nLCE {route}: seed(s) {', '.join(map(str, entry['disagreeing_seeds']))} disagree with the "
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
              "no image re-encoded). Criterion: M(new, route) > M(old, old). Update gain: (M(new, route) − M(old, old)) "
              "/ (M(new*, new*) − M(old, old)). Sacrifice: M(new, new) / M(new*, new*), new* = the independently "
              "trained new model. Intervals: 95% bootstrap over the queries.", ""]
    lines += ["## Targets", ""]
    for t in report["targets"]:
        lines.append(f"- {'met' if t['met'] else '**MISSED**'}: {t['target']} ({t['detail']})")
    if report.get("seeds"):
        lines += ["", "## Seeds", "", "The rows that decide the targets (old, independent and LCE in S1 and S2, both "
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
            lines += ["", f"Direct chain (backward): average compatibility top-1 {ac['top1']:.2f}, mAP {ac['mAP']:.2f} "
                      f"({pair_text}).", "", "| forward pair | via | top-1 [95% CI] | mAP [95% CI] | bar M(old, old) "
                      "top-1 / mAP | criterion top-1 / mAP |", "|---|---|---|---|---|---|"]
            for q in sc["forward_pairs"]:
                bar = entries[(q["old"], q["old"])]
                lines.append(f"| M({q['new']}, {q['via']}) | {q['via']} | {_fmt(q, 'top1')} | {_fmt(q, 'mAP')} | "
                             f"{bar['top1']:.3f} / {bar['mAP']:.3f} | {_yn(q['pass']['top1'])} / {_yn(q['pass']['mAP'])} |")
            acf = sc["average_compatibility_forward"]
            lines += ["", f"Through composed transformations (forward): average compatibility top-1 {acf['top1']:.2f}, "
                      f"mAP {acf['mAP']:.2f}."]
        else:
            lines += scenario_table(sc)
            for row in sc["rows"]:
                if row.get("note"):
                    lines.append(f"\n- {row['method']}: {row['note']}")
        lines += ["", f"![{key} heatmap]({sc['heatmap']})"]
    if report.get("analysis"):
        lines += ["", "## Analysis", ""] + report["analysis"]
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
            f"{t['old']} -> {t['new']} ({t['pairs']} pairs, loss {t['fit_loss']}, {t['seconds']} s)"
            for t in report["transforms"]) + "."]
    _write_text(path, "\n".join(lines) + "\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
