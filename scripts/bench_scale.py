#!/usr/bin/env python
"""`make bench-scale`: scale-out measurements (issue 6, part 3). Writes benchmarks/results/scale.{json,md}.

(a) Center extraction on synthetic embeddings, side by side in one run, at each size (`--sizes`):

  inprocess       `lce_tf.centers.compute_class_centers_from_batches` reading the shards chunk by chunk
                  (two passes, one process): the library path, the reference.
  beam-two-reads  the ClassCenterExtractor's Beam transform (`lce_tf.beam.centers.ComputeClassCentersFromBatches`,
                  the same combiners the component runs) on the DirectRunner with
                  --direct_running_mode=multi_processing --direct_num_workers=2; the shards are read once
                  per pass, so nothing is kept between the passes.
  beam-spill      the same transform given ONE read of the shards and a spill directory: what the
                  component does with the embeddings of its model (computed once): pass 1 writes them to
                  shards of `--spill-rows` rows, pass 2 reads those back.
  beam-one-read   (not run by default) ONE read and no spill directory: the runner keeps the batches
                  between pass 1 and pass 2 (the DirectRunner in the driver's memory).
  beam-dask       the beam-two-reads pipeline on Dask (issue 21): lce_tf/beam/dask_runner.py's DaskRunner
                  against a dask.distributed LocalCluster of `--workers` worker processes (one thread each,
                  127.0.0.1) that the measuring process starts before its timer, so its time is the
                  pipeline's on a running, warm cluster; reported beside it: the cluster's start, a first
                  two-element pipeline (the workers import Beam and lce_tf) and a second one (the per-run
                  fixed cost, used for the steady state).
  beam-dask-spill (not run by default) beam-spill on the same cluster.

  The fixed cost of the DirectRunner (start two SDK worker processes, run a pipeline) is measured on
  its own, with a pipeline of two elements and the same options, before and after the sizes; the
  steady-state throughput of a Beam mode is examples / (time - that start-up time).

  Data: `--classes` Gaussian clusters in `--dim` dimensions (center ~ N(0, I), sample = center + 0.5 ·
  N(0, I), float32), labels balanced (every class present), written to .npy shards of `--shard-rows`
  rows, shard by shard (the generator never holds more than one shard). Readers memory-map a shard and
  hand out `--chunk` rows at a time; the Beam driver only lists shard file names.

  Each (size, mode) runs in a fresh Python process. It resets its peak RSS (writes 5 to
  /proc/self/clear_refs) after its imports, runs, and reports its VmHWM; the parent samples the RSS and
  VmHWM of the child's worker processes (the Beam SDK workers) every 50 ms. Time = wall clock of the
  computation alone (for Beam: the whole `with beam.Pipeline(...)` block, including the start of the
  worker processes); throughput = examples / time. Exactness: max |Δ| of centers and boundary cosines
  between each Beam mode and inprocess (counts must be equal).

(b) Training with tf.distribute.MultiWorkerMirroredStrategy: `--train-workers` local processes (TF_CONFIG
  on free localhost ports) train the lce_tf model in lce mode (`lce_tf.training.train(..., strategy=...)`)
  on a small seeded dataset; a single process without a strategy trains the same model on the same
  global batches. Per-epoch logged losses (loss, cls_loss, align_loss, boundary_loss) are compared
  with a relative tolerance. Two runs: synchronized BatchNormalization (`TrainConfig.sync_batch_norm`;
  the replicas normalize with global-batch statistics, so 2 workers compute what 1 worker computes up
  to float summation order: tolerance `--train-rtol`, default 1e-3) and Keras' default per-replica
  BatchNormalization (each replica normalizes with its half of the batch, a different computation:
  reported against `--train-rtol-local-bn`, default 5e-2).

Usage:
  python scripts/bench_scale.py                       # both parts, sizes 100k, 1M, 5M
  python scripts/bench_scale.py --quick               # centers at 20,000 only, under build/ (proves it runs)
  python scripts/bench_scale.py --part centers --sizes 20000
  python scripts/bench_scale.py --part training
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lce_tf import modes  # noqa: E402  (after the path set-up)

CENTER_MODES = ("inprocess", "beam-two-reads", "beam-spill", "beam-one-read", "beam-dask", "beam-dask-spill")
DEFAULT_CENTER_MODES = ("inprocess", "beam-two-reads", "beam-spill", "beam-dask")
DASK_MODES = ("beam-dask", "beam-dask-spill")
LOSS_KEYS = ("loss", "cls_loss", "align_loss", "boundary_loss")


# ----------------------------------------------------------------------------------------------
# Synthetic embeddings on disk
# ----------------------------------------------------------------------------------------------

def write_shards(directory: str, num_examples: int, dim: int, num_classes: int, *, shard_rows: int = 50000,
                 seed: int = 0) -> list[str]:
    """Writes `num_examples` labelled embeddings as shards <dir>/shard-NNNNN.{emb,lab}.npy, one at a time.

    Reuses the shards when <dir>/manifest.json matches the arguments. Returns the shard prefixes.
    """
    if num_examples < num_classes:
        raise ValueError(f"need at least one example per class: {num_examples} examples < {num_classes} classes")
    spec = {"num_examples": num_examples, "dim": dim, "num_classes": num_classes, "shard_rows": shard_rows,
            "seed": seed, "format": "bench_scale/1"}
    manifest = os.path.join(directory, "manifest.json")
    prefixes = [os.path.join(directory, f"shard-{i:05d}") for i in range(-(-num_examples // shard_rows))]
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f) == spec and all(os.path.exists(p + ".emb.npy") for p in prefixes):
                return prefixes
    os.makedirs(directory, exist_ok=True)
    means = np.random.default_rng([seed, 0]).normal(size=(num_classes, dim))
    for i, prefix in enumerate(prefixes):
        start, end = i * shard_rows, min(num_examples, (i + 1) * shard_rows)
        rng = np.random.default_rng([seed, 1, i])
        labels = rng.permutation(np.arange(start, end) % num_classes).astype(np.int64)
        emb = (means[labels] + 0.5 * rng.normal(size=(end - start, dim))).astype(np.float32)
        np.save(prefix + ".emb.npy", emb)
        np.save(prefix + ".lab.npy", labels)
    with open(manifest, "w") as f:
        json.dump(spec, f)
    return prefixes


def read_shard_chunks(prefix: str, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(embeddings [n, D] float32, labels [n] int64) chunks of one shard (`lce_tf.beam.centers.read_embedding_shard`)."""
    from lce_tf.beam.centers import read_embedding_shard

    return read_embedding_shard(prefix, chunk_rows)


