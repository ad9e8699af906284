"""The benchmark's settings: methods, scenarios, metrics, the run profiles (`Profile`) and one model to
train (`Spec`).

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from lce_tf import defaults, modes

# The methods are compatibility modes (lce_tf.modes); their names key the rows of the results.
INDEPENDENT, LCE, LCE_INSTANCE, LCE_TRANSFORM, BCT, L2, CROSS_MODEL = (
    modes.INDEPENDENT.name, modes.LCE.name, modes.LCE_INSTANCE.name, modes.LCE_TRANSFORM.name, modes.BCT.name,
    modes.L2.name, modes.CROSS_MODEL.name)
METHODS = (INDEPENDENT, L2, BCT, LCE, LCE_INSTANCE, LCE_TRANSFORM)
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "cross")
METRICS = ("top1", "mAP")
DIRECT_MODES = tuple(m for m in METHODS if modes.get(m).direct)  # compare new and old embeddings directly
# The rows of S1 and S2 (S4 has lce-transform, the one method that maps between dimensions; S3 the new-loss rows).
UPGRADE_METHODS = (INDEPENDENT, L2, BCT, LCE, LCE_INSTANCE)
NEW_LOSS_METHODS = (INDEPENDENT, LCE, LCE_INSTANCE)
# The rows whose seeds are reported (S1 and S2, both routes), beside the old model; only EXTRA_SEED_METHODS train on the
# extra seeds (the ones that decide the targets): lce, the paper's method, is reported from the main seed.
TARGET_METHODS = (INDEPENDENT, LCE, LCE_INSTANCE)
EXTRA_SEED_METHODS = (INDEPENDENT, LCE_INSTANCE)
# The rows of S1-S4 whose forward route is measured through a T12 fitted on the training pairs (one fit of ~40 s
# each on the full profile): the target rows and BCT, the strongest baseline. l2 and the triplet row decide nothing
# and are compared on the backward route; lce-transform has its own, jointly trained T12 (forward_own).
FORWARD_METHODS = (INDEPENDENT, BCT, LCE, LCE_INSTANCE)


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
      name: "full", "quick" or a test's own name.
      train_classes, test_classes: glyph classes generated when --data is not given.
      size: image side in pixels.
      epochs: epochs of every new model (and of the cross-model transformations).
      old_epochs: epochs of the old models.
      batch_size: training batch size.
      new_arch: the backbone of every model except S2's (old and new).
      small_arch, large_arch: S2's old (small) and new (larger) backbones.
      dim, small_dim: embedding sizes (S4's old model uses small_dim).
      boundary, lambda_align, lambda_boundary, lambda_compat: LCE / baseline settings (chosen with
        --validate on training classes; see benchmarks/results/validation.md).
      lambda_instance, instance_temperature: lce-instance's InfoNCE weight λ_i and temperature τ
        (lce_tf.defaults).
      val_classes: training classes held out by --validate.
      triplet_k: images per class in a triplet batch (P x K sampling).
      learning_rate, old_learning_rate: Adam learning rates of the new and the old models.
      seeds: the seeds of the rows that decide the targets (S1/S2 old, independent, lce, lce-instance, both
        routes).
    """

    name: str
    train_classes: int
    test_classes: int
    size: int
    epochs: int
    old_epochs: int
    batch_size: int = 128
    new_arch: str = "cnn"
    small_arch: str = "small_cnn"
    large_arch: str = "cnn"
    dim: int = 128
    small_dim: int = 64
    boundary: str = defaults.BOUNDARY_RULE
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    lambda_instance: float = defaults.LAMBDA_INSTANCE
    instance_temperature: float = defaults.INSTANCE_TEMPERATURE
    val_classes: int = 100
    triplet_k: int = 4
    learning_rate: float = 1e-3
    old_learning_rate: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)


PROFILES = {
    # Every glyph class the installed fonts share (2,064 = 1,445 training + 619 test at a 0.3 test fraction), as
    # `make demo` and `lce-tf data glyphs --classes 2064 --test-fraction 0.3` make them. Epochs from the epoch
    # study on held-out TRAINING classes (benchmarks/results/epochs.md): the old models' own top-1 plateaus
    # at 5 (cnn) and 7 (small_cnn) epochs, so every old model trains 7; the new models' top-1 plateaus at 2-3
    # epochs and their mAP rises until 5-7: 5. The LCE settings (lce_tf.defaults) were chosen with --validate
    # on held-out training classes (benchmarks/results/validation.md); the forward route's T12 uses the
    # library's fit defaults (benchmarks/results/transform_validation.md).
    "full": Profile("full", train_classes=1445, test_classes=619, size=20, epochs=5, old_epochs=7, batch_size=128,
                    val_classes=400),
    # The same data with the epochs of the studies made before the epoch study (new 3, old 2): what
    # --validate-transform and --epoch-study ran with (transform_validation.md, epochs.md).
    "all": Profile("all", train_classes=1445, test_classes=619, size=20, epochs=3, old_epochs=2, batch_size=128,
                   val_classes=400),
    # --quick: the same scenarios (25 models, 7 more per extra seed) at smoke-test size: ~60 steps per new model
    # and ~56 per old one, about the fewest that leave BatchNormalization's moving statistics converged
    # (docs/design.md, "Known traps"). Measured: 4/3 epochs at 20 px, batch 32 took 9.0 min; 3/3 at 16 px 6.6 min.
    "quick": Profile("quick", train_classes=60, test_classes=30, size=16, epochs=2, old_epochs=4, batch_size=48,
                     val_classes=20, seeds=(0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model to train; equal specs are the same model (trained once, reused).

    Attributes:
      arch, dim, loss: backbone, embedding size, classification head.
      classes: the training classes: "0:50%", "0:75%" or "all" (lce_tf.data.select_classes spec).
      epochs: training epochs.
      compat: compatibility mode (lce_tf.model.MODES).
      parent: the old model (modes that need one).
      partner: the frozen new model (cross-model mode).
      boundary, lambda_align, lambda_boundary, lambda_compat: compatibility settings.
      lambda_instance, instance_temperature: lce-instance's InfoNCE term (docs/design.md item 9).
      learning_rate: Adam learning rate.
    """

    arch: str
    dim: int
    loss: str
    classes: str
    epochs: int
    compat: str = INDEPENDENT
    parent: Optional["Spec"] = None
    partner: Optional["Spec"] = None
    boundary: str = defaults.BOUNDARY_RULE
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    lambda_instance: float = defaults.LAMBDA_INSTANCE
    instance_temperature: float = defaults.INSTANCE_TEMPERATURE
    learning_rate: float = 1e-3

    def describe(self) -> dict[str, Any]:
        out = {"arch": self.arch, "dim": self.dim, "loss": self.loss, "classes": self.classes,
               "epochs": self.epochs, "compat": self.compat, "learning_rate": self.learning_rate}
        terms = modes.get(self.compat).loss_terms
        if modes.ALIGN_LOSS in terms:  # lce, lce-instance, lce-transform, cross-model
            out.update(boundary=self.boundary, lambda_align=self.lambda_align, lambda_boundary=self.lambda_boundary)
        if modes.INSTANCE_LOSS in terms:
            out.update(lambda_instance=self.lambda_instance, instance_temperature=self.instance_temperature)
        if modes.BCT_LOSS in terms or modes.L2_LOSS in terms:
            out["lambda_compat"] = self.lambda_compat
        return out


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
