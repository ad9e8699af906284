"""The `lce-tf` command.

    lce-tf train     --data DIR --out MODEL_DIR [--compat lce --old-model DIR | --old-centers FILE] ...
    lce-tf centers   --model MODEL_DIR --data DIR --out FILE.npz [--beam-runner direct|dask [--dask-address A]]
    lce-tf evaluate  --query DIR --gallery DIR --model NAME=MODEL_DIR [--model ...] [--transform NAME=DIR ...]
                     [--json OUT.json]
    lce-tf transform fit --old-model OLD_DIR --new-model NEW_DIR --data TRAIN_DIR --out TRANSFORM_DIR
                     [--direction old-to-new|both] [--epochs N] [--batch-size N] [--seed N]
    lce-tf data      glyphs|synthetic --out DIR
    lce-tf index     build --model MODEL_DIR --data GALLERY_DIR --out INDEX_DIR [--config K=V]
                           [--backend scann|milvus [--milvus-uri URI] [--milvus-alias NAME]]
                     import --vectors FILE --ids FILE --space NAME --out INDEX_DIR [--model DIR]
                            [--vector-column C] [--id-column C] [--backend ... as build]   (vectors you have)
                     search --index INDEX_DIR --model MODEL_DIR --data QUERY_DIR_OR_FILES [--k K] [--json F]
                            [--param K=V]
                     backfill --index INDEX_DIR --model NEW_MODEL_DIR (--data GALLERY_DIR --fraction F
                              | --t12 --out DIR)
                     upgrade --index INDEX_DIR --transform TRANSFORM_DIR [--transform ...] --out NEW_INDEX_DIR
                             [--compose]
    lce-tf model     import SRC --out MODEL_DIR --embedding-space NAME --preprocess unit|raw|FAMILY|scale=A,offset=B
                            [--image-size H W [C]] [--signature S] [--output O]
                            [--check VECTORS --check-ids IDS --check-images DIR]   (a model trained outside lce-tf)
    lce-tf pipeline  run [--config FILE] [--set KEY=VALUE ...]     (the TFX pipeline, LocalDagRunner)
                     compile [--config FILE] [--set KEY=VALUE ...] --out DIR   (Kubeflow v2 JSON + v1 YAML)

Bad input ends with one line `lce-tf: error: ...` on stderr and exit code 2, never a traceback. This
module imports nothing heavy at import time, so `lce-tf --help` answers at once; TensorFlow is
imported by the command that needs it.

At about 850 lines this file is the argument parsers of every command plus the few lines that adapt
each to its library call; the work lives in lce_tf. The next command group should move its parser and
glue into a module of its own (the `train` flags already come from lce_tf.train_config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import lce_tf
from lce_tf import defaults, fileio

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input found after argument parsing."""


def stage(message: str) -> None:
    """Prints one progress line per stage of long work."""
    print(f"[lce-tf {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Shared steps


def _read_folder(path: str, classes: Optional[str] = None):
    from lce_tf import data

    folder = data.read_image_folder(path)
    if classes:
        folder = folder.subset_classes(data.select_classes(folder.class_names, classes))
    return folder


def _centers_for_folder(model, folder, boundary: str, batch_size: int = 256):
    """Old-model class centers over an image folder (docs/design.md item 1, exact two-pass)."""
    from lce_tf import centers as lce_centers

    embeddings, labels = model.embed_folder(folder, batch_size=batch_size)
    return lce_centers.compute_class_centers(embeddings, labels, folder.class_names, boundary=boundary,
                                             source_model_id=model.model_id)


# ---------------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    """`lce-tf train`: the flags adapted to `lce_tf.training_run.run_training`, which does the run."""
    from lce_tf import train_config, training
    from lce_tf.training_run import TrainingData, run_training

    config = train_config.from_cli_args(args, version=args.version or os.path.basename(os.path.normpath(args.out)))
    config.validate()
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"Output {args.out} already exists; choose a new --out or pass --overwrite.")

    def read_data() -> TrainingData:
        from lce_tf import data, datasets

        stage(f"reading training images from {args.data}")
        folder = _read_folder(args.data, args.classes)
        input_shape = config.input_shape(data.infer_image_shape(folder))  # --image-size, else the data's
        stage(f"{len(folder.class_names)} classes, {len(folder.paths)} images, input shape {input_shape}")

        def compute_centers(model):
            if model is old_model_loaded:
                stage(f"computing old class centers with {model.model_id} ({args.boundary})")
            else:
                stage(f"computing the frozen new model's class centers ({model.model_id})")
            return _centers_for_folder(model, folder, args.boundary)

        def make_dataset(config):
            return datasets.make_image_dataset(folder, input_shape, config.batch_size, shuffle=True,
                                               seed=config.seed, shift_pixels=config.shift_pixels,
                                               in_memory=False if args.stream else None), None

        return TrainingData(folder.class_names, input_shape, make_dataset, compute_centers)

    old_model_loaded = None

    def load_old_model():
        nonlocal old_model_loaded
        from lce_tf.serving import load_embedding_model

        old_model_loaded = load_embedding_model(args.old_model)
        return old_model_loaded

    def load_new_model():
        from lce_tf.serving import load_embedding_model

        return load_embedding_model(args.new_model)

    def load_old_centers():
        from lce_tf.centers import ClassCenters

        return ClassCenters.load(args.old_centers)

    def announce(config, _data) -> None:
        stage(f"training {config.module_file or config.architecture} D={config.embedding_dim} loss={config.loss} "
              f"compat={config.compat} for {config.epochs} epochs")

    names = training.InputNames(
        dim="--dim", centers=f"Old centers {args.old_centers or ''}".strip(),
        missing_centers="--compat {mode} needs --old-centers FILE or --old-model DIR.",
        missing_old_model="--compat {mode} needs --old-model DIR.",
        missing_new_model="--compat {mode} needs --new-model DIR (the frozen new model).")
    result = run_training(config, read_data, old_model=load_old_model if args.old_model else None,
                          old_centers=load_old_centers if args.old_centers else None,
                          new_model=load_new_model if args.new_model else None, names=names, out_dir=args.out,
                          overwrite=args.overwrite, on_start=announce, verbose=args.verbose)
    stage(f"exported {result.metadata['model_id']} to {args.out} ({result.final_losses()}; {result.collapse_text()})")
    return 0


