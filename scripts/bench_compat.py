#!/usr/bin/env python
"""The lce-tf compatibility benchmark (`make bench`): upgrade scenarios, baselines side by side.

    python scripts/bench_compat.py [--quick] [--data DIR] [--out benchmarks/results] [--seed N]
                                   [--scenarios S1,S2,S3,S4,S5,cross] [--work build/bench]
    python scripts/bench_compat.py --validate [--quick] [--data DIR] [--out DIR]
    python scripts/bench_compat.py --validate-instance [--setting S2] [--data DIR] [--out DIR]
    python scripts/bench_compat.py --validate-side-info [--side-settings S2,S1] [--side-dims 16,32] [--side-epochs N]

Every model is trained in this one process (TensorFlow imported once) with the lce_tf library: the
same data, the same seed, the same optimiser settings for every method; only the compatibility term
differs. Measures follow docs/design.md, "How compatibility is measured": M(Q, G) = top-1 and mAP of
queries embedded by Q against a gallery embedded by G on the held-out test classes (open set: no
test class is ever trained on), each with a 95% bootstrap interval over the queries.

Scenarios (methods: independent, l2, bct, lce, lce-instance, lce-transform):
  S1    more classes: old on the first 50% of the training classes, new on 100%;
  S2    new architecture: old `small_cnn`, new `cnn`;
  S3    new loss: old NormSoftmax, new ArcFace, plus one triplet-loss row (LCE with a triplet head);
  S4    new dimension: old 64-d, new 128-d: only the transformation method applies (l2, bct, direct
        lce and lce-instance compare embeddings directly and need equal dimensions);
  S5    a chain v1 -> v2 -> v3, each trained with LCE against its predecessor (50%, 75%, 100% of the
        classes): full compatibility matrix and average compatibility, backward and through fitted
        transformations (composed T23·T12 and direct T13 for v1's gallery);
  cross two independently trained models (S1's old and new*) made compatible by training only
        T12/T21 (mode cross-model); backward (T21 queries) and forward (T12 gallery) retrieval.

As in the BCT and LCE papers, every old model of S1-S4 is trained on the first 50% of the training
classes and every new model on all of them: the old model is then clearly weaker, so the update gain
is measured well above noise, and scenario S2-S4 differ from S1 in exactly the one factor named.
The new models of S1-S4 share one setting (cnn, 128-d, ArcFace s=16 m=0.1, all classes), so the
independent new model new* is trained once and serves every scenario (the results say so); with the
same seed and op determinism a retrained copy would be identical.

Routes: backward M(new, old); forward M(new, T12(old)) through a T12 fitted on the training pairs
with the library's defaults (lce_tf.transform_fit), measured for the rows of bench.settings.FORWARD_METHODS
(S3: lce and lce-instance; S4: independent, lce-transform also through its own T12); the target rows of
S1/S2 also through a cosine-only T12 when the default fit objective is another one (seed 0).
The rows that decide the targets (S1/S2: old, independent, lce, lce-instance) run with every seed of
--seeds (3 on the full profile); the targets are judged on the mean (bench.report.check_targets).

Outputs (in --out): compat.json (everything, machine, date, seed, wall time, the cost of each part),
compat.md (one table per scenario, a cost table) and one heatmap PNG per scenario (top-1
compatibility matrix). `--validate` instead
chooses the LCE boundary rule and weights on a validation split of the TRAINING classes (held-out
training classes split into query/gallery by font; the test classes are never looked at) and writes
validation.json / validation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
for _path in (REPO, SCRIPTS):  # run from a checkout without `pip install -e .`; the bench package is in scripts/
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The benchmark lives in the package scripts/bench (one job per module); these names are re-exported so that
# `import bench_compat` (tests, docs) keeps working.
from bench.settings import (DIRECT_MODES, FORWARD_METHODS, LCE, LCE_INSTANCE, METHODS, METRICS,  # noqa: E402,F401
                            PROFILES, SCENARIOS, TARGET_METHODS, Profile, Spec)
from bench.data import Split, _font_of, ensure_dataset, load_split, validation_split  # noqa: E402,F401
from bench.zoo import ModelZoo, fit_forward, fit_objective, fit_settings, forward_result  # noqa: E402,F401
from bench.evaluation import Evaluator  # noqa: E402,F401
from bench.scenarios import Benchmark  # noqa: E402,F401
from bench.report import (ROUTES, SEED_METHODS, SEED_SCENARIOS, check_targets, cost_parts,  # noqa: E402,F401
                          cost_table, machine_info, plot_training_curves, results_table, scenario_table, seed_summary,
                          seeds_table, write_markdown)
from bench.runs import (INSTANCE_CANDIDATES, TRANSFORM_CANDIDATES, VALIDATION_CANDIDATES,  # noqa: E402,F401
                        VALIDATION_SETTINGS, annotate, run_benchmark, run_epoch_study, run_seeds,
                        run_transform_validation, run_validation, use_one_inter_op_thread)
from bench.side_info_runs import SIDE_DIMS, run_side_info_validation  # noqa: E402,F401


def _instance_candidates(text: Optional[str]):
    """INSTANCE_CANDIDATES, or lce plus the lce-instance (λ_i, τ) pairs of "L:T,L:T"."""
    if not text:
        return INSTANCE_CANDIDATES
    pairs = []
    for item in text.split(","):
        try:
            lam, tau = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"--instance-candidates: expected LAMBDA:TAU pairs; received {item!r}") from None
        pairs.append((LCE_INSTANCE, {"lambda_instance": lam, "instance_temperature": tau}))
    return ((LCE, {}), *pairs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version (~5 min): fewer classes and epochs")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="the sizes of the run (default: full; quick with "
                        "--quick)")
    parser.add_argument("--data", help="dataset with train/, query/, gallery/ (default: glyphs generated in --work)")
    parser.add_argument("--out", help="results directory (default: benchmarks/results; build/bench-quick with --quick, "
                        "so a quick run never replaces the committed results)")
    parser.add_argument("--work", default="build/bench", help="where generated data is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated seeds of the rows that decide the targets (S1/S2 old, "
                        "independent, lce, lce-instance; default: the profile's)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    parser.add_argument("--epochs", type=int, help="override the profile's epochs (new and old models)")
    parser.add_argument("--validate", action="store_true",
                        help="choose the LCE boundary rule and weights on held-out TRAINING classes instead")
    parser.add_argument("--validate-instance", action="store_true",
                        help="choose lce-instance's InfoNCE weight and temperature on held-out TRAINING classes "
                        "instead (writes NAME.json/md, default instance_validation)")
    parser.add_argument("--instance-candidates", metavar="LAMBDA:TAU,...",
                        help="--validate-instance: the (λ_i, τ) candidates instead of INSTANCE_CANDIDATES (lce is "
                        "always the first row)")
    parser.add_argument("--validate-transform", action="store_true",
                        help="choose the forward route's T12 fit objective on held-out TRAINING classes instead")
    parser.add_argument("--validate-side-info", action="store_true",
                        help="measure the forward route with side information (lce_tf.side_info) on held-out "
                        "TRAINING classes instead (writes NAME.json/md, default side_info_validation)")
    parser.add_argument("--side-settings", default="S2,S1", help="--validate-side-info: the upgrades, in order")
    parser.add_argument("--side-dims", default=",".join(map(str, SIDE_DIMS)),
                        help="--validate-side-info: comma-separated side vector sizes D_s")
    parser.add_argument("--side-epochs", type=int, default=10, help="--validate-side-info: epochs of the side model")
    parser.add_argument("--side-control", action="store_true", help="--validate-side-info: also fit T12 with an "
                        "untrained side model of each size (what the label-free training adds over random features)")
    parser.add_argument("--setting", default="S1", choices=sorted(VALIDATION_SETTINGS),
                        help="--validate: the upgrade to validate (S2 = the pipeline demo's small -> larger network)")
    parser.add_argument("--name", help="--validate, --validate-instance: results file name (NAME.json, NAME.md; "
                        "default validation, instance_validation)")
    parser.add_argument("--val-classes", type=int, help="--validate: training classes held out (default: profile)")
    parser.add_argument("--old-epochs", type=int, help="override the profile's epochs of the old models")
    parser.add_argument("--epoch-study", type=int, metavar="MAX_EPOCHS",
                        help="measure per-epoch validation accuracy on held-out TRAINING classes up to MAX_EPOCHS")
    parser.add_argument("--readme-table", action="store_true",
                        help="print the README's results table from --out/compat.json (no training)")
    parser.add_argument("--annotate", metavar="NOTES.md",
                        help="add a written analysis to the results in --out (no training)")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras fit verbosity")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    args.out = args.out or ("build/bench-quick" if args.quick else "benchmarks/results")
    if args.epochs:
        profile = dataclasses.replace(profile, epochs=args.epochs, old_epochs=args.epochs)
    if args.old_epochs:
        profile = dataclasses.replace(profile, old_epochs=args.old_epochs)
    if args.val_classes:
        profile = dataclasses.replace(profile, val_classes=args.val_classes)
    command = "python scripts/bench_compat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    use_one_inter_op_thread()
    try:
        if args.epoch_study:
            run_epoch_study(args.data, args.out, profile, max_epochs=args.epoch_study, seed=args.seed, work=args.work,
                            verbose=args.verbose, command=command.strip())
        elif args.readme_table:
            with open(os.path.join(args.out, "compat.json"), encoding="utf-8") as f:
                print("\n".join(results_table(json.load(f))))
        elif args.annotate:
            annotate(args.out, args.annotate)
        elif args.validate_transform:
            run_transform_validation(args.data, args.out, profile, seed=args.seed, work=args.work,
                                     verbose=args.verbose, command=command.strip())
        elif args.validate_side_info:
            run_side_info_validation(args.data, args.out, profile, seed=args.seed, work=args.work,
                                     settings_keys=[k.strip() for k in args.side_settings.split(",") if k.strip()],
                                     side_dims=[int(v) for v in args.side_dims.split(",") if v.strip()],
                                     side_epochs=args.side_epochs, untrained_control=args.side_control,
                                     name=args.name or "side_info_validation",
                                     verbose=args.verbose, command=command.strip())
        elif args.validate:
            run_validation(args.data, args.out, profile, seed=args.seed, work=args.work, setting=args.setting,
                           name=args.name or "validation", verbose=args.verbose, command=command.strip())
        elif args.validate_instance:
            run_validation(args.data, args.out, profile, seed=args.seed, work=args.work, setting=args.setting,
                           name=args.name or "instance_validation", verbose=args.verbose, command=command.strip(),
                           candidates=_instance_candidates(args.instance_candidates), choose=LCE_INSTANCE)
        else:
            seeds = ([int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds is not None
                     else list(profile.seeds))
            run_benchmark(args.data, args.out, profile, seed=args.seed,
                          scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()],
                          work=args.work, verbose=args.verbose, command=command.strip(), seeds=seeds)
    except ValueError as e:
        print(f"bench_compat: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
