#!/usr/bin/env python
"""`make bench-ann`: recall@10 against queries per second for ScaNN, exact brute force and FAISS.

Methods (every one searches the same queries with the same number of threads, `--threads`, default 1):

  brute force   blocked NumPy matrix product (OpenBLAS sgemm) + a two-stage exact top-k (maxima of
                16-column groups, then the best groups' columns); its results are the ground truth.
  exact-lib     `lce_tf.index.operations.exact_top_k` (what `EmbeddingIndex.exact_search` runs: sgemm +
                argpartition over every column), for comparison. The targets use the faster of the two.
  scann         `lce_tf.index.scann_index.EmbeddingIndex` exactly as `lce-tf index build` makes it for that size
                (tree-AH with round(sqrt(n)) leaves, anisotropic AH, exact reordering; mutable, i.e. with
                docids so `upsert` works in place), swept over leaves_to_search x reorder_num_neighbors.
  scann-immutable  the same without docids (`IndexConfig(mutable=False)`; ScaNN may then use its
                immutable-only scoring paths; `upsert` would rebuild).
  faiss-hnsw    `faiss.IndexHNSWFlat` (inner product), M=32, efConstruction=100, swept over efSearch.
  faiss-ivfpq   `faiss.IndexIVFPQ` with round(sqrt(n)) lists and D/4 sub-quantizers x 8 bits
                (= 32 bytes per 128-d vector, the size of ScaNN's AH codes), wrapped in
                `IndexRefineFlat` (exact re-ranking of k_factor x k candidates, as ScaNN reorders),
                swept over nprobe x k_factor.
  milvus-lite   `lce_tf.index.milvus_index.MilvusIndex` exactly as `lce-tf index build --backend milvus` makes it
                (Milvus Lite database in a temporary index directory; IVF_FLAT with nlist = 4 sqrt(n), IP on
                unit vectors; ids are strings, as users get them), swept over nprobe. Milvus Lite serves
                from its own process (started by the build): its CPU time is added to the child's for QPS
                (CPU), and its memory to the child's (its peak RSS, VmHWM, and its RSS after the build). Its
                search threads are Milvus' own (not pinned by --threads).
  milvus-server `MilvusIndex` on a Milvus STANDALONE SERVER (the PyPI package `milvus` 2.3.5: one server
                process with embedded etcd and local storage, on this same machine, sharing its cores with
                the client; not a cluster), as `lce-tf index build --backend milvus --milvus-uri URI --config
                index_type=HNSW` makes it: HNSW with lce_tf's (and Milvus') defaults M=16, efConstruction=200,
                IP on unit vectors, string ids, swept over the search ef with one client thread (the queries
                as one search request per setting, as every method here). The bench starts the server
                itself (lce_tf/testing/milvus_server.py: every port a free port of 127.0.0.1, data and logs in the
                child's temporary directory; the server's default configuration except the query
                coordinator's target update every 1 s instead of 10 s) and stops it at the end. The server
                is not pinned by --threads (OMP/OpenBLAS/MKL variables removed from its environment: it runs
                as deployed, its own thread pools over both cores). Build time = insert + flush + index
                build + load until the query node serves every row from sealed, indexed segments
                (`MilvusIndex.build`); the server's start-up is recorded apart (not in the build time). Its
                CPU time is added to the child's for build CPU s and QPS (CPU); its memory growth during the
                build (VmHWM reset before it, RSS before/after) to the memory columns.

Datasets: (a) synthetic: n unit vectors from `--clusters` Gaussian clusters on the sphere
(center ~ N(0, I) normalized; point = normalize(center + sigma * N(0, I)), sigma = `--sigma`; queries
drawn from the same mixture), seeded; (b) real: gallery embeddings of an exported model (`--model`,
`--gallery`) and query embeddings of `--query` (with `--query-model`, default the same model, mapped
into the gallery model's space as `lce-tf index search` does).

Measurement. Each (dataset, method) runs in a fresh Python process started with OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to `--threads` (FAISS: omp_set_num_threads; ScaNN:
training threads = search threads = `--threads`, batched search non-parallel when 1). The child loads
the vectors, records its resident set size (RSS, psutil), builds the index (wall time), and records
the RSS after the build and the peak RSS during it (VmHWM of /proc/self/status, reset to the current
RSS just before the build by writing 5 to /proc/self/clear_refs; not getrusage's ru_maxrss, which Linux
carries over from the parent across fork + exec). Reported: peak delta = peak RSS - RSS before the build (working memory the build needed
on top of the caller's float32 array and the imported libraries) and resident delta = RSS after the
build - RSS before it (what the built index keeps). Queries are searched as one batch per setting:
one untimed pass (its results are scored), then timed passes until `--min-time` seconds have elapsed
(at most 5); QPS = queries / the fastest pass, by wall clock and by process CPU time (the latter is
less disturbed by other jobs on a shared machine). recall@10 counts returned ids whose exact float64 score is
at least the score of the 10th exact neighbour (tie-robust; equal to |ANN n GT| / 10 without ties).

Writes OUT_DIR/NAME.json, NAME.md and NAME.png (recall against QPS), with the machine (CPU model,
cores), date and command. Example:

    python scripts/bench_ann.py                       # full: 1,000,000 x 128, 1,000 queries
    python scripts/bench_ann.py --quick               # smoke: 50,000 x 128, 500 queries
    python scripts/bench_ann.py --model M --gallery G --query Q   # + real glyph embeddings
    python scripts/bench_ann.py --methods brute,milvus-server --carry-over benchmarks/results/ann.json
                                                      # only the Milvus server row (brute: the ground truth);
                                                      # the other rows kept from the earlier report, marked
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
for _path in (REPO, SCRIPTS):  # run from a checkout without `pip install -e .`; the ann package is in scripts/
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The benchmark lives in the package scripts/ann (one job per module); brute_force_top_k and tie_robust_recall are
# re-exported so that `import bench_ann` (tests) keeps working.
from ann.settings import HNSW_EF_CONSTRUCTION, HNSW_M, K, METHODS  # noqa: E402,F401
from ann.engines import brute_force_top_k  # noqa: E402,F401
from ann.child import run_child  # noqa: E402,F401
from ann.data import machine_info, real_data, synthetic_data, tie_robust_recall  # noqa: E402,F401
from ann.runs import carry_over, run_dataset  # noqa: E402,F401
from ann.report import evaluate_targets, write_markdown, write_plot  # noqa: E402,F401


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: 50,000 vectors, 500 queries")
    parser.add_argument("--n", type=int, help="synthetic vectors (default 1,000,000; quick 50,000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, help="synthetic queries (default 1,000; quick 500)")
    parser.add_argument("--clusters", type=int, help="Gaussian clusters (default n / 1,000, at least 10)")
    parser.add_argument("--sigma", type=float, default=0.06, help="per-dimension noise around a cluster center")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads for every method (build and search)")
    parser.add_argument("--min-time", type=float, help="seconds of timed passes per setting (default 1; quick 0.2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--model", help="model directory for the real-embedding dataset")
    parser.add_argument("--gallery", help="gallery image folder for the real-embedding dataset")
    parser.add_argument("--query", help="query image folder for the real-embedding dataset")
    parser.add_argument("--query-model", help="query model (default --model), mapped into --model's space")
    parser.add_argument("--real-name", default="glyphs", help="name of the real-embedding dataset in the reports")
    parser.add_argument("--synthetic-name", default="synthetic",
                        help="name of the synthetic dataset in the reports (e.g. to keep a run at another size beside "
                        "the carried-over default one)")
    parser.add_argument("--no-synthetic", action="store_true", help="run only the real-embedding dataset")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--name", default="ann", help="output file stem (NAME.json, NAME.md, NAME.png)")
    parser.add_argument("--tmp-dir", help="where the children's vector files go (default: system temp)")
    parser.add_argument("--carry-over", metavar="ANN_JSON",
                        help="an earlier report whose datasets not run now, and whose methods not run now on a dataset "
                        "with the same data, are copied into this one, each marked with that run's date, command "
                        "and machine (e.g. the real-embedding dataset when its models are not at hand, or the rows "
                        "of `--methods brute,milvus-server`'s untouched methods)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.workdir, args.child, args.threads, args.min_time)
        return 0

    n = args.n or (50_000 if args.quick else 1_000_000)
    num_queries = args.queries or (500 if args.quick else 1_000)
    clusters = args.clusters or max(10, n // 1000)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "brute" not in methods:
        parser.error(f"--methods must include brute (the ground truth) and name only {', '.join(METHODS)}; "
                     f"received {args.methods!r}")
    real = [args.model, args.gallery, args.query]
    if any(real) and not all(real):
        parser.error("the real-embedding dataset needs --model, --gallery and --query together")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; received {args.threads}")

    def log(message: str) -> None:
        print(f"[bench-ann {time.strftime('%H:%M:%S')}] {message}", flush=True)

    started = time.time()
    report = {
        "benchmark": "ann", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), REPO)]
                            + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(), "threads": args.threads, "k": K, "min_time_seconds": args.min_time,
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}, "datasets": {},
    }
    if not args.no_synthetic:
        log(f"synthetic data: {n:,} x {args.dim}, {clusters} clusters, sigma {args.sigma}, {num_queries:,} queries")
        base, queries = synthetic_data(n, num_queries, args.dim, clusters, args.sigma, args.seed)
        ds = run_dataset(args.synthetic_name, base, queries, methods, args, log)
        ds["description"] = (f"Seeded ({args.seed}) mixture of {clusters} Gaussian clusters on the unit sphere: "
                             f"center ~ normalize(N(0, I)), point = normalize(center + {args.sigma} * N(0, I)); "
                             f"queries from the same mixture.")
        ds["generator"] = {"clusters": clusters, "sigma": args.sigma, "seed": args.seed}
        report["datasets"][args.synthetic_name] = ds
        del base, queries
    if args.model:
        log(f"real embeddings: gallery {args.gallery} with {args.model}, queries {args.query}")
        base, queries, info = real_data(args.model, args.gallery, args.query, args.query_model)
        ds = run_dataset(args.real_name, base, queries, methods, args, log)
        ds["description"] = (f"Gallery embeddings of model {info['model']} over {info['gallery']}; queries "
                             f"{info['query']} embedded by {info['query_model']} ({info['signature']}).")
        ds["source"] = info
        report["datasets"][args.real_name] = ds
    if args.carry_over:
        with open(args.carry_over, encoding="utf-8") as f:
            carry_over(report, json.load(f), log)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    for dataset in report["datasets"].values():
        dataset["targets"] = evaluate_targets(dataset, "qps")
        dataset["targets_cpu_time"] = evaluate_targets(dataset, "qps_cpu")
    os.makedirs(args.out_dir, exist_ok=True)
    report["plot"] = os.path.join(args.out_dir, f"{args.name}.png")
    report["total_seconds"] = time.time() - started
    write_plot(report["plot"], report)
    write_markdown(os.path.join(args.out_dir, f"{args.name}.md"), report)
    report["plot"] = os.path.relpath(report["plot"], args.out_dir)
    with open(os.path.join(args.out_dir, f"{args.name}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    for name, dataset in report["datasets"].items():
        for measure, t in (("wall", dataset["targets"]), ("CPU", dataset["targets_cpu_time"])):
            b = t["best_scann"]
            detail = (f" (ScaNN {b['qps']:,.0f} QPS at recall {b['recall_at_10']:.3f}, "
                      f"{b['speedup_vs_brute']:.1f}x the fastest exact search)" if b else "")
            log(f"{name}: target on {measure} QPS {'MET' if t['met'] else 'NOT MET'}{detail}")
    log(f"wrote {args.out_dir}/{args.name}.json, .md, .png in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
