"""The ANN benchmark's targets (recall and speed-up interpolated on the sweeps) and its reports: NAME.md and
NAME.png (recall against QPS).
"""

from __future__ import annotations

import math
import os

from ann.settings import LABELS, TARGET_BRUTE_SPEEDUP, TARGET_RECALL


def _interp_qps(points: list[dict], recall: float, key: str = "qps") -> float | None:
    """QPS of a method's recall/QPS curve at `recall`: log-linear interpolation between neighbouring
    points of its upper envelope; None when the method never reaches that recall."""
    pts = sorted((p["recall_at_10"], p[key]) for p in points)
    envelope = []  # best QPS at each recall or higher
    for r, q in reversed(pts):
        if not envelope or q > envelope[-1][1]:
            envelope.append((r, q))
    envelope.reverse()  # increasing recall, decreasing QPS
    if not envelope or envelope[-1][0] < recall:
        return None
    for (r0, q0), (r1, q1) in zip(envelope, envelope[1:]):
        if r0 <= recall <= r1:
            if r1 == r0:
                return max(q0, q1)
            t = (recall - r0) / (r1 - r0)
            return math.exp(math.log(q0) + t * (math.log(q1) - math.log(q0)))
    return envelope[0][1] if recall <= envelope[0][0] else None


def evaluate_targets(dataset: dict, key: str = "qps") -> dict:
    """The issue-4 targets on one dataset, for every ScaNN setting at recall@10 >= 0.95.

    `key` is "qps" (wall clock) or "qps_cpu" (queries per process CPU second: less sensitive to other
    jobs on a shared machine; equal to wall-clock QPS on an idle core when threads = 1)."""
    methods = dataset["methods"]
    exact = [methods[m]["settings"][0][key] for m in ("brute", "exact-lib") if m in methods]
    brute_qps = max(exact) if exact else None  # the fastest exact search
    hnsw = methods.get("faiss-hnsw", {}).get("settings", [])
    candidates = []
    for method in ("scann", "scann-immutable"):
        for s in methods.get(method, {}).get("settings", []):
            if s["recall_at_10"] < TARGET_RECALL:
                continue
            r = s["recall_at_10"]
            interp = _interp_qps(hnsw, r, key) if hnsw else None
            lower = [p[key] for p in hnsw if TARGET_RECALL <= p["recall_at_10"] <= r]
            hnsw_ref = max([v for v in [interp] + lower if v is not None], default=None)
            candidates.append({
                "method": method, "setting": s["setting"], "recall_at_10": r, "qps": s[key],
                "speedup_vs_brute": s[key] / brute_qps if brute_qps else None,
                "hnsw_qps_at_equal_or_lower_recall": hnsw_ref,
                "meets_brute_target": bool(brute_qps and s[key] >= TARGET_BRUTE_SPEEDUP * brute_qps),
                "meets_hnsw_target": bool(hnsw and (hnsw_ref is None or s[key] >= hnsw_ref)),
            })
    passing = [c for c in candidates if c["meets_brute_target"] and c["meets_hnsw_target"]]
    best = max(passing or candidates, key=lambda c: c["qps"], default=None)
    best_at_target = {}
    for method, result in methods.items():
        ok = [s for s in result["settings"] if s["recall_at_10"] >= TARGET_RECALL]
        if ok:
            top = max(ok, key=lambda s: s[key])
            best_at_target[method] = {"setting": top["setting"], "recall_at_10": top["recall_at_10"],
                                      "qps": top[key]}
        else:
            best_at_target[method] = None
    return {"qps_measure": key, "scann_evaluated": any(m in methods for m in ("scann", "scann-immutable")),
            "brute_qps": brute_qps, "scann_points_at_target_recall": len(candidates),
            "best_scann": best,
            "met": bool(passing), "best_qps_at_recall_0.95": best_at_target,
            "hnsw_reference_rule": "max of FAISS HNSW's QPS interpolated (log-linear, upper envelope) at the "
                                   "ScaNN point's recall and its measured QPS at any setting with "
                                   "0.95 <= recall <= that recall"}


def _setting_text(setting: dict) -> str:
    short = {"leaves_to_search": "leaves", "reorder_num_neighbors": "reorder", "efSearch": "efSearch",
             "nprobe": "nprobe", "k_factor": "k_factor"}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in setting.items()) or "-"


