"""One training run, end to end: data + old model/centers -> fitted `CompatibleEmbeddingModel`.

The CLI (`lce-tf train`) and the TFX trainer component both call `train` so that there is exactly one
implementation of how a compatible model is configured, compiled, fitted and checked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lce_tf import checks, defaults
from lce_tf.centers import ClassCenters

logger = logging.getLogger(__name__)

HEADS = ("normsoftmax", "cosface", "arcface", "triplet")
TRAINING_DATA = "training data"
"""How a non-finite-input error names `train`'s dataset ("training data batch 3 contains ...")."""


class TrainingDivergedError(RuntimeError):
    """Raised when a loss became NaN/Inf: the model is not exported."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (defaults are the demo's; see docs/design.md for the loss weights).

    Attributes:
      architecture: backbone name (lce_tf.backbones.ARCHITECTURES).
      embedding_dim: D of the new model.
      loss: classification head, one of HEADS.
      scale, margin: s and m of the margin-softmax head (reference re-id config: ArcFace s=16, m=0.1).
      compat: compatibility mode (lce_tf.model.MODES).
      lambda_align, lambda_boundary, lambda_compat: loss weights (λ_a, λ_b, and the BCT/L2 weight).
      init_from_old_centers: lce mode: the classifier rows start at the old centers.
      epochs, batch_size, learning_rate: optimisation.
      shift_pixels: random-translation augmentation in pixels.
      sync_batch_norm: synchronized BatchNormalization (global-batch statistics under a multi-replica
        strategy; `lce_tf.backbones.build_backbone`).
      seed: seeds Python, NumPy and TensorFlow, with op determinism on.
      version: version label written into the model metadata.
      steps_per_execution: train steps run per call into the TensorFlow graph (Keras
        `compile(steps_per_execution=...)`): callbacks, the progress bar and the NaN check see every
        N-th step; the steps and the results are the same. `train` runs one step per call when the
        dataset's size is unknown (Keras needs it to run several) and no steps_per_epoch is given.
      precision: "float32", or "mixed_bfloat16": the backbone's convolutions compute in bfloat16
        (float32 variables, head and losses); faster only on CPUs with bfloat16 instructions (AVX512_BF16,
        AMX) through oneDNN, and not bit-identical to float32 (`lce_tf.backbones.build_backbone`). The
        trained model computes in float32 afterwards (export, embedding).
      jit_compile: compile the train step with XLA. Off: on CPU, XLA's convolutions are several times
        slower than oneDNN's, and with op determinism on, models with max-pooling (small_cnn, cnn) fail
        (XLA has no deterministic max-pool gradient); benchmarks/results/train_speed.md.
    """

    architecture: str = "cnn"
    embedding_dim: int = defaults.EMBEDDING_DIM
    loss: str = "arcface"
    scale: float = 16.0
    margin: float = 0.1
    compat: str = "independent"
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    init_from_old_centers: bool = True
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    shift_pixels: int = 2
    sync_batch_norm: bool = False
    seed: int = 0
    version: str = "v1"
    steps_per_execution: int = 8
    precision: str = "float32"
    jit_compile: bool = False

    def validate(self) -> None:
        from lce_tf.backbones import ARCHITECTURES, MAX_POOLING_ARCHITECTURES, PRECISIONS
        from lce_tf.model import MODES

        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}.")
        if self.loss not in HEADS:
            raise ValueError(f"Unknown loss {self.loss!r}; expected one of {', '.join(HEADS)}.")
        if self.compat not in MODES:
            raise ValueError(f"Unknown compatibility mode {self.compat!r}; expected one of {', '.join(MODES)}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}.")
        if self.jit_compile and self.architecture in MAX_POOLING_ARCHITECTURES and self.compat != "cross-model":
            raise ValueError(f"jit_compile=True cannot train {self.architecture}: XLA has no deterministic max-pool "
                             "gradient and training runs with op determinism on; use jit_compile=False (on CPU it "
                             "is also the faster choice) or a backbone without max-pooling (resnet, mobilenet).")
        for name in ("embedding_dim", "epochs", "batch_size", "steps_per_execution"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected a positive {name}; received {getattr(self, name)}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"Expected a positive learning_rate; received {self.learning_rate}.")


