"""`lce-tf index import` at scale: time and peak memory of importing N x D float32 vectors, against `lce-tf
index build`'s indexing stage on the same vectors (docs/design.md, "Artifacts and formats"; issue 29, item 3).

    python scripts/bench_index_import.py                       # 1,000,000 x 128, ScaNN (tree-AH by size)
    python scripts/bench_index_import.py --n 20000 --formats npy,parquet --work /tmp/bii

The vectors are the ANN benchmark's synthetic set (scripts/ann/data.py `synthetic_data`: seeded Gaussian
clusters on the sphere, 1,000 clusters, sigma 0.06), written once as .npy (and Parquet, a fixed-size-list
column, with --formats parquet) with ids "g0000000".. as text lines. Each measured run is a fresh Python
process; its peak RSS is the kernel's ru_maxrss of that child (os.wait4), its time the child's wall clock:

- baseline: the process with lce_tf, numpy and ScaNN (hence TensorFlow) imported, nothing else: the floor both
  runs share;
- import (FORMAT): `python -m lce_tf.cli index import --vectors FILE --ids ids.txt --space bench-v1 --out DIR`,
  the whole command (reading, checks, normalization, ScaNN build, save);
- build stage: what `lce-tf index build` does once the gallery is embedded (`images.build_index` after
  `embed_folder`): the [N, D] float32 embeddings in memory (np.load of the same .npy, standing in for the model's
  output) and the ids, then the backend's `build_in` and `save` into a new directory.

Results: benchmarks/results/index_import.json and .md (machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from ann.data import machine_info, synthetic_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
SPACE = "bench-v1"

BASELINE_CODE = "import numpy, lce_tf.cli, lce_tf.index_import, scann.scann_ops.py.scann_ops_pybind"
BUILD_STAGE_CODE = """
import sys, time, numpy as np
from lce_tf.index import registry
vectors, ids_file, out, backend = sys.argv[1:5]
start = time.perf_counter()
with open(ids_file, encoding="utf-8") as f:
    ids = [line.rstrip("\\n") for line in f]
embeddings = np.load(vectors)  # in memory, as model.embed_folder returns the gallery's embeddings
cls = registry.backend_class(backend)
config = cls.prepare_config(cls.config_for(len(ids), embeddings.shape[1]), len(ids), embeddings.shape[1])
index = cls.build_in(out, ids, embeddings, "bench-v1", embedding_space="bench-v1", model_id="bench-v1",
                     model_version="bench-v1", config=config)
index.save(out)
print(f"stage {time.perf_counter() - start:.2f} s; {config.algorithm}", flush=True)
"""


def run_child(argv: list, env: dict) -> dict:
    """Runs argv to completion: wall seconds, the child's peak RSS (ru_maxrss, MB), CPU seconds, its last lines."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    output = child.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({child.returncode}):\n{output[-3000:]}")
    lines = [line for line in output.splitlines() if line.startswith(("[lce-tf", "stage "))]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "stage_s": stage_seconds(lines), "output": lines}


def stage_seconds(lines: list) -> float:
    """The work after start-up: the build stage prints it; the CLI's stage lines carry HH:MM:SS (first to last)."""
    for line in lines:
        if line.startswith("stage "):
            return float(line.split()[1])
    stamps = [time.strptime(line[8:16], "%H:%M:%S") for line in lines if line.startswith("[lce-tf ")]
    if len(stamps) < 2:
        return float("nan")
    seconds = [t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec for t in stamps]
    return float((seconds[-1] - seconds[0]) % 86400)


def write_data(work: str, n: int, dim: int, formats: list, seed: int) -> dict:
    vectors, _ = synthetic_data(n, 1, dim, clusters=1000, sigma=0.06, seed=seed)
    files = {"npy": os.path.join(work, "vectors.npy"), "ids": os.path.join(work, "ids.txt")}
    np.save(files["npy"], vectors)
    with open(files["ids"], "w", encoding="utf-8") as f:
        f.writelines(f"g{i:07d}\n" for i in range(n))
    if "parquet" in formats:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        files["parquet"] = os.path.join(work, "vectors.parquet")
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        pq.write_table(pa.table({"vector": column}), files["parquet"], row_group_size=65_536)
    del vectors
    return files