def class_names(num_classes: int) -> list[str]:
    return [f"class{j:05d}" for j in range(num_classes)]


def beam_options(workers: int) -> list[str]:
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def dask_options(address: str) -> list[str]:
    from lce_tf.beam.options import dask_beam_args

    return dask_beam_args(address)


def start_dask_cluster(workers: int):
    """A LocalCluster of `workers` worker processes (one thread each) on 127.0.0.1, free ports, no dashboard."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
                        dashboard_address=None, worker_dashboard_address=None,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


def beam_class_centers(prefixes: Sequence[str], num_classes: int, out_path: str, *, boundary: str = "min",
                       workers: int = 2, mode: str = "beam-two-reads", chunk_rows: int = 16384,
                       spill_rows: int = 65536, options: Optional[Sequence[str]] = None):
    """Runs the component's Beam transform over the shards and returns the ClassCenters it wrote.

    mode: "beam-two-reads", "beam-spill" or "beam-one-read" (see the module docstring); "beam-dask" and
    "beam-dask-spill" feed it as the first two. options: the Beam flags (default: the DirectRunner's with
    `workers` processes). The spill directory (beside out_path) is deleted afterwards, as the component does.
    """
    mode = {"beam-dask": "beam-two-reads", "beam-dask-spill": "beam-spill"}.get(mode, mode)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from lce_tf.beam import centers as centers_beam
    from lce_tf.centers import ClassCenters

    spill_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), ".spill") if mode == "beam-spill" else None
    try:
        with beam.Pipeline(options=PipelineOptions(list(options or beam_options(workers)))) as pipeline:
            first = pipeline | "Read1" >> centers_beam.ReadEmbeddingShards(prefixes, chunk_rows)
            source = ((first, pipeline | "Read2" >> centers_beam.ReadEmbeddingShards(prefixes, chunk_rows))
                      if mode == "beam-two-reads" else first)
            _ = (source
                 | "Centers" >> centers_beam.ComputeClassCentersFromBatches(
                     class_names(num_classes), boundary, "synthetic", spill_dir=spill_dir, rows_per_shard=spill_rows)
                 | "Save" >> beam.Map(centers_beam.save_class_centers, path=out_path))
    finally:
        if spill_dir is not None:
            centers_beam.delete_spill_dir(spill_dir)
    return ClassCenters.load(out_path)


def beam_startup_seconds(workers: int = 2, options: Optional[Sequence[str]] = None) -> float:
    """Wall time of a two-element pipeline with the benchmark's options: the DirectRunner's fixed cost."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(list(options or beam_options(workers)))) as pipeline:
        _ = pipeline | beam.Create([1, 2]) | beam.Map(lambda v: v + 1)
    return time.perf_counter() - start