def classification_loss(config: TrainConfig):
    """The Keras loss object of the configured head."""
    from lce_tf import losses

    if config.loss == "triplet":
        return losses.TripletLoss()
    if config.loss == "normsoftmax":
        return losses.NormSoftmaxLoss(scale=config.scale)
    cls = {"cosface": losses.CosFaceLoss, "arcface": losses.ArcFaceLoss}[config.loss]
    return cls(scale=config.scale, margin=config.margin)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow and turns on TensorFlow op determinism."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def bfloat16_is_fast() -> Optional[bool]:
    """Whether oneDNN can run bfloat16 convolutions natively here: oneDNN on (TensorFlow's default on x86
    Linux) and a CPU flag avx512_bf16 or amx_bf16 in /proc/cpuinfo; None when that cannot be read."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").lower() in ("0", "false"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def build_model(config: TrainConfig, *, num_classes: int, input_shape: Sequence[int],
                old_centers: Optional[ClassCenters] = None, old_embedder: Optional[Callable] = None,
                new_backbone: Optional[Callable] = None, new_centers: Optional[ClassCenters] = None,
                strategy=None):
    """Seeds, builds and compiles the compatible model of a run, ready for `model.fit` (what `train` fits).

    Args:
      config, num_classes, input_shape, old_centers, old_embedder, new_backbone, new_centers, strategy:
        as in `train`.

    Returns:
      The compiled `CompatibleEmbeddingModel`, with its optimizer built.

    Raises:
      ValueError: inconsistent settings (unknown names, missing centers, dimension mismatch).
    """
    import tensorflow as tf

    from lce_tf.model import CompatibilityConfig, CompatibleEmbeddingModel, build_compatible_model

    config.validate()
    if config.precision == "mixed_bfloat16" and bfloat16_is_fast() is False:
        logger.warning("precision mixed_bfloat16: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX) that "
                       "oneDNN can use, so bfloat16 convolutions will be slower than float32")
    seed_everything(config.seed)
    compat = CompatibilityConfig(
        mode=config.compat,
        old_centers=None if old_centers is None else old_centers.centers,
        old_boundary_cos=None if old_centers is None else old_centers.boundary_cos,
        lambda_align=config.lambda_align, lambda_boundary=config.lambda_boundary,
        lambda_compat=config.lambda_compat, init_from_old_centers=config.init_from_old_centers,
        new_centers=None if new_centers is None else new_centers.centers)
    head_classes = None if config.loss == "triplet" else num_classes
    if config.compat == "cross-model" and new_backbone is None:
        raise ValueError("Mode 'cross-model' needs the frozen new model (--new-model).")
    with (strategy or tf.distribute.get_strategy()).scope():
        if config.compat == "cross-model":
            model = CompatibleEmbeddingModel(new_backbone, None, compat, embedding_dim=new_centers.dim)
        else:
            model = build_compatible_model(config.architecture, input_shape, config.embedding_dim, head_classes,
                                           compat, old_embedder=old_embedder,
                                           sync_batch_norm=config.sync_batch_norm, precision=config.precision)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                      loss=None if config.compat == "cross-model" else classification_loss(config),
                      steps_per_execution=config.steps_per_execution, jit_compile=config.jit_compile)
        # The optimizer's slots exist before the first step, so Keras traces the train step once (a
        # first call that creates variables is traced twice).
        model.optimizer.build(model.trainable_variables)
    return model


def fit_model(model, train_dataset, *, epochs: int, steps_per_epoch: Optional[int] = None,
              verbose: int | str = "auto", callbacks: Sequence = ()):
    """`model.fit` as `train` runs it: every batch checked for NaN/Inf, TerminateOnNaN before the
    caller's callbacks. Returns the Keras History."""
    import tensorflow as tf

    with checks.raise_nonfinite_errors():
        return model.fit(checks.finite_batches(train_dataset, TRAINING_DATA), epochs=epochs,
                         steps_per_epoch=steps_per_epoch, verbose=verbose,
                         callbacks=[tf.keras.callbacks.TerminateOnNaN(), *callbacks])


