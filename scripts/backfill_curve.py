#!/usr/bin/env python
"""Gradual backfill curve and cross-version ANN check (issue 4) for an old and a new model.

1. Build an index of the gallery with the OLD model (`lce_tf.index.images.build_index`; by default a ScaNN
   tree-AH index, `--config algorithm=tree_ah`, so search is approximate even for small galleries).
2. Cross-version check on that pristine old-model index: new-model queries (mapped into the old space
   with `check_query_compatibility`: `embed` or `embed_compat` = T21) searched with ScaNN against exact
   search over the same vectors, for every algorithm of `--check-algorithms`: recall@10 (tie-robust,
   by scores) and retrieval metrics through the index (top-1, top-5, mAP@100 from the ANN ranking)
   against exact search (`images.compare_ann_to_exact`). Targets: recall@10 >= 0.95
   and |ANN - exact| <= 0.01 (1 point) on top-1, top-5 and mAP@100 (ANN ranking against the exact one).
   For tree-AH, leaves_to_search is also doubled from its default up to all leaves, to show from which
   setting the targets hold.
3. Backfill curve: re-embed the gallery with the NEW model in seeded steps (`images.backfill_from_images`,
   ScaNN upsert in place) from 0 to 100%; at every step the retrieval quality (top-1, mAP;
   `evaluation.retrieval_metrics` on the index's current vectors) of new-model queries (and, for
   reference, old-model queries), the ANN check of step 2 on the mixed (upserted) index, and the ANN
   recall a rebuilt searcher (`EmbeddingIndex.rebuild`) would give at that step.
4. When the new model has a T12 (`transform_old_to_new`) from the old space: the forward-compatible
   curve -- every gallery vector mapped through T12 into the new space (`images.upgrade_with_t12`),
   then re-embedded with the new model's own `embed` step by step; queries use `embed`.
5. Area under each curve (trapezoid over the backfilled fraction in [0, 1], i.e. the mean quality
   during the backfill), reference points M(old, old) and M(new, new) (new model in its own space,
   fully re-indexed), a PNG plot and a JSON with machine, date and command.

Example:

    python scripts/backfill_curve.py --old-model build/demo-cli/models/v1 --new-model build/demo-cli/models/v2-lce \\
        --query build/demo-cli/data/query --gallery build/demo-cli/data/gallery
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RECALL_TARGET = 0.95
METRIC_TOLERANCE = 0.01


def area_under_curve(fractions, values) -> float:
    """Trapezoid area of values over fractions (both [S]; fractions from 0 to 1): the mean quality
    during a backfill whose fraction grows at a constant rate."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def _metrics(queries, query_labels, gallery, gallery_labels) -> dict:
    from lce_tf import evaluation  # pylint: disable=import-outside-toplevel

    result = evaluation.retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    return {"top1": result.top1, "top5": result.top5, "mAP": result.mAP}


def _rebuilt_recall(index, queries, k: int) -> float:
    """recall@k of a copy of `index` whose searcher is retrained on its current vectors (index.rebuild):
    what a rebuild after the backfill step would give (upserts keep the partitions and AH codebooks
    trained on the vectors the index was built from)."""
    from lce_tf.index import images, scann_index  # pylint: disable=import-outside-toplevel

    copy = scann_index.EmbeddingIndex.build(index.ids, index.embeddings, index.versions,
                                            embedding_space=index.embedding_space, model_id=index.model_id,
                                            model_version=index.model_version, config=index.config)
    ann = copy.search(queries, k)[1]
    exact = copy.exact_search(queries, k)[1]
    return images.tie_robust_recall(ann, exact)


def _passes(check: dict) -> bool:
    return bool(check["recall_at_k"] >= RECALL_TARGET and check["max_abs_diff"] <= METRIC_TOLERANCE)