def inprocess_class_centers(prefixes: Sequence[str], num_classes: int, *, boundary: str = "min",
                            chunk_rows: int = 16384):
    """lce_tf's own two-pass path over the same shards and chunks."""
    from lce_tf.centers import compute_class_centers_from_batches

    def batches():
        for prefix in prefixes:
            yield from read_shard_chunks(prefix, chunk_rows)

    return compute_class_centers_from_batches(batches, class_names(num_classes), boundary=boundary,
                                              source_model_id="synthetic")


def compare_centers(got, reference) -> dict:
    """max |Δ| of centers and boundaries, and whether names and counts agree exactly."""
    return {
        "max_abs_diff_centers": float(np.max(np.abs(got.centers.astype(np.float64) - reference.centers))),
        "max_abs_diff_boundaries": float(np.max(np.abs(got.boundary_cos.astype(np.float64)
                                                       - reference.boundary_cos))),
        "counts_equal": bool(np.array_equal(got.counts, reference.counts)),
        "bit_identical": bool(np.array_equal(got.centers, reference.centers)
                              and np.array_equal(got.boundary_cos, reference.boundary_cos)
                              and np.array_equal(got.counts, reference.counts)),
        "names_equal": got.class_names == reference.class_names,
    }


# ----------------------------------------------------------------------------------------------
# Memory measurement
# ----------------------------------------------------------------------------------------------

