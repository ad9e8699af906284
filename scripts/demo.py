#!/usr/bin/env python
"""The `make demo-cli` walk-through of the lce-tf command on a small generated dataset (no TFX).

1. generate glyph data (CJK characters from the installed fonts; random stroke patterns when fewer
   than three CJK fonts are installed), with disjoint training and test classes;
2. train v1: a CNN on the first half of the training classes, briefly (the model in production);
3. extract v1's class centers and boundaries over ALL training classes;
4. train v2 with LCE against those centers (the same CNN on all classes, trained longer: the upgrade);
5. train v2-independent the same way without any compatibility term (the reference new* model);
6. evaluate every pair on the held-out query/gallery classes: the table, the BCT criterion and the
   update gain.

Every step is a real `lce-tf` command, printed before it runs, so users can copy them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from lce_tf import modes


def run(argv: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    subprocess.run(argv, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/demo-cli")
    parser.add_argument("--classes", type=int, default=600, help="total classes of the generated dataset")
    parser.add_argument("--size", type=int, default=20, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the v2 models")
    parser.add_argument("--old-epochs", type=int, default=2, help="epochs of v1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-kind", choices=("auto", "glyphs", "synthetic"), default="auto")
    args = parser.parse_args()

    start = time.time()
    console_script = os.path.join(os.path.dirname(sys.executable), "lce-tf")
    lce = [console_script] if os.path.exists(console_script) else [sys.executable, "-m", "lce_tf.cli"]
    work = os.path.abspath(args.workdir)
    data = os.path.join(work, "data")
    models = os.path.join(work, "models")
    kind = args.data_kind
    if kind == "auto":
        from lce_tf.glyphs import discover_cjk_fonts

        kind = "glyphs" if len(discover_cjk_fonts()) >= 3 else "synthetic"
        if kind == "synthetic":
            print("fewer than 3 CJK fonts installed (scripts/install_fonts.sh installs them): "
                  "using the synthetic stroke dataset", flush=True)
    run(lce + ["data", kind, "--out", data, "--classes", str(args.classes), "--size", str(args.size),
               "--seed", str(args.seed), "--overwrite"])
    common = ["--data", os.path.join(data, "train"), "--seed", str(args.seed), "--overwrite", "--dim", "128",
              "--batch-size", str(args.batch_size)]
    run(lce + ["train", *common, "--epochs", str(args.old_epochs), "--classes", "0:50%", "--arch", "cnn",
               "--out", f"{models}/v1"])
    run(lce + ["centers", "--model", f"{models}/v1", "--data", os.path.join(data, "train"),
               "--out", f"{work}/v1_centers.npz"])
    common += ["--epochs", str(args.epochs)]
    run(lce + ["train", *common, "--arch", "cnn", "--compat", modes.LCE.name, "--old-centers", f"{work}/v1_centers.npz",
               "--out", f"{models}/v2-lce"])
    run(lce + ["train", *common, "--arch", "cnn", "--out", f"{models}/v2-independent"])
    report_path = os.path.join(work, "compatibility.json")
    run(lce + ["evaluate", "--query", os.path.join(data, "query"), "--gallery", os.path.join(data, "gallery"),
               "--model", f"v1={models}/v1", "--model", f"v2-lce={models}/v2-lce",
               "--model", f"v2-independent={models}/v2-independent", "--independent", "v2-independent",
               "--json", report_path])
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    lce_ok = report["criterion"]["v2-lce"]["pass"]
    independent_ok = report["criterion"]["v2-independent"]["pass"]
    print(f"\ndemo finished in {time.time() - start:.0f} s: v2-lce "
          f"{'satisfies' if lce_ok else 'does NOT satisfy'} the compatibility criterion; v2-independent "
          f"{'satisfies' if independent_ok else 'does not satisfy'} it. Results: {report_path}")
    return 0 if lce_ok and not independent_ok else 1


if __name__ == "__main__":
    sys.exit(main())
