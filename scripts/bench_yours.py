#!/usr/bin/env python
"""Scenario S6 "your model" (`make bench-yours`): a plain-Keras model, imported, upgraded by lce-tf.

    python scripts/bench_yours.py [--quick] [--data DIR] [--out benchmarks/results] [--work build/bench] [--seed N]
                                  [--train-classes N] [--image-size 32] [--v1-arch MobileNetV3Small] [--v1-epochs N]
                                  [--v2-arch keras:MobileNetV3Large] [--epochs N]
                                  [--methods independent,lce,lce-instance]
    python scripts/bench_yours.py --annotate NOTES.md [--out DIR]

v1 is what a user brings: a keras.applications backbone (weights=None) with a Dense embedding head, trained with
plain Keras (`model.fit`, a softmax classifier on v1's training classes) on the glyphs as RGB upscaled to
--image-size, saved as .keras and imported with `lce-tf model import --preprocess raw --embedding-space yours-v1`
(lce_tf.model_import.import_model). v2, another keras.applications family, is trained by lce-tf against the
imported v1: independent (the sanity row), lce and lce-instance. Both routes are measured on the held-out test
classes as in `make bench` (scripts/bench_compat.py): backward M(v2, v1) and forward M(v2, T12(v1)) against the
bar M(v1, v1). The code is scripts/bench/yours.py; the measurements are the bench package's.

Outputs (in --out): yours.json (everything: machine, date, command, per-stage seconds, the cost table), yours.md
and S6_heatmap.png. --quick runs at smoke-test size into build/bench-yours-quick (a minute or so).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
for _path in (REPO, SCRIPTS):  # run from a checkout without `pip install -e .`; the bench package is in scripts/
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench.runs import use_one_inter_op_thread  # noqa: E402
from bench.yours import METHODS, YOURS_PROFILES, annotate, run_profile, run_yours  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test size: 60 + 30 classes, one epoch each")
    parser.add_argument("--profile", choices=sorted(YOURS_PROFILES), help="default: full (quick with --quick)")
    parser.add_argument("--data", help="dataset with train/, query/, gallery/ (default: the glyphs of the data "
                        "profile, generated in --work)")
    parser.add_argument("--out", help="results directory (default: benchmarks/results; build/bench-yours-quick with "
                        "--quick)")
    parser.add_argument("--work", default="build/bench", help="where generated data and the models are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-classes", type=int, help="keep the first N training classes (default: the profile's)")
    parser.add_argument("--image-size", type=int, help="upscale the glyphs to SIZE x SIZE RGB (default 32)")
    parser.add_argument("--v1-arch", help="v1's keras.applications family (default MobileNetV3Small, minimalistic)")
    parser.add_argument("--v1-epochs", type=int, help="epochs of v1's plain-Keras fit")
    parser.add_argument("--v2-arch", help="v2's lce-tf architecture (default keras:MobileNetV3Large)")
    parser.add_argument("--epochs", type=int, help="epochs of every v2 model")
    parser.add_argument("--methods", default=",".join(METHODS), help="v2's rows, some of " + ",".join(METHODS)
                        + " (independent, the sanity row, is always trained)")
    parser.add_argument("--annotate", metavar="NOTES.md", help="add a written analysis to the results in --out "
                        "(yours.json gets it, yours.md is re-rendered; no training)")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras fit verbosity")
    args = parser.parse_args(argv)
    name = args.profile or ("quick" if args.quick else "full")
    out = args.out or ("build/bench-yours-quick" if name == "quick" else "benchmarks/results")
    command = ("python scripts/bench_yours.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    try:
        if args.annotate:
            annotate(out, args.annotate)
            return 0
        use_one_inter_op_thread()
        yours = run_profile(name, {"train_classes": args.train_classes, "image_size": args.image_size,
                                   "v1_arch": args.v1_arch, "v1_epochs": args.v1_epochs, "v2_arch": args.v2_arch,
                                   "epochs": args.epochs})
        run_yours(args.data, out, yours, seed=args.seed, work=args.work, verbose=args.verbose, command=command,
                  methods=[m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as e:
        print(f"bench_yours: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