def _status_kb(pid: int | str, field: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TreeSampler:
    """Samples the RSS and VmHWM of a process's descendants every `interval` s (a background thread)."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process(pid)
        self._interval = interval
        self.peak_kb: dict[int, int] = {}       # per descendant pid: max of VmHWM / RSS seen
        self.max_sum_rss_kb = 0                 # max over samples of Σ RSS of the descendants
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                children = self._proc.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    if child.name() in ("sh", "bash"):  # the `/bin/sh -c python -m ...sdk_worker_main` wrappers
                        continue
                    rss = child.memory_info().rss // 1024
                except psutil.Error:
                    continue
                hwm = _status_kb(child.pid, "VmHWM") or 0
                self.peak_kb[child.pid] = max(self.peak_kb.get(child.pid, 0), rss, hwm)
                total += rss
            self.max_sum_rss_kb = max(self.max_sum_rss_kb, total)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _centers_child(args) -> None:
    """One (size, mode) measurement in this fresh process; prints one JSON line."""
    import apache_beam  # noqa: F401  (imports before the peak-RSS reset and the timer)

    from lce_tf.beam import centers as centers_beam  # noqa: F401
    from lce_tf import centers  # noqa: F401

    with open(args.shards_json) as f:
        prefixes = json.load(f)
    extra, cluster = {}, None
    if args.mode in DASK_MODES:  # a running cluster first (its workers are this process's children)
        t0 = time.perf_counter()
        cluster = start_dask_cluster(args.workers)
        extra["dask_cluster_start_seconds"] = time.perf_counter() - t0
        options = dask_options(cluster.scheduler_address)
        # The first pipeline also imports Beam and lce_tf in the workers (once per cluster): reported apart.
        extra["dask_warmup_seconds"] = beam_startup_seconds(options=options)
        extra["dask_startup_seconds"] = beam_startup_seconds(options=options)
        extra["beam_options"] = options
    rss_before = _status_kb("self", "VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    if cluster is not None:
        beam_class_centers(prefixes, args.classes, args.result, boundary=args.boundary, mode=args.mode,
                           chunk_rows=args.chunk, spill_rows=args.spill_rows, options=options)
    elif args.mode == "beam-startup":
        beam_startup_seconds(args.workers)
    elif args.mode == "inprocess":
        result = inprocess_class_centers(prefixes, args.classes, boundary=args.boundary, chunk_rows=args.chunk)
        result.save(args.result)
    else:
        beam_class_centers(prefixes, args.classes, args.result, boundary=args.boundary, workers=args.workers,
                           mode=args.mode, chunk_rows=args.chunk, spill_rows=args.spill_rows)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "driver_rss_before_mb": rss_before / 1024,
                      "driver_peak_mb": (_status_kb("self", "VmHWM") or 0) / 1024, "peak_reset": reset, **extra}),
          flush=True)
    if cluster is not None:
        from lce_tf.beam.dask_runner import close_cluster

        close_cluster(cluster)


def measure_centers(mode: str, prefixes: Sequence[str], num_classes: int, workdir: str, *, boundary: str,
                    workers: int, chunk_rows: int, spill_rows: int) -> tuple[dict, str]:
    """Runs one mode in a child process; returns (figures, path of the ClassCenters it wrote)."""
    shards_json = os.path.join(workdir, "shards.json")
    with open(shards_json, "w") as f:
        json.dump(list(prefixes), f)
    result = os.path.join(workdir, f"centers-{mode}.npz")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, os.path.abspath(__file__), "_centers-child", "--mode", mode, "--shards-json",
           shards_json, "--classes", str(num_classes), "--boundary", boundary, "--workers", str(workers),
           "--chunk", str(chunk_rows), "--spill-rows", str(spill_rows), "--result", result]
    env = _child_env({})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    with TreeSampler(proc.pid) as sampler:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}):\n{err[-3000:]}")
    figures = json.loads(out.strip().splitlines()[-1])
    worker_peaks = sorted(sampler.peak_kb.values(), reverse=True)
    figures.update({
        "workers_seen": len(worker_peaks),
        "worker_peak_mb": [round(kb / 1024, 1) for kb in worker_peaks],
        "workers_max_sum_rss_mb": round(sampler.max_sum_rss_kb / 1024, 1),
    })
    return figures, result


def measure_startup(workers: int, workdir: str) -> float:
    """Seconds of a two-element pipeline (`beam_startup_seconds`) in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "_centers-child", "--mode", "beam-startup", "--shards-json",
           os.path.join(workdir, "none.json"), "--classes", "1", "--workers", str(workers), "--result", "-"]
    with open(cmd[6], "w") as f:
        json.dump([], f)
    env = _child_env({})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"beam-startup failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def run_centers(args) -> dict:
    from lce_tf.centers import ClassCenters

    startup = []
    if any(m.startswith("beam") and m not in DASK_MODES for m in args.modes):
        startup.append(measure_startup(args.workers, args.workdir))
        print(f"[centers] Beam start-up (two-element pipeline): {startup[-1]:.2f} s", flush=True)
    rows = []
    for size in args.sizes:
        data_dir = os.path.join(args.workdir, f"embeddings-{size}-d{args.dim}-c{args.classes}")
        t0 = time.perf_counter()
        prefixes = write_shards(data_dir, size, args.dim, args.classes, shard_rows=args.shard_rows)
        print(f"[centers] {size:,} embeddings in {len(prefixes)} shards ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        results, reference = {}, None
        for mode in args.modes:
            figures, path = measure_centers(mode, prefixes, args.classes, data_dir, boundary=args.boundary,
                                            workers=args.workers, chunk_rows=args.chunk,
                                            spill_rows=args.spill_rows)
            figures["throughput_per_s"] = size / figures["seconds"]
            centers = ClassCenters.load(path)
            if mode == "inprocess":
                reference = centers
            elif reference is not None:
                figures.update(compare_centers(centers, reference))
            results[mode] = figures
            print(f"[centers] {size:,} {mode}: {figures['seconds']:.2f} s, {figures['throughput_per_s']:,.0f}/s, "
                  f"driver peak {figures['driver_peak_mb']:.0f} MB, workers {figures['worker_peak_mb']} MB"
                  + (f", max|Δc| {figures['max_abs_diff_centers']:.2e} max|Δb| "
                     f"{figures['max_abs_diff_boundaries']:.2e}" if "max_abs_diff_centers" in figures else ""),
                  flush=True)
        if "inprocess" in results:
            for mode in results:
                if mode != "inprocess":
                    results[mode]["throughput_ratio_vs_inprocess"] = (
                        results["inprocess"]["seconds"] / results[mode]["seconds"])
        rows.append({"num_examples": size, "shards": len(prefixes), "data_mb": size * args.dim * 4 / 2**20,
                     "modes": results})
    for row in rows:  # Dask: the fixed cost is a two-element pipeline on the same running cluster
        for mode, f in row["modes"].items():
            if mode in DASK_MODES and f["seconds"] > f["dask_startup_seconds"]:
                f["steady_throughput_per_s"] = row["num_examples"] / (f["seconds"] - f["dask_startup_seconds"])
                if "inprocess" in row["modes"]:
                    f["steady_ratio_vs_inprocess"] = (f["steady_throughput_per_s"]
                                                      / row["modes"]["inprocess"]["throughput_per_s"])
    if startup:
        startup.append(measure_startup(args.workers, args.workdir))
        print(f"[centers] Beam start-up again: {startup[-1]:.2f} s", flush=True)
        fixed = float(np.mean(startup))
        for row in rows:
            for mode, f in row["modes"].items():
                if mode.startswith("beam") and mode not in DASK_MODES and f["seconds"] > fixed:
                    f["steady_throughput_per_s"] = row["num_examples"] / (f["seconds"] - fixed)
                    if "inprocess" in row["modes"]:
                        f["steady_ratio_vs_inprocess"] = (f["steady_throughput_per_s"]
                                                          / row["modes"]["inprocess"]["throughput_per_s"])
    summary = {}
    for mode in args.modes:
        series = [(r["num_examples"], r["modes"][mode]) for r in rows]
        entry = {"driver_peak_mb": [round(f["driver_peak_mb"], 1) for _, f in series],
                 "worker_peak_mb_max": [max(f["worker_peak_mb"], default=0.0) for _, f in series],
                 "seconds": [round(f["seconds"], 2) for _, f in series]}
        if len(series) >= 2:
            (n0, f0), (n1, f1) = series[0], series[-1]
            entry["marginal_throughput_per_s"] = (n1 - n0) / max(f1["seconds"] - f0["seconds"], 1e-9)
        summary[mode] = entry
    return {"sizes": list(args.sizes), "beam_startup_seconds": startup, "spill_rows": args.spill_rows, "dim": args.dim, "classes": args.classes, "boundary": args.boundary,
            "chunk_rows": args.chunk, "shard_rows": args.shard_rows, "beam_workers": args.workers,
            "beam_options": beam_options(args.workers), "rows": rows, "summary": summary}


# ----------------------------------------------------------------------------------------------
# Multi-worker training
# ----------------------------------------------------------------------------------------------

TRAIN_DEFAULTS = dict(num_classes=8, per_class=64, image_size=16, embedding_dim=16, noise=0.8, epochs=3,
                      global_batch=64)


def training_data(num_classes: int, per_class: int, image_size: int, embedding_dim: int, noise: float,
                  seed: int = 0):
    """A seeded toy set: (images [N, S, S, 1] in [0, 1], labels [N], old ClassCenters [C, D]).

    Class templates are uniform noise images; samples add Gaussian pixel noise (`noise`, high enough
    that the losses stay O(1) for a few epochs: relative differences of near-zero losses mean nothing).
    """
    from lce_tf.center_accumulators import l2_normalize
    from lce_tf.centers import ClassCenters

    rng = np.random.default_rng(seed)
    templates = rng.uniform(size=(num_classes, image_size, image_size, 1))
    labels = np.tile(np.arange(num_classes), per_class).astype(np.int64)  # every global batch mixes classes
    images = np.clip(templates[labels] + noise * rng.normal(size=(labels.size, image_size, image_size, 1)), 0, 1)
    centers = l2_normalize(rng.normal(size=(num_classes, embedding_dim)))
    old = ClassCenters(centers, np.full(num_classes, 0.3), np.full(num_classes, per_class),
                       [f"c{j}" for j in range(num_classes)], "synthetic-old", "min")
    return images.astype(np.float32), labels, old


def _train_child(args) -> None:
    """One training process: MultiWorkerMirroredStrategy when TF_CONFIG is set, else no strategy."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else None
    from lce_tf.training import TrainConfig, train

    p = TRAIN_DEFAULTS
    images, labels, old = training_data(p["num_classes"], p["per_class"], p["image_size"], p["embedding_dim"],
                                        p["noise"])
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(p["global_batch"], drop_remainder=True)
    options = tf.data.Options()
    # Every worker reads the same global batches; the strategy gives replica r the r-th slice of each.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    config = TrainConfig(architecture="small_cnn", embedding_dim=p["embedding_dim"], loss="arcface",
                         compat=modes.LCE.name,
                         epochs=p["epochs"], batch_size=p["global_batch"], learning_rate=1e-3, seed=0,
                         sync_batch_norm=args.sync_batch_norm)
    start = time.perf_counter()
    _, history = train(config, dataset, num_classes=p["num_classes"], input_shape=images.shape[1:],
                       old_centers=old, strategy=strategy, verbose=0)
    print(json.dumps({"history": {k: [float(v) for v in vs] for k, vs in history.items()},
                      "seconds": time.perf_counter() - start,
                      "replicas": strategy.num_replicas_in_sync if strategy else 1}))


def free_ports(n: int) -> list[int]:
    """n distinct free localhost ports (bound to port 0, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _train_cmd(sync_batch_norm: bool) -> list[str]:
    return ([sys.executable, os.path.abspath(__file__), "_train-child"]
            + (["--sync-batch-norm"] if sync_batch_norm else []))


def _child_env(extra: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run_training(num_workers: int = 2, rtol: float = 1e-3, *, sync_batch_norm: bool = True,
                 timeout: float = 600.0) -> dict:
    """Trains with `num_workers` MultiWorkerMirroredStrategy processes and with one plain process, concurrently.

    Returns the per-epoch losses of both, their max relative difference and whether it is <= rtol.
    """
    ports = free_ports(num_workers)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    procs = []
    start = time.perf_counter()
    for index in range(num_workers):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(_train_cmd(sync_batch_norm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=_child_env({"TF_CONFIG": tf_config}), cwd=ROOT))
    single = subprocess.Popen(_train_cmd(sync_batch_norm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_child_env({}), cwd=ROOT)
    outputs = []
    try:
        for proc in procs + [single]:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"training process failed (exit {proc.returncode}):\n{err[-3000:]}")
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs + [single]:
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - start
    multi, ref = outputs[0], outputs[-1]
    comparison = {}
    for key in LOSS_KEYS:
        a, b = np.asarray(multi["history"][key]), np.asarray(ref["history"][key])
        rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
        comparison[key] = {"multi_worker": a.tolist(), "single_worker": b.tolist(),
                           "max_rel_diff": float(rel.max()), "max_abs_diff": float(np.abs(a - b).max())}
    workers_agree = all(o["history"] == multi["history"] for o in outputs[:num_workers])
    max_rel = max(c["max_rel_diff"] for c in comparison.values())
    return {"num_workers": num_workers, "replicas": multi["replicas"], "cluster": cluster, "settings": TRAIN_DEFAULTS,
            "architecture": "small_cnn", "mode": modes.LCE.name, "loss": "arcface", "sync_batch_norm": sync_batch_norm,
            "rtol": rtol,
            "per_epoch": comparison, "max_rel_diff": max_rel, "within_tolerance": bool(max_rel <= rtol),
            "workers_report_the_same_history": workers_agree,
            "seconds_multi_worker_fit": multi["seconds"], "seconds_single_fit": ref["seconds"],
            "seconds_wall_all_processes": wall}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "apache_beam", "tensorflow"):
        try:
            from importlib.metadata import version
            versions[name] = version({"apache_beam": "apache-beam"}.get(name, name))
        except Exception:  # pylint: disable=broad-except
            versions[name] = "?"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), **versions,
            "load_average_at_start": os.getloadavg()}


