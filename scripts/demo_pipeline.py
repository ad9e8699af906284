#!/usr/bin/env python
"""The pipeline walk-through: a compatible model upgrade through the lce-tf TFX pipeline, locally.

1. prepare the glyph data (CJK characters from the installed fonts; random stroke patterns when fewer
   than three CJK fonts are installed): by default all 2,064 characters the installed fonts share at
   20 px, 1,445 training classes and 619 held-out query/gallery classes;
2. run the pipeline for v1 (small CNN, half of the training classes). The metadata store is empty, so
   v1 is trained independently, blessed on its own accuracy, pushed, and its gallery is indexed;
3. run the pipeline for v2 (larger CNN, all training classes, mode lce-instance: LCE plus the per-image
   InfoNCE term; `--mode lce` runs the paper's method): v1 is resolved from the metadata store as the
   old model, its class centers are computed with Beam, v2 is trained against them and v1 (with --independent also the reference v2* trained without compatibility terms), T12 (v1 -> v2) is
   fitted on the training pairs, and v2 is validated on both upgrade routes (backward: v2 queries
   against the untouched v1 gallery; forward: against the v1 gallery moved by T12) and pushed only if
   a route blesses it (`compatibility`, default either). On a forward blessing the served v1 index is
   upgraded through T12 (no image read) and T12 ships with the pushed model;
4. print the backward and forward rows, the verdict and which route blessed v2, and where the pushed
   model, the report and the index are;
5. search v2 queries against the served index (`lce-tf index search`): the v1 gallery upgraded through T12
   (forward blessing) or the v1 index itself (backward); no gallery image is re-encoded either way.

Both runs go through the same `pipeline.local_runner.run_local` (LocalDagRunner, SQLite metadata under
WORKDIR/pipeline, Beam DirectRunner multi-processing) in this one process, so TFX is imported once.
WORKDIR/pipeline is deleted first (unless --keep-pipeline): v1 must be the first model of the store.
The same configuration runs from the command line with `lce-tf pipeline run --config FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the components/ and pipeline/ packages of this checkout
    sys.path.insert(0, ROOT)

from lce_tf import modes  # noqa: E402  (after the path set-up)


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_data(out: str, kind: str, classes: int, test_fraction: float, size: int, seed: int) -> str:
    from lce_tf import glyphs, synthetic

    if kind == "auto":
        kind = "glyphs" if len(glyphs.discover_cjk_fonts()) >= 3 else "synthetic"
        if kind == "synthetic":
            say("fewer than 3 CJK fonts installed (scripts/install_fonts.sh installs them): using the synthetic "
                "stroke dataset")
    test = max(1, round(classes * test_fraction))
    summary_file = os.path.join(out, "dataset.json")
    wanted = {"kind": kind, "seed": seed, "size": size, "train": classes - test, "test": test}
    if os.path.isfile(summary_file):
        with open(summary_file, encoding="utf-8") as f:
            have = json.load(f)
        if {"kind": have.get("kind"), "seed": have.get("seed"), "size": have.get("size"),
                "train": have["num_classes"]["train"],
                "test": have["num_classes"]["query"]} == wanted:
            say(f"reusing the {kind} dataset in {out}")
            return kind
    builder = glyphs.build_glyph_dataset if kind == "glyphs" else synthetic.build_synthetic_dataset
    say(f"building the {kind} dataset in {out}: {classes - test} training and {test} test classes")
    builder(out, num_train_classes=classes - test, num_test_classes=test, size=size, seed=seed, overwrite=True,
            progress=say)
    return kind


def format_routes(metrics: dict) -> str:
    """The two upgrade routes side by side (from the validator's metrics.json): pair, top-1, mAP, verdict."""
    old, new = metrics["old"], metrics["candidate"]
    pairs = {(p["query"], p["gallery"], p.get("via"), p.get("direction")): p for p in metrics["pairs"]}
    bar = pairs[(old, old, None, None)]
    lines = [f"{'route':<9} {'pair':<22} {'top-1':>7} {'mAP':>7}   criterion (> M({old}, {old}) = "
             f"{bar['top1']:.4f} / {bar['mAP']:.4f})"]
    for route, key, label in (("backward", (new, old, None, None), f"M({new}, {old})"),
                              ("forward", (new, old, "T12", "old_to_new"), f"M({new}, T12({old}))")):
        p = pairs.get(key)
        if p is None:
            lines.append(f"{route:<9} {label:<22} {'n/a':>7} {'n/a':>7}   not measured")
            continue
        ok = {m: p[m] > bar[m] for m in ("top1", "mAP")}
        lines.append(f"{route:<9} {label:<22} {p['top1']:7.4f} {p['mAP']:7.4f}   top-1 {'yes' if ok['top1'] else 'NO'}, "
                     f"mAP {'yes' if ok['mAP'] else 'NO'}: {'PASS' if all(ok.values()) else 'FAIL'}")
    lines.append(f"verdict: {metrics['verdict']}" + (f" through the {metrics['route']} route" if metrics.get("route")
                                                     else "") + f" (compatibility {metrics.get('compatibility')!r})")
    return "\n".join(lines)


def search_v2_against_index(index_dir: str, what: str, model_dir: str, query_dir: str, out_json: str, k: int) -> None:
    """`lce-tf index search` of the v2 queries against the served index; prints the command and top-1/top-k."""
    from lce_tf import cli

    argv = ["index", "search", "--index", index_dir, "--model", model_dir, "--data", query_dir, "--k", str(k),
            "--json", out_json]
    print("\n$ lce-tf " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if cli.main(argv) == 0:
        with open(out_json, encoding="utf-8") as f:
            results = json.load(f)
        queries = results["queries"]
        top1 = sum(q["results"][0]["class"] == q["class"] for q in queries) / len(queries)
        topk = sum(any(r["class"] == q["class"] for r in q["results"]) for q in queries) / len(queries)
        say(f"v2 queries against {what} ({results['index']['count']} entries, versions "
            f"{results['index']['version_counts']}, signature {results['signature']!r}): top-1 {top1:.3f}, top-{k} "
            f"{topk:.3f} over {len(queries)} queries")
        return
    # The index command is not available (or refused): the same search with lce_tf.index directly.
    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.index.operations import check_query_compatibility
    from lce_tf.index.scann_index import EmbeddingIndex
    from lce_tf.serving import load_embedding_model

    index = EmbeddingIndex.load(index_dir)
    model = load_embedding_model(model_dir)
    signature = check_query_compatibility(index, model.metadata)
    folder = read_image_folder(query_dir)
    queries = model.embed(load_images(folder.paths, model.input_shape), signature=signature)
    ids, _ = index.search(queries, k, embedding_space=index.embedding_space)
    truth = [folder.class_names[j] for j in folder.labels]
    top1 = sum(row[0].split("/")[0] == c for row, c in zip(ids, truth)) / len(truth)
    say(f"v2 queries against {what} via lce_tf.index (signature {signature!r}): top-1 {top1:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/demo")
    parser.add_argument("--classes", type=int, default=2064,
                        help="total classes of the generated dataset (2,064: every character the fonts share)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=20, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of v2")
    parser.add_argument("--old-epochs", type=int, default=4, help="epochs of v1 (the small network)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-kind", choices=("auto", "glyphs", "synthetic"), default="auto")
    parser.add_argument("--independent", action="store_true",
                        help="also train the independent reference v2* (update gain, sacrifice; ~2 more minutes)")
    parser.add_argument("--margin-top1", type=float, default=0.0, help="validator margin on top-1 (0 = strict)")
    parser.add_argument("--margin-map", type=float, default=0.0, help="validator margin on mAP (0 = strict)")
    parser.add_argument("--compatibility", choices=("backward", "forward", "either"), default="either",
                        help="the upgrade route that may bless v2")
    parser.add_argument("--mode", choices=modes.PIPELINE_MODE_NAMES, default=modes.LCE_INSTANCE.name,
                        help="v2's compatibility mode (lce = the paper's method)")
    parser.add_argument("--beam-workers", type=int, default=2)
    parser.add_argument("--keep-pipeline", action="store_true",
                        help="keep WORKDIR/pipeline from an earlier demo (by default it is deleted first, so v1 is "
                        "the first model of a new metadata store; the generated data is reused either way)")
    args = parser.parse_args()

    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    components_log = logging.getLogger("components")  # one line per component step
    components_log.setLevel(logging.INFO)
    components_log.addHandler(handler)
    components_log.propagate = False

    start = time.time()
    work = os.path.abspath(args.workdir)
    data = os.path.join(work, "data")
    root = os.path.join(work, "pipeline")
    if not args.keep_pipeline and os.path.isdir(root):
        import shutil

        shutil.rmtree(root)
    prepare_data(data, args.data_kind, args.classes, args.test_fraction, args.size, args.seed)

    from pipeline.config import PipelineConfig
    from pipeline.local_runner import format_run_summary, run_local, run_summary

    common = dict(train_dir=os.path.join(data, "train"), query_dir=os.path.join(data, "query"),
                  gallery_dir=os.path.join(data, "gallery"), pipeline_root=root, embedding_dim=args.dim,
                  batch_size=args.batch_size, seed=args.seed, beam_workers=args.beam_workers,
                  margin_top1=args.margin_top1, margin_map=args.margin_map, compatibility=args.compatibility)
    v1 = PipelineConfig(**common, version="v1", architecture="small_cnn", train_classes="0:50%",
                        epochs=args.old_epochs)
    v2 = PipelineConfig(**common, version="v2", architecture="cnn", mode=args.mode, epochs=args.epochs,
                        train_independent_reference=args.independent)
    summaries = {}
    for config in (v1, v2):
        with open(os.path.join(work, f"{config.version}.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
        say(f"pipeline run {config.version} (mode {config.mode}, {config.architecture}); the same from the "
            f"command line: lce-tf pipeline run --config {os.path.join(work, config.version + '.json')}")
        seconds = run_local(config)
        summaries[config.version] = run_summary(config)
        say(f"run {config.version} finished in {seconds:.0f} s")

    s1, s2 = summaries["v1"], summaries["v2"]
    print("\n" + "=" * 100)
    print(format_run_summary(s2))
    with open(s2["metrics"], encoding="utf-8") as f:
        metrics = json.load(f)
    print("\n" + format_routes(metrics))
    for name, gain in metrics.get("update_gain", {}).items():
        sacrifice = metrics.get("new_model_sacrifice", {}).get(metrics["criterion"][name]["query"], {})
        print(f"update gain of {name}: top-1 {gain['top1']:.3f}, mAP {gain['mAP']:.3f}; new-model sacrifice "
              f"top-1 {sacrifice.get('top1', float('nan')):.3f}, mAP {sacrifice.get('mAP', float('nan')):.3f}")
    print(f"v1: pushed to {s1['pushed_destination']}; gallery index {s1['index_dir']}")
    print(f"v2: {'pushed to ' + s2['pushed_destination'] if s2['pushed'] else 'NOT pushed (not blessed)'}; "
          f"model {s2['model_dir']}")
    print(f"compatibility report (open in a browser): {s2['report']}")
    print(f"metadata store: {v2.resolved().metadata_path}; pushed versions: {v2.resolved().serving_dir}")
    print("=" * 100)

    served_index = s2["index_dir"] if s2["pushed"] and s2["route"] == "forward" else s1["index_dir"]
    if served_index:
        model_dir = s2["pushed_destination"] if s2["pushed"] else s2["model_dir"]
        what = "the v1 gallery upgraded through T12" if served_index == s2["index_dir"] else "the v1 index"
        search_v2_against_index(served_index, what, model_dir, common["query_dir"],
                                os.path.join(work, "v2_queries_on_served_index.json"), k=5)
    route = f" through the {s2['route']} route" if s2["pushed"] else ""
    say(f"demo finished in {time.time() - start:.0f} s: v2 {s2['verdict']}{route}"
        + ("" if s2["pushed"] else " -- the gate refused it (reasons above); v1 stays the served model"))
    # Exit status 0 when the pipeline did its job: v1 pushed and v2 judged (either verdict).
    return 0 if s1["pushed"] and s2["verdict"] else 1


if __name__ == "__main__":
    sys.exit(main())