def _target_lines(t: dict, measure: str) -> list[str]:
    lines = [f"Best {measure} at recall@10 >= 0.95:", ""]
    for method, best in t["best_qps_at_recall_0.95"].items():
        text = (f"{best['qps']:,.0f} at recall {best['recall_at_10']:.4f} ({_setting_text(best['setting'])})"
                if best else "never reaches 0.95")
        lines.append(f"- {LABELS[method]}: {text}")
    b = t["best_scann"]
    lines.append("")
    rule = (f"Target on {measure} (ScaNN at recall@10 >= 0.95: >= 20x the QPS of exact brute force, and >= the QPS "
            "of FAISS HNSW at equal or lower recall)")
    if not t["scann_evaluated"]:
        lines.append(f"{rule}: not evaluated (ScaNN was not run).")
    elif b is None:
        lines.append(f"{rule}: **NOT MET**: no ScaNN setting reached recall 0.95.")
    else:
        hnsw = b["hnsw_qps_at_equal_or_lower_recall"]
        lines.append(
            f"{rule}: **{'MET' if t['met'] else 'NOT MET'}**. Best ScaNN point: {LABELS[b['method']]} "
            f"({_setting_text(b['setting'])}), recall {b['recall_at_10']:.4f}, {b['qps']:,.0f} = "
            f"{b['speedup_vs_brute']:.1f}x the fastest exact search ({t['brute_qps']:,.1f}; 20x "
            f"{'met' if b['meets_brute_target'] else 'not met'}); FAISS HNSW at equal or lower recall: "
            + (f"{hnsw:,.0f}" if hnsw else "does not reach this recall")
            + f" ({'met' if b['meets_hnsw_target'] else 'not met'}).")
    return lines + [""]


def _milvus_server_text(result: dict, cpus) -> str:
    """What the milvus-server row measures, in words, with its build parameters and server layout."""
    config, server = result["config"], result["config"].get("server", {})
    segments = server.get("segments")
    layout = (f"the collection served from {len(segments)} sealed segment{'s' if len(segments) > 1 else ''} of "
              f"{min(segments):,} to {max(segments):,} rows (Milvus' default segment sizes; a search visits each "
              "segment's HNSW graph and merges)" if segments else "segment layout not read")
    after = server.get("segments_after_sweep")
    if segments and after and sorted(after) != sorted(segments):
        layout += (f"; after the sweep {len(after)} segments of {min(after):,} to {max(after):,} rows: Milvus compacted "
                   "segments DURING the timed searches and indexed the merged ones, on the same cores, so these QPS "
                   "were measured with that background work running (one reason they are not monotone in ef)")
    version = server.get("server_version", "?")
    if "lite" in version:
        version += ", the name the PyPI package's standalone build reports: a standalone server, not Milvus Lite"
    return (f"**Milvus server row**: ONE Milvus standalone server ({server.get('package', 'milvus')}, server "
            f"{version}) started by the bench on free ports of 127.0.0.1 on this same "
            f"machine, so client and server share its {cpus} logical CPUs: not a cluster, and not a measure of one. "
            f"HNSW with M={config['index_params'].get('M')}, "
            f"efConstruction={config['index_params'].get('efConstruction')} "
            f"(lce_tf's and Milvus' defaults), IP on unit vectors, built and searched through `lce_tf`'s MilvusIndex "
            f"(string ids); {layout}. One client thread sends all queries of a setting as one search request; the "
            "server uses its own threads (not pinned). Build s = insert + flush + index build + load until the query "
            f"node serves every row from sealed, indexed segments (server start-up, "
            f"{config.get('server_start_seconds', 0):.0f} s, not included; then, untimed, "
            f"{config.get('settle_seconds', 0):.0f} s until the server was idle before the searches"
            f"{'' if config.get('settled', True) else ' (it was NOT idle after that limit)'}); "
            "build CPU s and QPS (CPU) include the "
            "server's CPU time; the memory columns add the server's growth over the build. Searches run at the "
            "collection's Strong consistency (lce_tf's setting): each request waits for the server's time tick (about "
            "0.2 s at most), a floor on the time per request. Server configuration: the "
            "package's defaults except every port and the query coordinator's target update every 1 s (default 10 s; "
            "it only shortens the wait for sealed segments).")