def _check(index, queries, query_classes, k: int, sweep: bool = False) -> dict:
    """`images.compare_ann_to_exact` with the index's own settings; with `sweep` (tree_ah only) also
    leaves_to_search doubled from the configured value up to num_leaves, to find where the targets hold."""
    from lce_tf.index import images  # pylint: disable=import-outside-toplevel

    check = images.compare_ann_to_exact(index, queries, query_classes, k=k)
    check["passes"] = _passes(check)
    check["algorithm"] = index.config.algorithm
    check["config"] = index.config.to_dict()
    if sweep and index.config.algorithm == "tree_ah":
        leaves, total, rows = index.config.leaves_to_search, index.config.num_leaves, []
        while True:
            c = images.compare_ann_to_exact(index, queries, query_classes, k=k, leaves_to_search=leaves)
            rows.append({"leaves_to_search": leaves, "recall_at_k": c["recall_at_k"],
                         "max_abs_diff": c["max_abs_diff"], "passes": _passes(c)})
            if leaves >= total:
                break
            leaves = min(total, 2 * leaves)
        check["leaves_sweep"] = rows
        check["passes_from_leaves_to_search"] = next((r["leaves_to_search"] for r in rows if r["passes"]), None)
    return check


def run(args, log=print) -> dict:
    from lce_tf.index import images, scann_config, scann_index  # pylint: disable=import-outside-toplevel
    from lce_tf.data import read_image_folder  # pylint: disable=import-outside-toplevel
    from lce_tf.serving import load_embedding_model  # pylint: disable=import-outside-toplevel

    started = time.time()
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0 (0: only the cross-version check); received {args.steps}")
    overrides = images.parse_config_overrides(args.config)
    old = load_embedding_model(args.old_model)
    new = load_embedding_model(args.new_model)
    gallery = read_image_folder(args.gallery)
    query_paths, query_classes = images.collect_queries([args.query])
    if any(c is None for c in query_classes):
        raise ValueError(f"query folder {args.query} must hold class sub-folders (QUERY/<class>/<image>)")
    query_labels = np.array(query_classes)

    log(f"building the old-model index of {len(gallery.paths)} gallery images ({old.model_id})")
    index = images.build_index(old, gallery, overrides=overrides, batch_size=args.batch_size)
    old_vectors = index.embeddings.copy()
    gallery_labels = np.array([images.class_of_id(v) for v in index.ids])
    signature = images.signature_for_index(index, new)
    log(f"embedding {len(query_paths)} queries with {new.model_id} ({signature}) and {old.model_id} (embed)")
    q_new = images.embed_paths(new, query_paths, signature=signature, batch_size=args.batch_size)
    q_old = images.embed_paths(old, query_paths, signature="embed", batch_size=args.batch_size)

    report = {
        "benchmark": "backfill_curve",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["scripts/backfill_curve.py"] + list(args.argv)),
        "machine": _machine(),
        "old_model": {"dir": os.path.abspath(args.old_model), "model_id": old.model_id,
                      "embedding_dim": old.embedding_dim},
        "new_model": {"dir": os.path.abspath(args.new_model), "model_id": new.model_id,
                      "embedding_dim": new.embedding_dim, "compatible_with": new.compatible_with,
                      "signature_into_old_space": signature,
                      "has_t12": new.has_signature("transform_old_to_new")},
        "data": {"gallery": os.path.abspath(args.gallery), "query": os.path.abspath(args.query),
                 "gallery_images": len(index), "gallery_classes": gallery.num_classes,
                 "query_images": len(query_paths)},
        "index_config": index.config.to_dict(), "seed": args.seed, "k": args.k,
    }

    # Reference points: old/old, and the new model in its own space with a fully re-embedded gallery.
    references = {"old/old": _metrics(q_old, query_labels, old_vectors, gallery_labels)}
    if new.embedding_dim and new.has_signature("embed"):
        log("reference: new model in its own space, full gallery")
        g_own = new.embed_folder(gallery, signature="embed", batch_size=args.batch_size)[0]
        q_own = images.embed_paths(new, query_paths, signature="embed", batch_size=args.batch_size)
        references["new/new (own space, full re-index)"] = _metrics(q_own, query_labels, g_own, gallery_labels)
    report["references"] = references

    # Cross-version check on pristine old-model indexes (one per ANN algorithm).
    checks = {}
    for algorithm in args.check_algorithms.split(","):
        algorithm = algorithm.strip()
        cfg = scann_config.IndexConfig.for_size(len(index), index.dim, **{**overrides, "algorithm": algorithm})
        probe = scann_index.EmbeddingIndex.build(index.ids, old_vectors, old.model_id,
                                                 embedding_space=index.embedding_space, model_id=old.model_id,
                                                 config=cfg)
        checks[algorithm] = _check(probe, q_new, query_classes, args.k, sweep=True)
        c = checks[algorithm]
        extra = ""
        if "leaves_sweep" in c:
            extra = (f" (leaves_to_search {c['config']['leaves_to_search']} of {c['config']['num_leaves']}; targets "
                     f"hold from leaves_to_search={c['passes_from_leaves_to_search']})")
        log(f"cross-version check ({algorithm}): recall@{args.k} {c['recall_at_k']:.4f}, max |ANN - exact| "
            f"{c['max_abs_diff']:.4f} -> {'PASS' if c['passes'] else 'FAIL'}{extra}")
    report["cross_version_check"] = {
        "targets": {"recall_at_10": RECALL_TARGET, "max_abs_metric_diff": METRIC_TOLERANCE},
        "by_algorithm": checks, "passes": all(c["passes"] for c in checks.values())}

    fractions = [round(i / args.steps, 6) for i in range(args.steps + 1)] if args.steps else []
    t12_index = None
    if fractions and new.has_signature("transform_old_to_new") and (
            (new.compatible_with or {}).get("embedding_space") == index.embedding_space):
        # the same (overridden) configuration as the old-space index, for the new dimension
        t12_config = scann_config.IndexConfig.for_size(len(index), new.embedding_dim, **overrides)
        t12_index = images.upgrade_with_t12(index, new, config=t12_config)

    curves = {}
    rows = []
    if fractions:
        log(f"backfill (re-embed with {new.model_id} via {signature}, old space) in {args.steps} steps")
    for f in fractions:
        step = images.backfill_from_images(index, new, args.gallery, f, seed=args.seed, batch_size=args.batch_size)
        row = {"fraction": step["fraction"], "target": f, "backfilled_now": step["backfilled"],
               "new_queries": _metrics(q_new, query_labels, index.embeddings, gallery_labels),
               "old_queries": _metrics(q_old, query_labels, index.embeddings, gallery_labels),
               "ann_check": _check(index, q_new, query_classes, args.k),
               "ann_recall_after_rebuild": _rebuilt_recall(index, q_new, args.k)}
        rows.append(row)
        log(f"  {row['fraction']:6.1%}: new queries top-1 {row['new_queries']['top1']:.4f} mAP "
            f"{row['new_queries']['mAP']:.4f}; old queries top-1 {row['old_queries']['top1']:.4f}; "
            f"ANN recall@{args.k} {row['ann_check']['recall_at_k']:.4f} (after a rebuild "
            f"{row['ann_recall_after_rebuild']:.4f})")
    if rows:
        curves["reembed_old_space"] = {"description": f"old-model index; gallery re-embedded with the new model's "
                                                  f"{signature!r} step by step; new queries via {signature!r}",
                                       "steps": rows}
    if t12_index is not None:
        rows = []
        q_t12 = images.embed_paths(new, query_paths, signature="embed", batch_size=args.batch_size)
        log(f"forward-compatible backfill: T12-mapped gallery, then re-embed with {new.model_id} (embed)")
        for f in fractions:
            step = images.backfill_from_images(t12_index, new, args.gallery, f, seed=args.seed,
                                               batch_size=args.batch_size)
            row = {"fraction": step["fraction"], "target": f, "backfilled_now": step["backfilled"],
                   "new_queries": _metrics(q_t12, query_labels, t12_index.embeddings, gallery_labels),
                   "ann_check": _check(t12_index, q_t12, query_classes, args.k),
                   "ann_recall_after_rebuild": _rebuilt_recall(t12_index, q_t12, args.k)}
            rows.append(row)
            log(f"  {row['fraction']:6.1%}: new queries top-1 {row['new_queries']['top1']:.4f} mAP "
                f"{row['new_queries']['mAP']:.4f}; ANN recall@{args.k} {row['ann_check']['recall_at_k']:.4f} "
                f"(after a rebuild {row['ann_recall_after_rebuild']:.4f})")
        curves["t12_then_reembed_new_space"] = {
            "description": "gallery mapped through the new model's T12 into its own space, then re-embedded with "
                           "its 'embed' step by step; new queries via 'embed'", "steps": rows}
    for curve in curves.values():
        x = [r["fraction"] for r in curve["steps"]]
        curve["area"] = {f"{who}_{m}": area_under_curve(x, [r[who][m] for r in curve["steps"]])
                         for who in ("new_queries", "old_queries") if who in curve["steps"][0] for m in ("top1", "mAP")}
        curve["min_ann_recall_at_k"] = min(r["ann_check"]["recall_at_k"] for r in curve["steps"])
        curve["max_ann_metric_diff"] = max(r["ann_check"]["max_abs_diff"] for r in curve["steps"])
        curve["min_ann_recall_after_rebuild"] = min(r["ann_recall_after_rebuild"] for r in curve["steps"])
    report["curves"] = curves

    from lce_tf.report import plot_curves  # pylint: disable=import-outside-toplevel

    os.makedirs(args.out_dir, exist_ok=True)
    plot_path = os.path.join(args.out_dir, f"{args.name}.png")
    report["plot"] = os.path.basename(plot_path) if curves else None
    series = {}
    for name, curve in curves.items():
        x = [100 * r["fraction"] for r in curve["steps"]]
        tag = "re-embed (old space)" if name == "reembed_old_space" else "T12 + re-embed (new space)"
        for m in ("top1", "mAP"):
            series[f"{m}, new queries, {tag} (area {curve['area'][f'new_queries_{m}']:.3f})"] = (
                x, [r["new_queries"][m] for r in curve["steps"]])
    for name, ref in references.items():
        series[f"top1 {name}"] = ([0, 100], [ref["top1"]] * 2)
    if curves:
        from lce_tf.report import save_figure  # pylint: disable=import-outside-toplevel

        figure = plot_curves(series, xlabel="gallery backfilled with the new model (%)", ylabel="retrieval quality",
                             title=f"Backfill {old.model_id} -> {new.model_id}")
        figure.set_size_inches(10.5, 4.6)
        figure.axes[0].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        save_figure(figure, plot_path)
    report["total_seconds"] = time.time() - started
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    log(f"cross-version check: {'PASS' if report['cross_version_check']['passes'] else 'FAIL'}; wrote {json_path}"
        + (f" and {plot_path}" if curves else "") + f" in {report['total_seconds']:.0f} s")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-model", required=True, help="the model whose embeddings the index holds")
    parser.add_argument("--new-model", required=True, help="the new model (declared compatible with the old one)")
    parser.add_argument("--query", required=True, help="query image folder QUERY/<class>/<image>")
    parser.add_argument("--gallery", required=True, help="gallery image folder GALLERY/<class>/<image>")
    parser.add_argument("--steps", type=int, default=10,
                        help="backfill steps from 0 to 100%% (default 10; 0 = only the cross-version check)")
    parser.add_argument("--seed", type=int, default=0, help="backfill order seed")
    parser.add_argument("--k", type=int, default=10, help="k of the ANN recall")
    parser.add_argument("--config", action="append", default=None, metavar="JSON|KEY=VALUE",
                        help="IndexConfig overrides of the curve index (default algorithm=tree_ah)")
    parser.add_argument("--check-algorithms", default="tree_ah,ah",
                        help="ANN algorithms of the cross-version check (comma-separated)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--name", default="backfill_curve", help="output file stem (NAME.json, NAME.png)")
    args = parser.parse_args(argv)
    args.config = args.config or ["algorithm=tree_ah"]
    args.argv = list(sys.argv[1:] if argv is None else argv)

    def log(message: str) -> None:
        print(f"[backfill-curve {time.strftime('%H:%M:%S')}] {message}", flush=True)

    try:
        report = run(args, log)
    except ValueError as e:
        print(f"backfill_curve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0 if report["cross_version_check"]["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