def finish_training(model) -> None:
    """After fitting: a mixed-precision backbone computes in float32 from now on (export, embedding)."""
    import tensorflow as tf

    from lce_tf.backbones import use_float32

    if isinstance(model.backbone, tf.keras.Model):  # not the frozen SavedModel of cross-model mode
        use_float32(model.backbone)


def train(config: TrainConfig, train_dataset, *, num_classes: int, input_shape: Sequence[int],
          old_centers: Optional[ClassCenters] = None, old_embedder: Optional[Callable] = None,
          new_backbone: Optional[Callable] = None, new_centers: Optional[ClassCenters] = None,
          steps_per_epoch: Optional[int] = None, verbose: int | str = "auto", callbacks: Sequence = (),
          strategy=None):
    """Builds, compiles and fits a compatible model.

    Every batch is checked for NaN/Inf inside the input pipeline (`lce_tf.checks.finite_batches`, one
    reduction per batch) before a training step sees it: NaN does not always reach the loss (max-pool
    squashes it on some CPUs), so `TerminateOnNaN` alone would not stop such a run.

    Args:
      config: the run's settings (validated here).
      train_dataset: a tf.data.Dataset of (images [B, H, W, C], labels [B]) batches, one epoch (e.g.
        `lce_tf.data.make_image_dataset(..., shuffle=True)`, which decodes the images once into memory).
      num_classes: C, the number of training classes.
      input_shape: (H, W, C).
      old_centers: old class centers aligned to the training labels (modes that need them).
      old_embedder: the frozen old model, images -> embeddings (l2 mode).
      new_backbone: the frozen new model's embed function (cross-model mode).
      new_centers: the frozen new model's class centers aligned to the labels (cross-model mode).
      steps_per_epoch, verbose, callbacks: passed to `model.fit`.
      strategy: an optional `tf.distribute.Strategy` (e.g. `MultiWorkerMirroredStrategy`, with TF_CONFIG
        set in every worker process): the model is built and compiled in its scope and `train_dataset`
        then holds batches of the GLOBAL batch size, which `model.fit` splits over the replicas.
        Without it, TensorFlow's default strategy (one device).

    Returns:
      (model, history dict of per-epoch lists).

    Raises:
      ValueError: inconsistent settings (unknown names, missing centers, dimension mismatch).
      lce_tf.checks.NonFiniteError: (a ValueError) a batch of images holds NaN/Inf; one line naming the
        batch and the count. Nothing is returned, so nothing is exported.
      TrainingDivergedError: a loss became NaN/Inf.
    """
    cardinality = getattr(train_dataset, "cardinality", None)
    unknown_size = cardinality is not None and int(cardinality()) < 0
    if config.steps_per_execution > 1 and steps_per_epoch is None and unknown_size:
        logger.info("train: the dataset's size is unknown and no steps_per_epoch is given: one step per execution")
        config = dataclasses.replace(config, steps_per_execution=1)
    model = build_model(config, num_classes=num_classes, input_shape=input_shape, old_centers=old_centers,
                        old_embedder=old_embedder, new_backbone=new_backbone, new_centers=new_centers,
                        strategy=strategy)
    history = fit_model(model, train_dataset, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                        verbose=verbose, callbacks=callbacks)
    finish_training(model)
    check_history(history.history)
    return model, history.history


def check_history(history: dict[str, list[float]]) -> None:
    """Raises TrainingDivergedError when any logged loss is NaN/Inf (TerminateOnNaN stopped the fit)."""
    for name, values in history.items():
        bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            raise TrainingDivergedError(
                f"Training diverged: {name} became {values[bad[0]]} in epoch {bad[0] + 1}; nothing was "
                "exported. Lower the learning rate or the loss weights.")


def compatibility_record(config: TrainConfig, old_model_id: Optional[str], old_dim: Optional[int]
                         ) -> Optional[dict[str, Any]]:
    """The `compatible_with` entry of the exported metadata (None for an independent model).

    The old model's space is named by its model id: centers and embeddings of a model's own `embed`
    signature live in that space.
    """
    if config.compat == "independent" or not old_model_id:
        return None
    return {
        "model_id": old_model_id,
        "embedding_space": old_model_id,
        "mode": config.compat,
        "signature": "embed_compat" if config.compat in ("lce-transform", "cross-model") else "embed",
        "dim": int(old_dim),
    }