def markdown(report: dict) -> str:
    lines = ["# Scale-out benchmark (`make bench-scale`)", "",
             f"Date: {report['date']}  ", f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
             f"{report['machine']['memory_gb']} GB; Python {report['machine']['python']}, apache-beam "
             f"{report['machine']['apache_beam']}, tensorflow {report['machine']['tensorflow']}; load average "
             f"at start {', '.join(f'{v:.2f}' for v in report['machine']['load_average_at_start'])}.", ""]
    c = report.get("centers")
    if c:
        lines += ["## Center extraction: Beam (DirectRunner, multi-processing, "
                  f"{c['beam_workers']} workers{'; and on Dask' if any(m in DASK_MODES for m in c['summary']) else ''}) "
                  "vs in-process", "",
                  f"{c['classes']:,} classes, dimension {c['dim']}, boundary rule `{c['boundary']}`, "
                  f"shards of {c['shard_rows']:,} rows read {c['chunk_rows']:,} rows at a time; beam-spill "
                  f"writes shards of {c.get('spill_rows', 0):,} rows. Beam options: `{' '.join(c['beam_options'])}`. "
                  "Start-up of the DirectRunner alone (a two-element pipeline, before and after the sizes): "
                  f"{', '.join(f'{v:.1f}' for v in c.get('beam_startup_seconds', [])) or '-'} s; steady state = "
                  "examples / (time − mean start-up).", "",
                  "| examples | mode | time (s) | examples/s | Beam/in-process | steady-state examples/s | "
                  "steady Beam/in-process | driver peak RSS (MB) | worker peak RSS (MB) | max abs Δ centers | "
                  "max abs Δ boundaries |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c["rows"]:
            for mode, f in row["modes"].items():
                ratio = f.get("throughput_ratio_vs_inprocess")
                steady, steady_ratio = f.get("steady_throughput_per_s"), f.get("steady_ratio_vs_inprocess")
                lines.append(
                    f"| {row['num_examples']:,} | {mode} | {f['seconds']:.2f} | {f['throughput_per_s']:,.0f} | "
                    f"{'' if ratio is None else f'{ratio:.2f}'} | {'' if steady is None else f'{steady:,.0f}'} | "
                    f"{'' if steady_ratio is None else f'{steady_ratio:.2f}'} | {f['driver_peak_mb']:.0f} | "
                    f"{', '.join(f'{v:.0f}' for v in f['worker_peak_mb']) or '-'} | "
                    f"{f.get('max_abs_diff_centers', ''):{'.1e' if 'max_abs_diff_centers' in f else ''}} | "
                    f"{f.get('max_abs_diff_boundaries', ''):{'.1e' if 'max_abs_diff_boundaries' in f else ''}} |")
        lines += [""]
        dask_rows = [(row["num_examples"], mode, f) for row in c["rows"] for mode, f in row["modes"].items()
                     if mode in DASK_MODES]
        if dask_rows:
            f0 = dask_rows[0][2]
            lines += [f"Dask rows ({', '.join(sorted({m for _, m, _ in dask_rows}))}): the same transform on "
                      f"lce_tf/beam/dask_runner.py's DaskRunner against a dask.distributed LocalCluster of "
                      f"{c['beam_workers']} worker processes (one thread each) started before the timer; options "
                      f"`{' '.join(f0.get('beam_options', []))}` (address of that run). Cluster start "
                      + ", ".join(f"{f['dask_cluster_start_seconds']:.1f}" for _, _, f in dask_rows)
                      + " s; a first two-element pipeline on it (the workers import Beam and lce_tf: once per cluster) "
                      + ", ".join(f"{f['dask_warmup_seconds']:.1f}" for _, _, f in dask_rows)
                      + " s; a second one (the per-run fixed cost, subtracted for the steady state) "
                      + ", ".join(f"{f['dask_startup_seconds']:.1f}" for _, _, f in dask_rows)
                      + " s. Bit-identical to in-process (np.array_equal of centers, boundaries, counts): "
                      + ", ".join(f"{n:,} {m} {'yes' if f.get('bit_identical') else 'NO'}" for n, m, f in dask_rows)
                      + ".", ""]
        marg = {m: s.get("marginal_throughput_per_s") for m, s in c["summary"].items()}
        if all(v is not None for v in marg.values()):
            lines += ["Marginal throughput between the smallest and the largest size (examples/s, start-up "
                      "excluded): " + ", ".join(f"{m} {v:,.0f}" for m, v in marg.items()) + ".", ""]
    for t in report.get("training", []):
        bn = "synchronized BatchNormalization" if t["sync_batch_norm"] else "per-replica BatchNormalization"
        lines += [f"## Training: MultiWorkerMirroredStrategy, {t['num_workers']} local workers vs one worker, {bn}",
                  "", f"Model: `small_cnn`, lce mode, ArcFace; settings {t['settings']}; cluster "
                  f"`{json.dumps(t['cluster'])}` ({t['replicas']} replicas). Relative tolerance {t['rtol']:g}: "
                  f"max relative difference {t['max_rel_diff']:.2e} "
                  f"({'within' if t['within_tolerance'] else 'OUTSIDE'} tolerance); the workers report "
                  f"{'the same' if t['workers_report_the_same_history'] else 'DIFFERENT'} histories.", "",
                  "| term | epoch | 2 workers | 1 worker | rel. diff |", "|---|---:|---:|---:|---:|"]
        for key, v in t["per_epoch"].items():
            for e, (a, b) in enumerate(zip(v["multi_worker"], v["single_worker"]), 1):
                lines.append(f"| {key} | {e} | {a:.6f} | {b:.6f} | {abs(a - b) / max(abs(b), 1e-12):.1e} |")
        lines += ["", f"Fit time: {t['seconds_multi_worker_fit']:.1f} s (2 workers), {t['seconds_single_fit']:.1f} s "
                  f"(1 worker); all processes, imports included, {t['seconds_wall_all_processes']:.1f} s.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + report["notes"] + [""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="internal")
    child = sub.add_parser("_centers-child")
    child.add_argument("--mode", choices=CENTER_MODES + ("beam-startup",), required=True)
    child.add_argument("--shards-json", required=True)
    child.add_argument("--classes", type=int, required=True)
    child.add_argument("--boundary", default="min")
    child.add_argument("--workers", type=int, default=2)
    child.add_argument("--chunk", type=int, default=16384)
    child.add_argument("--spill-rows", type=int, default=65536)
    child.add_argument("--result", required=True)
    tchild = sub.add_parser("_train-child")
    tchild.add_argument("--sync-batch-norm", action="store_true")
    parser.add_argument("--part", choices=("all", "centers", "training"), default="all")
    parser.add_argument("--quick", action="store_true", help="centers only, at 20,000 embeddings of 200 classes "
                        "(inprocess, beam-two-reads, beam-dask), written under --workdir/quick unless --out is given: "
                        "proves the modes run without touching benchmarks/results")
    parser.add_argument("--sizes", default="100000,1000000,5000000", help="comma-separated numbers of embeddings")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--boundary", default="min")
    parser.add_argument("--modes", default=",".join(DEFAULT_CENTER_MODES),
                        help=f"comma-separated subset of {', '.join(CENTER_MODES)}")
    parser.add_argument("--workers", type=int, default=2, help="Beam DirectRunner worker processes")
    parser.add_argument("--chunk", type=int, default=16384, help="rows per batch")
    parser.add_argument("--shard-rows", type=int, default=50000)
    parser.add_argument("--spill-rows", type=int, default=65536, help="rows per spilled shard (beam-spill)")
    parser.add_argument("--train-workers", type=int, default=2)
    parser.add_argument("--train-rtol", type=float, default=1e-3,
                        help="relative tolerance of the losses with synchronized BatchNormalization")
    parser.add_argument("--train-rtol-local-bn", type=float, default=5e-2,
                        help="relative tolerance with per-replica BatchNormalization")
    parser.add_argument("--notes", default="", help="a text file whose lines go under Notes in scale.md")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "build", "bench_scale"))
    parser.add_argument("--out", default=None,
                        help="directory of scale.json and scale.md ('' to write nothing; default benchmarks/results, "
                        "with --quick WORKDIR/quick)")
    args = parser.parse_args(argv)
    if args.internal == "_centers-child":
        _centers_child(args)
        return 0
    if args.internal == "_train-child":
        _train_child(args)
        return 0
    if args.quick:
        args.part, args.sizes, args.classes = "centers", "20000", 200
        if args.modes == ",".join(DEFAULT_CENTER_MODES):
            args.modes = "inprocess,beam-two-reads,beam-dask"
        if args.out is None:
            args.out = os.path.join(args.workdir, "quick")
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "results")
    args.sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    args.modes = [m for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in CENTER_MODES]
    if unknown:
        parser.error(f"unknown --modes {unknown}; expected some of {', '.join(CENTER_MODES)}")
    os.makedirs(args.workdir, exist_ok=True)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", "scripts/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info()}

    def write() -> None:  # after each part, so a later failure keeps the earlier figures
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scale.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "scale.md"), "w") as f:
            f.write(markdown(report))

    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            report["notes"] = f.read().strip().splitlines()
    if args.part in ("all", "centers"):
        report["centers"] = run_centers(args)
        write()
    if args.part in ("all", "training"):
        report["training"] = []
        for sync, rtol in ((True, args.train_rtol), (False, args.train_rtol_local_bn)):
            t = run_training(args.train_workers, rtol, sync_batch_norm=sync)
            report["training"].append(t)
            print(f"[training] sync_batch_norm={sync}: max relative difference {t['max_rel_diff']:.2e} "
                  f"(tolerance {rtol:g})", flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
