"""Runs every method of the ANN benchmark on one dataset in fresh child processes and scores them; carries
rows over from an earlier report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ann.data import tie_robust_recall
from ann.settings import METHODS, REPO, SCRIPT, settings_for


def run_dataset(name: str, base: np.ndarray, queries: np.ndarray, methods: list[str], args, log) -> dict:
    """Runs every method on one dataset in child processes; returns the dataset's results."""
    workdir = tempfile.mkdtemp(prefix=f"bench-ann-{name}-", dir=args.tmp_dir)
    np.save(os.path.join(workdir, "base.npy"), base)
    np.save(os.path.join(workdir, "queries.npy"), queries)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = {"n": int(base.shape[0]), "dim": int(base.shape[1]), "queries": int(queries.shape[0]), "methods": {}}
    gt = None
    for method in methods:
        log(f"[{name}] {method}: building and searching ({len(settings_for(method, base.shape[0]))} settings)")
        start, load = time.time(), [round(v, 2) for v in os.getloadavg()]
        proc = subprocess.run([sys.executable, SCRIPT, "--child", method, "--workdir", workdir,
                               "--threads", str(args.threads), "--min-time", str(args.min_time)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{method} on {name} failed (exit {proc.returncode}): " + " | ".join(tail))
        with open(os.path.join(workdir, f"result-{method}.json"), encoding="utf-8") as f:
            result = json.load(f)
        ids = np.load(os.path.join(workdir, f"ids-{method}.npy"))
        if method == "brute":
            gt = ids[0]
        for setting, setting_ids in zip(result["settings"], ids):
            setting["recall_at_10"] = tie_robust_recall(base, queries, setting_ids, gt)
        result["wall_seconds"] = time.time() - start
        result["load_average"] = load
        out["methods"][method] = result
        best = max(result["settings"], key=lambda s: s["recall_at_10"])
        log(f"[{name}] {method}: build {result['build_seconds']:.1f} s, "
            f"peak +{result['memory']['peak_delta_mb']:.0f} MB, "
            f"best recall {best['recall_at_10']:.3f} at {best['qps']:.0f} QPS")
    for leftover in os.listdir(workdir):
        os.remove(os.path.join(workdir, leftover))
    os.rmdir(workdir)
    return out


def _same_data(a: dict, b: dict) -> bool:
    """Whether two reports' datasets hold the same vectors and queries (sizes and generator or source)."""
    keys = ("n", "dim", "queries", "generator", "source")
    return all(a.get(k) == b.get(k) for k in keys)


def carry_over(report: dict, earlier: dict, log) -> None:
    """Copies from an earlier report what this run did not measure, each part marked with that run's date,
    command and machine (an earlier mark, from a still earlier run, is kept):

    - datasets not run now, whole;
    - on a dataset run now on the same data (`_same_data`: same sizes and seeded generator, or same
      source), the methods not run now. Their recall stays as scored then, against the exact neighbours
      of the same vectors; the targets are evaluated over the merged rows (with this run's exact search).
    """
    mark = {"date": earlier["date"], "command": earlier["command"], "machine": earlier["machine"]}
    for name, dataset in earlier["datasets"].items():
        current = report["datasets"].get(name)
        if current is None:
            dataset.setdefault("carried_over", dict(mark))
            report["datasets"][name] = dataset
            log(f"{name}: carried over from the run of {dataset['carried_over']['date']}")
            continue
        missing = [m for m in dataset["methods"] if m not in current["methods"]]
        if not missing:
            continue
        if not _same_data(current, dataset):
            log(f"{name}: not merging {', '.join(missing)} from {earlier['date']}: the data differ "
                f"({current['n']:,} x {current['dim']} now, {dataset['n']:,} x {dataset['dim']} then, or another "
                "generator / source)")
            continue
        merged = {}
        for method in METHODS:  # the table's usual order
            if method in current["methods"]:
                merged[method] = current["methods"][method]
            elif method in dataset["methods"]:
                merged[method] = {**dataset["methods"][method]}
                merged[method].setdefault("carried_over", dict(mark))
        current["methods"] = merged
        log(f"{name}: {', '.join(missing)} carried over from the run of {earlier['date']}")