def write_markdown(path: str, report: dict) -> None:
    lines = ["# ANN benchmark: recall@10 against queries per second", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             f"- machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
             f"{report['machine'].get('memory_gb', '?')} GB RAM; shared with other jobs: load average "
             f"(1/5/15 min) {report['machine'].get('load_average_at_start')} at the start, "
             f"{report.get('load_average_at_end')} at the end",
             f"- threads: {report['threads']} for every method, build and search (OMP/OpenBLAS/MKL pinned; FAISS "
             f"omp_set_num_threads; ScaNN training and search threads); queries searched as one batch per setting; "
             f"QPS = queries / the fastest of up to 5 timed passes (at least {report['min_time_seconds']} s of them)",
             "- QPS (wall) is wall-clock; QPS (CPU) = queries / process CPU seconds of the same pass, which other "
             "jobs on the shared cores slow down less (with 1 thread it equals wall-clock QPS on an idle core)",
             f"- versions: {report['machine']['versions']}",
             "- memory: each method runs in a fresh process; peak delta = peak RSS during the build - RSS before "
             "the build, resident delta = RSS after the build - RSS before it (the input float32 array and "
             "imported libraries are already resident before the build); peak = VmHWM of /proc/self/status, reset "
             "to the current RSS just before the build (clear_refs); Milvus Lite: its server process's peak RSS "
             "(VmHWM) and RSS after the build are added (the process starts with the build); its CPU time is "
             "added to QPS (CPU) and build CPU s; Milvus server: its growth over the build (VmHWM reset before it) is "
             "added, and its CPU time", ""]
    for name, dataset in report["datasets"].items():
        lines += [f"## {name}: {dataset['n']:,} x {dataset['dim']}, {dataset['queries']:,} queries", ""]
        if dataset.get("description"):
            lines += [dataset["description"], ""]
        if dataset.get("carried_over"):
            c = dataset["carried_over"]
            lines += [f"**Not rerun here**: carried over unchanged from the run of {c['date']} (command `{c['command']}`, "
                      f"machine {c['machine'].get('cpu')}, {c['machine'].get('logical_cpus')} logical CPUs); its "
                      f"methods are those of that run.", ""]
        carried = {}
        for method, result in dataset["methods"].items():
            if result.get("carried_over"):
                c = result["carried_over"]
                carried.setdefault((c["date"], c["command"], c["machine"].get("cpu"), c["machine"].get("logical_cpus")),
                                   []).append(method)
        marks = {}
        for i, ((date, command, cpu, cpus), carried_methods) in enumerate(carried.items()):
            sign = "*" * (i + 1)
            marks.update({m: sign for m in carried_methods})
            fresh = [LABELS[m] for m in dataset["methods"] if m not in marks and not dataset["methods"][m].get(
                "carried_over")]
            lines += [f"Rows marked {sign} (" + ", ".join(LABELS[m] for m in carried_methods) + ") are **not rerun "
                      f"here**: carried over unchanged from the run of {date} (command `{command}`, machine {cpu}, "
                      f"{cpus} logical CPUs) on the same seeded data, their recall as scored then against the same "
                      "exact neighbours. Measured in this run: " + ", ".join(fresh) + ".", ""]
        if "milvus-server" in dataset["methods"]:
            server_row = dataset["methods"]["milvus-server"]
            lines += [_milvus_server_text(server_row, report["machine"].get("logical_cpus")), ""]
            for note in server_row.get("notes", []):
                lines += [f"Note: {note}", ""]
        lines += ["| method | build s (CPU s) | peak delta MB | resident delta MB | load avg | setting | recall@10 "
                  "| QPS (wall) | QPS (CPU) |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for method, result in dataset["methods"].items():
            memory = result["memory"]
            for i, s in enumerate(sorted(result["settings"], key=lambda s: s["recall_at_10"])):
                head = (f"| {LABELS[method]}{' ' + marks[method] if method in marks else ''} | "
                        f"{result['build_seconds']:.1f} ({result['build_cpu_seconds']:.1f}) | "
                        f"{memory['peak_delta_mb']:.0f} | {memory['resident_delta_mb']:.0f} | "
                        f"{result['load_average'][0]:.1f} |" if i == 0 else "| | | | | |")
                lines.append(f"{head} {_setting_text(s['setting'])} | {s['recall_at_10']:.4f} | {s['qps']:,.0f} | "
                             f"{s['qps_cpu']:,.0f} |")
        lines.append("")
        lines += _target_lines(dataset["targets"], "QPS (wall)")
        lines += _target_lines(dataset["targets_cpu_time"], "QPS (CPU)")
    lines += [f"Plot: `{os.path.basename(report['plot'])}` (wall-clock QPS).", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (recall, QPS) points no other point beats on both, by increasing recall."""
    front = []
    for r, q in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or q > front[-1][1]:
            front.append((r, q))
    return front[::-1]


def write_plot(path: str, report: dict) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    from lce_tf.report import save_figure  # pylint: disable=import-outside-toplevel

    datasets = report["datasets"]
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4.6), squeeze=False)
    markers = {"brute": "*", "exact-lib": "P", "scann": "o", "scann-immutable": "s", "faiss-hnsw": "^",
               "faiss-ivfpq": "v", "milvus-lite": "D", "milvus-server": "X"}
    for ax, (name, dataset) in zip(axes[0], datasets.items()):
        for method, result in dataset["methods"].items():
            pts = sorted((s["recall_at_10"], s["qps"]) for s in result["settings"])
            frontier = _pareto(pts)
            line, = ax.plot([p[0] for p in frontier], [p[1] for p in frontier], marker=markers[method],
                            linestyle="-" if len(frontier) > 1 else "",
                            markersize=9 if method in ("brute", "exact-lib") else 5,
                            label=LABELS[method] + (f" (run of {result['carried_over']['date'][:10]})"
                                                    if result.get("carried_over") else ""))
            others = [p for p in pts if p not in frontier]
            if others:
                ax.plot([p[0] for p in others], [p[1] for p in others], marker=markers[method], linestyle="",
                        markersize=4, alpha=0.35, color=line.get_color())
        ax.axvline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel(f"queries per second ({report['threads']} thread{'s' if report['threads'] > 1 else ''})")
        carried = dataset.get("carried_over")
        ax.set_title(f"{name}: {dataset['n']:,} x {dataset['dim']} (lines: best settings; faint: the others)"
                     + (f"\ncarried over from the run of {carried['date'][:10]}" if carried else ""), fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(figure, path)