# ---------------------------------------------------------------------------------------------------
# centers


def _check_beam_flags(args: argparse.Namespace) -> None:
    if args.beam_runner != "dask" and args.dask_address:
        raise UsageError("--dask-address needs --beam-runner dask.")
    if args.beam_runner == "dask" and not args.dask_address:
        raise UsageError("--beam-runner dask needs --dask-address tcp://HOST:PORT (the dask scheduler).")
    if args.beam_workers < 1:
        raise UsageError(f"--beam-workers must be >= 1; received {args.beam_workers}.")
    if args.beam_runner == "dask":  # before any work: a wrong or unreachable scheduler fails at once
        from lce_tf.beam.dask_runner import check_scheduler
        from lce_tf.beam.options import check_dask_address

        check_dask_address(args.dask_address, "--dask-address")
        args.dask_workers = check_scheduler(args.dask_address)


def _centers_with_beam(args: argparse.Namespace, folder, model):
    """The ClassCenterExtractor's Beam job (lce_tf.beam.centers.extract_class_centers) over the folder's images.

    The folder is written as TFRecords into a work directory (`--beam-temp`, by default beside --out),
    where the workers also spill pass 2's input and write the result; the directory is removed at the end.
    """
    import shutil
    import uuid

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from lce_tf import tfrecords
    from lce_tf.beam import centers as centers_beam
    from lce_tf.beam.options import dask_beam_args, direct_beam_args
    from lce_tf.centers import ClassCenters
    from lce_tf.serving import read_model_metadata

    if args.beam_runner == "dask":
        workers = args.dask_workers  # counted by _check_beam_flags
        beam_args = dask_beam_args(args.dask_address)
        stage(f"Beam on the dask scheduler {args.dask_address} ({workers} workers)")
    else:
        workers = args.beam_workers
        beam_args = direct_beam_args(workers)
        stage(f"Beam on the DirectRunner ({workers} worker processes)")
    model_dir = os.path.abspath(args.model)
    shape = tuple(int(v) for v in read_model_metadata(model_dir)["input_shape"])
    parent = os.path.abspath(args.beam_temp or os.path.dirname(os.path.abspath(args.out)))
    work = os.path.join(parent, f".lce-tf-centers-{uuid.uuid4().hex[:12]}")
    try:
        tfrecords.write_tfrecords(folder, os.path.join(work, "records", "data"),
                                  num_shards=min(len(folder.paths), 2 * workers))
        result = os.path.join(work, "class_centers.npz")
        with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
            centers_beam.extract_class_centers(
                pipeline, os.path.join(work, "records", "*.tfrecord"), model_dir, shape, folder.class_names, result,
                boundary=args.boundary, source_model_id=model.model_id, spill_dir=os.path.join(work, "spill"))
        return ClassCenters.load(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_centers(args: argparse.Namespace) -> int:
    from lce_tf.center_accumulators import parse_boundary_rule
    from lce_tf.serving import load_embedding_model

    parse_boundary_rule(args.boundary)
    _check_beam_flags(args)
    folder = _read_folder(args.data, args.classes)
    model = load_embedding_model(args.model)
    stage(f"embedding {len(folder.paths)} images of {len(folder.class_names)} classes with {model.model_id}")
    if args.beam_runner:
        centers = _centers_with_beam(args, folder, model)
    else:
        centers = _centers_for_folder(model, folder, args.boundary)
    centers.save(args.out)
    stage(f"wrote {centers.num_classes} centers of dimension {centers.dim} to {args.out} "
          f"(boundary {args.boundary}; mean pairwise cosine {centers.mean_pairwise_cosine():.3f})")
    return 0


# ---------------------------------------------------------------------------------------------------
# evaluate


def _parse_named(flag: str, what: str, specs: Sequence[str]) -> dict[str, str]:
    """NAME=PATH arguments of a repeatable flag, e.g. --model v1=models/v1."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} expects NAME={what}; received {spec!r}.")
        if name in named:
            raise UsageError(f"{flag} name {name!r} is given twice.")
        named[name] = path
    return named


def format_criterion(report: dict[str, Any]) -> str:
    """One line per criterion entry: which pair, which route, top-1 / mAP verdicts, update gain."""
    from lce_tf.comparison import criterion_pair_label

    lines = []
    old = report["old"]
    for key, verdict in report["criterion"].items():
        status = "PASS" if verdict["pass"] else "FAIL"
        ug = report["update_gain"].get(key)
        ug_text = f"; update gain top-1 {ug['top1']:.2f}, mAP {ug['mAP']:.2f}" if ug else ""
        pair = criterion_pair_label(key, verdict, old)
        lines.append(f"criterion ({verdict.get('route', 'backward')}) {pair} > M({old}, {old}) on top-1 "
                     f"{'yes' if verdict['top1'] else 'no'}, mAP {'yes' if verdict['mAP'] else 'no'}: "
                     f"{status}{ug_text}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lce_tf.comparison import evaluate_folders

    model_dirs = _parse_named("--model", "MODEL_DIR", args.model)
    transform_dirs = _parse_named("--transform", "TRANSFORM_DIR", args.transform or [])
    old = args.old or next(iter(model_dirs))
    for flag, name in (("--old", old), ("--independent", args.independent)):
        if name is not None and name not in model_dirs:
            raise UsageError(f"{flag} {name!r} is not one of the --model names ({', '.join(model_dirs)}).")
    report = evaluate_folders(args.query, args.gallery, model_dirs, old=old, independent=args.independent,
                              transform_dirs=transform_dirs, batch_size=args.batch_size, progress=stage)
    print(report["table"])
    print(format_criterion(report))
    for note in report["skipped"]:
        print(f"skipped {note}")
    if args.json:
        fileio.write_json(args.json, {k: v for k, v in report.items() if k != "table"})
        stage(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------
# transform: fitted gallery transformations (lce_tf.transform_fit, lce_tf.transformation)


def _fit_transformation_on_folder(args: argparse.Namespace, settings) -> dict[str, Any]:
    """`lce_tf.transform_fit.fit_between_models` on the images of --data (restricted to --classes).

    Loads the old and new model directories (and the --side-model, whose ψ T12 then reads beside f̂1),
    labels the data with the folder's absolute path and the class subset, and writes --out.

    Returns:
      The transformation's metadata (lce_tf_transform.json).
    """
    from lce_tf.comparison import EvalData
    from lce_tf.serving import load_embedding_model
    from lce_tf.side_info import load_side_model
    from lce_tf.transform_fit import fit_between_models

    folder = _read_folder(args.data, args.classes)
    old_model, new_model = load_embedding_model(args.old_model), load_embedding_model(args.new_model)
    data_label = os.path.abspath(folder.root) + (f" (classes {args.classes})" if args.classes else "")
    side_model = load_side_model(args.side_model) if args.side_model else None
    return fit_between_models(old_model, new_model, EvalData.from_folder(folder), args.out, settings,
                              data_label=data_label, overwrite=args.overwrite, progress=stage, side_model=side_model)


def cmd_transform_fit(args: argparse.Namespace) -> int:
    from lce_tf.transform_fit import TransformFitSettings

    settings = TransformFitSettings(direction=args.direction, width=args.width, epochs=args.epochs,
                                    batch_size=args.batch_size, learning_rate=args.learning_rate,
                                    seed=args.seed, objective=args.objective, classify_weight=args.classify_weight,
                                    supcon_weight=args.supcon_weight).validate()
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"Output {args.out} already exists; choose a new --out or pass --overwrite.")
    metadata = _fit_transformation_on_folder(args, settings)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in metadata["fit_loss"].items())
    stage(f"wrote transformation {metadata['transform_id']} to {args.out}: {metadata['source']['embedding_space']} "
          f"({metadata['source']['dim']}-d) -> {metadata['target']['embedding_space']} ({metadata['target']['dim']}-d); "
          f"final fit loss (1 - cos) {losses}")
    return 0


def _add_transform_commands(sub) -> None:
    from lce_tf.transform_fit import DIRECTIONS, OBJECTIVES, TransformFitSettings

    defaults_ = TransformFitSettings()
    p = sub.add_parser("transform", help="fit a transformation between two models' embedding spaces")
    commands = p.add_subparsers(dest="transform_command", required=True, metavar="ACTION", parser_class=_Parser)
    q = commands.add_parser("fit", help="fit old->new (and optionally new->old) on paired embeddings of training "
                            "images and write a transformation directory")
    q.add_argument("--old-model", required=True, help="the old model directory (the gallery's space)")
    q.add_argument("--new-model", required=True, help="the new model directory (the queries' space)")
    q.add_argument("--data", required=True, help="TRAINING image folder DIR/<class>/<image> (never the test classes)")
    q.add_argument("--out", required=True, help="transformation directory to create")
    q.add_argument("--direction", default=defaults_.direction, choices=DIRECTIONS,
                   help="old-to-new (the forward route) or both (also new-to-old)")
    q.add_argument("--epochs", type=int, default=defaults_.epochs)
    q.add_argument("--batch-size", type=int, default=defaults_.batch_size)
    q.add_argument("--seed", type=int, default=defaults_.seed)
    q.add_argument("--width", type=int, default=defaults_.width, help="bottleneck width of each of the 4 paths")
    q.add_argument("--learning-rate", type=float, default=defaults_.learning_rate)
    q.add_argument("--objective", default=defaults_.objective, choices=OBJECTIVES,
                   help="what T12 minimises: the cosine distance, FastFill's classification by the new model's "
                   "class centers, supervised contrastive, or cosine plus one of them (T21 always cosine)")
    q.add_argument("--classify-weight", type=float, default=defaults_.classify_weight,
                   help="weight of the classify term")
    q.add_argument("--supcon-weight", type=float, default=defaults_.supcon_weight,
                   help="weight of the supcon term")
    q.add_argument("--side-model", metavar="DIR", help="a side-information model (lce_tf.side_info): T12 reads "
                   "[old vector; side vector]; the gallery must store the side vectors (not in the indexes yet)")
    q.add_argument("--classes", help="class subset of --data (as lce-tf train --classes)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    q.set_defaults(func=cmd_transform_fit)


# ---------------------------------------------------------------------------------------------------
# data


def _split_classes(total: int, test_fraction: float) -> tuple[int, int]:
    if total < 2:
        raise UsageError(f"--classes must be at least 2; received {total}.")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1); received {test_fraction}.")
    test = max(1, round(total * test_fraction))
    return total - test, test


def cmd_data(args: argparse.Namespace) -> int:
    from lce_tf import glyphs, synthetic

    train, test = _split_classes(args.classes, args.test_fraction)
    builder = glyphs.build_glyph_dataset if args.kind == "glyphs" else synthetic.build_synthetic_dataset
    stage(f"building the {args.kind} dataset in {args.out}: {train} training and {test} test classes")
    summary = builder(args.out, num_train_classes=train, num_test_classes=test, size=args.size, seed=args.seed,
                      overwrite=args.overwrite, progress=stage)
    stage("wrote " + json.dumps({k: summary[k] for k in summary if k.startswith("num_")}))
    return 0


# ---------------------------------------------------------------------------------------------------
# index: versioned indexes of any registered backend, e.g. ScaNN or Milvus (lce_tf.index)


def _check_index_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise UsageError(f"Output {out} already exists; choose a new --out or pass --overwrite.")


def _index_summary(index) -> str:
    versions = ", ".join(f"{v}: {n}" for v, n in index.version_counts().items())
    return (f"{len(index)} entries x {index.dim}, embedding space {index.embedding_space}, "
            f"{index.config.algorithm}{index.where_text()}; versions {versions}")


def cmd_index_build(args: argparse.Namespace) -> int:
    from lce_tf.index import images
    from lce_tf.index.registry import backend_class
    from lce_tf.serving import load_embedding_model

    overrides = images.parse_config_overrides(args.config or [])
    if not backend_class(args.backend).SERVER and (args.milvus_uri or args.milvus_alias):
        raise UsageError("--milvus-uri and --milvus-alias need --backend milvus.")
    _check_index_out(args.out, args.overwrite)
    folder = _read_folder(args.data)
    model = load_embedding_model(args.model)
    index = images.build_index(model, folder, overrides=overrides, batch_size=args.batch_size, progress=stage,
                               backend=args.backend, index_dir=args.out, milvus_uri=args.milvus_uri,
                               milvus_alias=args.milvus_alias)
    path = index.save(args.out)
    stage(f"wrote index {path}: {_index_summary(index)}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    from lce_tf.index import images
    from lce_tf.serving import load_embedding_model

    index = images.load_index(args.index)
    k = images.check_k(args.k, index)
    params = images.check_search_params(index, images.parse_config_overrides(args.param or []))
    images.collect_queries(args.data)  # bad query paths fail before the model loads
    model = load_embedding_model(args.model)
    results = images.search_images(index, model, args.data, k=k, force=args.force, batch_size=args.batch_size,
                                   index_dir=args.index, search_params=params)
    if results.forced:
        print(f"lce-tf: warning: forced search: query model {model.model_id} is not declared compatible with "
              f"index embedding space {index.embedding_space}; scores are not meaningful", file=sys.stderr)
    if args.json:
        fileio.write_json(args.json, results.to_dict())
        stage(f"wrote top-{results.k} results of {len(results.queries)} queries to {args.json}")
    else:
        print(results.format_table())
    return 0


def cmd_index_backfill(args: argparse.Namespace) -> int:
    from lce_tf.index import images
    from lce_tf.serving import load_embedding_model

    out = args.out or args.index
    if args.t12:
        if not args.out:
            raise UsageError("--t12 writes a new index in the new model's space: pass --out NEW_INDEX_DIR.")
        if os.path.abspath(args.out) != os.path.abspath(args.index):
            _check_index_out(args.out, args.overwrite)
    elif args.fraction is None or args.data is None:
        raise UsageError("index backfill needs --fraction F and --data GALLERY_DIR (or --t12 --out DIR).")
    model = load_embedding_model(args.model)
    if args.t12:
        index = images.load_index(args.index)
        stage(f"mapping {len(index)} gallery vectors through the T12 of {model.model_id}")
        index = images.upgrade_with_t12(index, model, out_dir=out)
    else:
        index = images.index_for_update(args.index, out)  # Milvus: a copy when --out is another directory
        step = images.backfill_from_images(index, model, args.data, args.fraction, seed=args.seed,
                                           batch_size=args.batch_size, progress=stage)
        stage(f"re-embedded {step['backfilled']} entries with {step['version']} ({step['signature']}); "
              f"{step['fraction']:.1%} of the gallery is now at {step['version']}")
    if args.rebuild:
        stage(f"retraining the {index.config.algorithm} searcher on the current {len(index)} vectors")
        index.rebuild()
    path = index.save(out)
    stage(f"wrote index {path}: {_index_summary(index)}")
    return 0


def cmd_index_upgrade(args: argparse.Namespace) -> int:
    from lce_tf.index import images
    from lce_tf.transformation import load_transformation

    if os.path.abspath(args.out) != os.path.abspath(args.index) or not args.overwrite:
        _check_index_out(args.out, args.overwrite)
    overrides = images.parse_config_overrides(args.config or [])
    transformations = [load_transformation(path) for path in args.transform]
    index = images.load_index(args.index)
    route = "composed: every stored vector" if args.compose else "each entry from its original vector"
    stage(f"moving {len(index)} gallery vectors of {args.index} ({route}) through "
          + "; ".join(t.describe() for t in transformations))
    upgraded = images.upgrade_with_transformation(index, transformations, overrides=overrides,
                                                  index_dir=args.index, out_dir=args.out, compose=args.compose)
    path = upgraded.save(args.out)
    stage(f"wrote index {path}: {_index_summary(upgraded)}; no image was read")
    return 0


def cmd_index_import(args: argparse.Namespace) -> int:
    """`lce-tf index import`: the flags adapted to `lce_tf.index_import.import_index`, which does the work."""
    from lce_tf.index import images
    from lce_tf.index_import import ImportRequest, import_index

    request = ImportRequest(vectors=args.vectors, ids=args.ids, space=args.space, out=args.out, backend=args.backend,
                            overrides=images.parse_config_overrides(args.config or []), model=args.model,
                            vector_column=args.vector_column, id_column=args.id_column, milvus_uri=args.milvus_uri,
                            milvus_alias=args.milvus_alias, overwrite=args.overwrite, batch_rows=args.batch_rows)
    index = import_index(request, progress=stage)
    stage(f"wrote index {os.path.abspath(args.out)}: {_index_summary(index)}")
    return 0


def _add_index_commands(sub) -> None:
    """The `lce-tf index build|search|backfill|upgrade` subcommands."""
    from lce_tf.index import registry  # light: the backend modules are imported only when a command needs one

    index = sub.add_parser("index", help="build, search, backfill and upgrade versioned indexes (ScaNN or Milvus)")
    commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION", parser_class=_Parser)

    p = commands.add_parser("build", help="embed a gallery image folder with a model and build an index")
    p.add_argument("--model", required=True, help="model directory whose `embed` signature builds the index")
    p.add_argument("--data", required=True, help="gallery image folder DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--config", action="append", metavar="JSON|KEY=VALUE",
                   help="overrides of the size-based defaults; ScaNN: e.g. algorithm=tree_ah,num_leaves=50 or "
                   "'{\"reorder_num_neighbors\": 200}'; Milvus: index_type=IVF_FLAT,nlist=1024,nprobe=32 (or "
                   "HNSW with M, efConstruction, ef on a server); repeatable")
    p.add_argument("--backend", default=registry.DEFAULT_BACKEND, choices=registry.backend_names(),
                   help="scann: an in-memory ScaNN index in the directory (default); milvus: a Milvus collection "
                   "(Milvus Lite database in the directory, or a server with --milvus-uri)")
    p.add_argument("--milvus-uri", help="a running Milvus server, e.g. http://milvus.example:19530 (lce-tf never "
                   "starts one); its token, if any, is read from the environment variable LCE_TF_MILVUS_TOKEN. "
                   "Default: Milvus Lite in INDEX_DIR/milvus.db")
    p.add_argument("--milvus-alias", help="server only: the collection alias that follows the served collection "
                   "(default lce_<lineage>, recorded in index.json)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace an existing index atomically")
    p.set_defaults(func=cmd_index_build)

    from lce_tf.index_import import BATCH_ROWS  # light: numpy only

    p = commands.add_parser("import", help="build an index from vectors you already have, in the embedding space "
                            "you name (the --embedding-space of lce-tf model import)")
    p.add_argument("--vectors", required=True, metavar="FILE", help="float vectors [N, D]: .npy, .npz "
                   "(FILE:key, or its one array, or 'embeddings'/'vectors') or .parquet (a list column)")
    p.add_argument("--ids", required=True, metavar="FILE", help="one id per vector row: text lines, .npy, .json or "
                   ".parquet (a column)")
    p.add_argument("--space", required=True, metavar="NAME", help="the embedding space of the vectors (with "
                   "--model: that model's space)")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--model", metavar="DIR", help="the model that made the vectors: its dimension and embedding "
                   "space must be theirs")
    p.add_argument("--vector-column", metavar="NAME", help="Parquet: the vector column (default: the one list column)")
    p.add_argument("--id-column", metavar="NAME", help="Parquet: the id column (default: 'id', 'ids' or the one "
                   "column)")
    p.add_argument("--config", action="append", metavar="JSON|KEY=VALUE",
                   help="overrides of the size-based defaults, as index build; repeatable")
    p.add_argument("--backend", default=registry.DEFAULT_BACKEND, choices=registry.backend_names(),
                   help="scann (default) or milvus, as index build")
    p.add_argument("--milvus-uri", help="a running Milvus server (default: Milvus Lite in INDEX_DIR/milvus.db)")
    p.add_argument("--milvus-alias", help="server only: the collection alias (default lce_<lineage>)")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help="vector rows read and checked at "
                   "a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index atomically")
    p.set_defaults(func=cmd_index_import)

    p = commands.add_parser("search", help="top-k gallery entries for query images")
    p.add_argument("--index", required=True, help="index directory (lce-tf index build)")
    p.add_argument("--model", required=True, help="query model directory (the index's model or a compatible one)")
    p.add_argument("--data", required=True, nargs="+", metavar="QUERY_DIR_OR_FILE",
                   help="query image folder(s) and/or image files")
    p.add_argument("--k", type=int, help="results per query (default: the index's num_neighbors, 10)")
    p.add_argument("--json", help="write the results as JSON instead of printing the table")
    p.add_argument("--force", action="store_true",
                   help="search even if the query model is not declared compatible with the index")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="search parameters of this search: ScaNN leaves_to_search, reorder_num_neighbors; Milvus "
                   "the index type's (nprobe for IVF_*, ef for HNSW, ...); repeatable")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_index_search)

    p = commands.add_parser("backfill", help="re-embed part of the gallery with a new model, or map it with T12")
    p.add_argument("--index", required=True)
    p.add_argument("--model", required=True, help="the new model (declared compatible with the index)")
    p.add_argument("--data", help="the gallery image folder the index was built from")
    p.add_argument("--fraction", type=float, help="cumulative share of the gallery embedded by the new model "
                   "after this step, in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="backfill order seed (keep it across steps)")
    p.add_argument("--t12", action="store_true", help="map every gallery vector through the new model's T12 "
                   "into its own space (no images); needs --out")
    p.add_argument("--rebuild", action="store_true", help="retrain the searcher (partitions, AH codebooks) on "
                   "the current vectors after the step; advisable after large steps (upserts keep the old training)")
    p.add_argument("--out", help="index directory to write (default: replace --index atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_index_backfill)

    p = commands.add_parser("upgrade", help="move every stored vector into a new model's space through a fitted "
                            "transformation (no image is read) and write a new index")
    p.add_argument("--index", required=True, help="the index to upgrade (in a transformation's source space, or "
                   "upgraded earlier from one)")
    p.add_argument("--transform", required=True, action="append", metavar="TRANSFORM_DIR",
                   help="transformation directory (lce-tf transform fit); repeat it with one transformation per "
                   "source space among the entries (the index's own space, and the original space of entries an "
                   "earlier upgrade transformed), all into the same new space")
    p.add_argument("--compose", action="store_true", help="move every stored vector through the one transformation "
                   "from the index's space, also for entries an earlier upgrade transformed (errors compound along "
                   "the chain); default: transformed entries move from their kept original vectors")
    p.add_argument("--out", required=True, help="the new index directory (in the target space)")
    p.add_argument("--config", action="append", metavar="JSON|KEY=VALUE",
                   help="IndexConfig overrides of the new index (default: by size, as index build)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    p.set_defaults(func=cmd_index_upgrade)


# ---------------------------------------------------------------------------------------------------
# model: models trained outside lce-tf, imported as model directories (lce_tf.model_import)


def cmd_model_import(args: argparse.Namespace) -> int:
    from lce_tf.model_import import ImportCheck, import_model

    given = [flag for flag, value in (("--check", args.check), ("--check-ids", args.check_ids),
                                      ("--check-images", args.check_images)) if value]
    if given and len(given) != 3:
        raise UsageError(f"{', '.join(given)} needs --check VECTORS, --check-ids IDS and --check-images DIR together.")
    check = ImportCheck(args.check, args.check_ids, args.check_images, args.check_sample) if given else None
    metadata = import_model(args.src, args.out, embedding_space=args.embedding_space, preprocess=args.preprocess,
                            image_size=args.image_size, signature=args.signature, output=args.output, check=check,
                            overwrite=args.overwrite, progress=stage)
    checked = metadata["imported"]["check"]
    stage(f"imported {args.src} as {args.out}: embedding space {metadata['embedding_space']}, "
          f"{metadata['embedding_dim']}-d, images {tuple(metadata['input_shape'])}"
          + (f"; --check cosine min {checked['min_cosine']:.4f}, mean {checked['mean_cosine']:.4f} over "
             f"{checked['count']} images" if checked else "; not checked against stored vectors (--check)"))
    return 0


def _add_model_commands(sub) -> None:
    p = sub.add_parser("model", help="bring a model trained outside lce-tf in as a model directory")
    commands = p.add_subparsers(dest="model_command", required=True, metavar="ACTION", parser_class=_Parser)
    q = commands.add_parser("import", help="write a model directory that embeds with a .keras/.h5 model or a "
                            "SavedModel: images in [0, 1] -> the declared preprocessing -> the model -> unit vectors")
    q.add_argument("src", metavar="SRC", help="a .keras, .h5 or .hdf5 Keras model file, or a SavedModel directory")
    q.add_argument("--out", required=True, help="model directory to create")
    q.add_argument("--embedding-space", required=True, metavar="NAME", help="the name of the model's embedding "
                   "space, also its model id (the same name gives the same id: indexes of NAME accept it)")
    q.add_argument("--preprocess", required=True, metavar="SPEC", help="what the model was trained on, from "
                   "pixels x in [0, 1]: unit (x, lce-tf's own), raw (255*x, as decoded), scale=A,offset=B "
                   "(A*255*x + B), or a keras.applications family (its preprocess_input(255*x)), e.g. mobilenet_v3")
    q.add_argument("--image-size", type=int, nargs="+", metavar="N", help="H W [C] of the images; needed when "
                   "the model takes any height or width, else checked against its input")
    q.add_argument("--signature", help="SavedModel: the signature to call (default serving_default)")
    q.add_argument("--output", help="the output holding the embedding, for a model with several")
    q.add_argument("--check", metavar="VECTORS", help="vectors the model produced (.npy or .npz, [N, D]): a sample "
                   "is re-embedded and the import refused when a cosine is below "
                   f"{defaults.IMPORT_CHECK_MIN_COSINE}")
    q.add_argument("--check-ids", metavar="IDS", help="the ids of those vectors, one per row (text lines, .npy or "
                   ".json): image paths relative to --check-images")
    q.add_argument("--check-images", metavar="DIR", help="the folder of the checked images")
    q.add_argument("--check-sample", type=int, default=defaults.IMPORT_CHECK_SAMPLE,
                   help="vectors re-embedded (evenly spread)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    q.set_defaults(func=cmd_model_import)


# ---------------------------------------------------------------------------------------------------
# pipeline: the TFX pipeline (pipeline/, components/); tfx is imported by these commands only. They are the
# one place lce_tf imports the pipeline package (docs/design.md, "Architecture"): tests/test_structure.py
# allows exactly _pipeline_config, cmd_pipeline_run and cmd_pipeline_compile.


def _pipeline_config(args: argparse.Namespace):
    try:
        from pipeline.config import load_config
    except ImportError:
        raise UsageError("the lce-tf pipeline package is not importable: run from the lce-tf checkout or "
                         "install the project (pip install -e '.[pipeline]')") from None
    return load_config(args.config, args.set)


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    config = _pipeline_config(args).resolved().validate()  # a bad field fails here, before any component
    from pipeline.local_runner import format_run_summary, run_local, run_summary

    stage(f"running pipeline {config.pipeline_name} ({config.version}, mode {config.mode}) with the "
          f"LocalDagRunner; metadata {config.metadata_path}")
    seconds = run_local(config)
    print(format_run_summary(run_summary(config)))
    stage(f"pipeline finished in {seconds:.0f} s")
    return 0


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    config = _pipeline_config(args)
    from pipeline.kubeflow_runner import compile_kubeflow

    written = compile_kubeflow(config, args.out, formats=args.format or ("v2", "v1"), check_paths=args.check_paths)
    for fmt, path in written.items():
        stage(f"wrote the KFP {fmt} pipeline to {path}")
    return 0


def _add_pipeline_commands(sub) -> None:
    p = sub.add_parser("pipeline", help="run the TFX pipeline locally or compile it for Kubeflow Pipelines")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION", parser_class=_Parser)
    for name, helptext in (("run", "run once with the LocalDagRunner (SQLite metadata, Beam multi-processing)"),
                           ("compile", "compile the KFP v2 JSON and the KFP v1 YAML")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("--config", help="JSON or YAML file of pipeline.config.PipelineConfig fields")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeat), e.g. --set mode=lce --set version=v2")
        if name == "run":
            q.set_defaults(func=cmd_pipeline_run)
        else:
            q.add_argument("--out", default="build/kubeflow", help="output directory")
            q.add_argument("--format", action="append", choices=("v1", "v2"), help="v2 and/or v1 (default both)")
            q.add_argument("--check-paths", action="store_true", help="check that the data folders exist here")
            q.set_defaults(func=cmd_pipeline_compile)


# ---------------------------------------------------------------------------------------------------
# parser and entry point


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `lce-tf: error: ... (see lce-tf train --help)`, exit code 2."""

    def error(self, message: str):
        print(f"lce-tf: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lce-tf", description="Learning Compatible Embeddings (ICCV 2021) on TensorFlow: train new "
        "embedding models whose queries search old-model galleries.")
    parser.add_argument("--version", action="version", version=f"lce-tf {lce_tf.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    from lce_tf import train_config

    p = sub.add_parser("train", help="train a (compatible) embedding model and export a model directory")
    p.add_argument("--data", required=True, help="training image folder DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--classes", help="class subset: 'A:B' indices or percentages of the sorted names "
                   "(e.g. 0:50%%), or a file of names")
    p.add_argument("--stream", action="store_true", help="read and decode the image files every epoch instead "
                   "of decoding them once into memory (the default when they fit in lce_tf.data.IN_MEMORY_MAX_BYTES, "
                   "1 GiB decoded; larger folders stream anyway)")
    p.add_argument("--old-model", help="old model directory (centers are computed from it when "
                   "--old-centers is not given; required by l2 and lce-instance)")
    p.add_argument("--old-centers", help="old class centers .npz (lce-tf centers)")
    p.add_argument("--new-model", help="frozen new model directory (cross-model mode)")
    p.add_argument("--boundary", default=defaults.BOUNDARY_RULE, help="boundary rule when centers are computed "
                   "here: 'min' (reference) or 'percentile:P'")
    train_config.add_cli_arguments(p)  # the settings: one flag per lce_tf.train_config.TrainConfig field
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    p.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras fit verbosity")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("centers", help="compute a model's class centers and boundaries over an image folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--classes")
    p.add_argument("--boundary", default=defaults.BOUNDARY_RULE)
    p.add_argument("--beam-runner", choices=("direct", "dask"),
                   help="compute with the ClassCenterExtractor's Beam job instead of in this process: on the "
                   "DirectRunner or on a dask.distributed scheduler (--dask-address)")
    p.add_argument("--dask-address", help="the dask scheduler, tcp://HOST:PORT (with --beam-runner dask)")
    p.add_argument("--beam-workers", type=int, default=2, help="DirectRunner worker processes (--beam-runner direct)")
    p.add_argument("--beam-temp", help="work directory the Beam workers share with this process (records, "
                   "spilled shards, the result; removed afterwards); default: beside --out")
    p.set_defaults(func=cmd_centers)

    p = sub.add_parser("evaluate", help="compatibility matrix, criterion and update gain of models")
    p.add_argument("--query", required=True)
    p.add_argument("--gallery", required=True)
    p.add_argument("--model", action="append", required=True, metavar="NAME=MODEL_DIR",
                   help="a model to compare; repeat; the first is the old model unless --old")
    p.add_argument("--old", help="name of the old model (default: the first --model)")
    p.add_argument("--independent", help="name of the independently trained new model (new*)")
    p.add_argument("--transform", action="append", metavar="NAME=TRANSFORM_DIR",
                   help="a fitted transformation (lce-tf transform fit): adds the pairs through it, e.g. new "
                   "queries against the old gallery moved into the new space; repeatable")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data", help="generate a demo/benchmark dataset (train/query/gallery image folders)")
    p.add_argument("kind", choices=("glyphs", "synthetic"),
                   help="glyphs: CJK characters from installed fonts; synthetic: random stroke patterns")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=2000, help="total classes (train + test)")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data)
    _add_transform_commands(sub)
    _add_index_commands(sub)
    _add_model_commands(sub)
    _add_pipeline_commands(sub)
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _quiet_tensorflow() -> None:
    """Keeps TensorFlow's C++ start-up chatter and third-party deprecation notices off the console."""
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # errors still surface as exceptions
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow_addons\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"milvus_lite")  # its pkg_resources import


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_tensorflow()
    from lce_tf.index import base  # light: no backend's client library is imported before a command needs it

    base.QUIET_CLIENT_LOGS = True
    with base.closing_opened():  # e.g. Milvus Lite: the command's database servers stop when it ends
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    known_errors: tuple[type, ...] = (ValueError, OSError)
    try:
        from lce_tf.training import TrainingDivergedError

        known_errors += (TrainingDivergedError,)
        return args.func(args)
    except known_errors as e:
        print(f"lce-tf: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # TensorFlow's OpError family (e.g. an undecodable image) is bad input too.
        if type(e).__module__.startswith("tensorflow"):
            print(f"lce-tf: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