def to_markdown(result: dict) -> str:
    runs = result["runs"]
    base = runs["baseline"]["peak_rss_mb"]
    n, dim = result["n"], result["dim"]
    vector_mb = n * dim * 4 / 2**20
    lines = [f"# `lce-tf index import` against `index build`'s indexing stage: {n:,} x {dim} float32", "",
             f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- machine: {result['machine'].get('cpu')}, {result['machine'].get('logical_cpus')} logical CPUs, "
             f"{result['machine'].get('memory_gb')} GB RAM, load average at the start "
             f"{result['machine'].get('load_average_at_start')} (shared with other jobs), at the end "
             f"{result['load_average_at_end']}",
             f"- data: scripts/ann/data.py `synthetic_data` (seed {result['seed']}, 1,000 clusters, sigma 0.06), "
             f"the float32 vectors alone {vector_mb:,.0f} MB; backend {result['backend']} ({result['algorithm']})",
             "- each run is a fresh Python process; peak RSS = its ru_maxrss (os.wait4), wall = the child's wall clock "
             "(start-up and imports included); baseline = the process with lce_tf, numpy and ScaNN/TensorFlow "
             "imported, nothing else",
             "- stage s: the work after start-up and imports (the build stage times itself: reading the ids, np.load, "
             "build, save; the import: its first to last progress line, whole seconds: reading, checks, build, save)",
             "",
             "| run | wall s | stage s | CPU s | peak RSS MB | peak - baseline MB | (peak - baseline) / vectors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        over = run["peak_rss_mb"] - base
        stage = "-" if name == "baseline" else f"{run['stage_s']:.1f}"
        lines.append(f"| {name} | {run['wall_s']:.1f} | {stage} | {run['cpu_s']:.1f} | {run['peak_rss_mb']:,.0f} | "
                     f"{over:,.0f} | {over / vector_mb:.2f} |")
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="npy", help="comma-separated: npy, parquet")
    parser.add_argument("--backend", default="scann")
    parser.add_argument("--work", default=os.path.join(REPO, "build", "bench_index_import"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "index_import"),
                        help="results path without suffix (.json and .md are written)")
    parser.add_argument("--note", action="append", default=[], help="a note added to the results")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    machine = machine_info()
    print(f"writing {args.n} x {args.dim} vectors to {args.work}", flush=True)
    files = write_data(args.work, args.n, args.dim, formats, args.seed)
    runs = {"baseline": run_child([sys.executable, "-c", BASELINE_CODE], env)}
    print("baseline", runs["baseline"], flush=True)
    stage = run_child([sys.executable, "-c", BUILD_STAGE_CODE, files["npy"], files["ids"],
                       os.path.join(args.work, "built"), args.backend], env)
    runs["index build's indexing stage (embeddings in memory)"] = stage
    print("build stage", stage, flush=True)
    for fmt in formats:
        run = run_child([sys.executable, "-m", "lce_tf.cli", "index", "import", "--vectors", files[fmt], "--ids",
                         files["ids"], "--space", SPACE, "--out", os.path.join(args.work, f"imported_{fmt}"),
                         "--backend", args.backend], env)
        runs[f"index import (.{fmt})"] = run
        print(f"import {fmt}", run, flush=True)
    with open(os.path.join(args.work, "imported_npy", "index.json"), encoding="utf-8") as f:
        algorithm = json.load(f)["config"]["algorithm"]
    built = np.load(os.path.join(args.work, "built", "embeddings.npy"), mmap_mode="r")
    imported = np.load(os.path.join(args.work, "imported_npy", "embeddings.npy"), mmap_mode="r")
    same = bool(np.array_equal(built, imported))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(["scripts/bench_index_import.py", *(argv or sys.argv[1:])]),
              "machine": machine, "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
              "n": args.n, "dim": args.dim, "seed": args.seed, "backend": args.backend, "algorithm": algorithm,
              "same_stored_vectors": same, "runs": runs,
              "notes": [f"the imported and the built index store {'the same' if same else 'DIFFERENT'} "
                        "embeddings.npy bits", *args.note]}
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))
    shutil.rmtree(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
