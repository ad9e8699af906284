"""The steps of a training run: what a mode needs, checked (`check_inputs`, `prepare_training`), then the
`CompatibleEmbeddingModel` built, compiled, fitted and checked (`build_model`, `train`).

`lce_tf.training_run.run_training` strings them together for the CLI (`lce-tf train`), the TFX LceTrainer
and the compatibility benchmark, so there is exactly one implementation of a run. The settings are
`lce_tf.train_config.TrainConfig` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from lce_tf import catalog, checks, modes
from lce_tf.centers import ClassCenters
from lce_tf.train_config import TrainConfig  # noqa: F401  (the settings, declared in lce_tf/train_config.py)

logger = logging.getLogger(__name__)

TRAINING_DATA = "training data"
"""How a non-finite-input error names `train`'s dataset ("training data batch 3 contains ...")."""


class TrainingDivergedError(RuntimeError):
    """Raised when a loss became NaN/Inf: the model is not exported."""


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


class EmbeddingModelLike(Protocol):
    """What training reads of an old (or frozen new) model: a loaded `lce_tf.serving.EmbeddingModel`, or the
    benchmark's in-process stand-in."""

    model_id: str
    embedding_dim: int
    input_shape: tuple

    def keras_embedder(self) -> Callable: ...


@dataclasses.dataclass
class TrainingInputs:
    """What a run trains against, checked and aligned to the training classes (made by `prepare_training`).

    Attributes:
      old_centers: [C, D_old] old class centers, row j = training class j (modes that need them).
      old_embedder: the frozen old model, images -> embeddings (l2, lce-instance).
      new_backbone, new_centers: the frozen new model and its class centers (cross-model).
      old_model_id, old_dim: the old model's id and dimension, for the `compatible_with` metadata.
    """

    old_centers: Optional[ClassCenters] = None
    old_embedder: Optional[Callable] = None
    new_backbone: Optional[Callable] = None
    new_centers: Optional[ClassCenters] = None
    old_model_id: Optional[str] = None
    old_dim: Optional[int] = None

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of `build_model` / `train` that carry the old and new models."""
        return {"old_centers": self.old_centers, "old_embedder": self.old_embedder,
                "new_backbone": self.new_backbone, "new_centers": self.new_centers}

    def compatible_with(self, config: TrainConfig) -> Optional[dict[str, Any]]:
        """The `compatible_with` entry of the exported metadata (`compatibility_record`)."""
        return compatibility_record(config, self.old_model_id, self.old_dim)


@dataclasses.dataclass(frozen=True)
class InputNames:
    """How a caller names its inputs in the one-line errors of `check_inputs` and `prepare_training`.

    The message templates are formatted with `mode=` the mode's name.

    Attributes:
      dim: the new embedding's dimension (e.g. "--dim", "parameter embedding_dim").
      centers: the old centers (e.g. "Old centers v1_centers.npz", "input 'class_centers'").
      missing_centers, missing_old_model, missing_new_model: the errors of a mode whose old centers (and
        old model to compute them), old model or frozen new model is missing.
    """

    dim: str = "embedding_dim"
    centers: str = "Old centers"
    missing_centers: str = "mode {mode!r} needs the old model's class centers (or the old model to compute them)"
    missing_old_model: str = "mode {mode!r} needs the old model"
    missing_new_model: str = "mode {mode!r} needs the frozen new model"


def check_inputs(config: TrainConfig, *, old_centers: bool, old_model: bool, new_model: bool,
                 can_compute_centers: bool, names: InputNames = InputNames()) -> modes.Mode:
    """The one set of mode checks: the settings are valid and the mode has what it needs.

    Run before anything is read or loaded (`lce_tf.training_run.run_training` calls it first), so a
    missing input fails at once.

    Args:
      config: the run's settings (validated here).
      old_centers, old_model, new_model: whether the caller has the old centers, the old model and the
        frozen new model.
      can_compute_centers: the caller can compute centers with a model over the training data.
      names: how the errors name the caller's inputs.

    Returns:
      The mode (`config.mode`), to pass along.

    Raises:
      ValueError: bad settings, a missing input (one line, in the caller's names), or a module file that is
        missing, fails to import or defines no build_backbone (`lce_tf.module_file.load_checked_module`).
    """
    mode = config.validate()
    if config.module_file:  # before anything is read: the file exists, imports, defines build_backbone
        from lce_tf import module_file

        module_file.load_checked_module(config.module_file)
    if mode.needs_old_centers and not old_centers and not (old_model and can_compute_centers):
        raise ValueError(names.missing_centers.format(mode=mode.name))
    if mode.needs_old_embedder and not old_model:
        raise ValueError(names.missing_old_model.format(mode=mode.name))
    if mode.needs_new_model and not (new_model and can_compute_centers):
        raise ValueError(names.missing_new_model.format(mode=mode.name))
    return mode


def prepare_training(config: TrainConfig, *, class_names: Sequence[str], input_shape: Sequence[int],
                     old_model: Optional[EmbeddingModelLike] = None, old_centers: Optional[ClassCenters] = None,
                     new_model: Optional[EmbeddingModelLike] = None,
                     compute_centers: Optional[Callable[[EmbeddingModelLike], ClassCenters]] = None,
                     names: InputNames = InputNames()) -> TrainingInputs:
    """Decides and checks what the configured mode needs: the one set-up of every training run.

    `lce_tf.training_run.run_training` (the CLI, the LceTrainer executor and the compatibility benchmark)
    calls it after loading the inputs, then builds the input pipeline, then `train(config, dataset, ...,
    **inputs.model_inputs())` builds the `CompatibleEmbeddingModel` (seeded there, after the input
    pipeline, whose shuffle seeds combine with TensorFlow's global seed). What a mode needs is read from
    its `lce_tf.modes.Mode` declaration (`config.mode`).

    Args:
      config: the run's settings (validated here, with `check_inputs`).
      class_names: the training classes, in label order (the centers are reordered to them).
      input_shape: (H, W, C) of the training images.
      old_model: the old model (model_id, embedding_dim, input_shape, keras_embedder()).
      old_centers: the old model's class centers over (a superset of) the training classes; None to
        compute them with `compute_centers(old_model)`.
      new_model: the frozen new model (cross-model).
      compute_centers: model -> its class centers over the training data (needed when centers are not
        given).
      names: how the caller names its inputs in errors (e.g. "--dim", "Old centers v1_centers.npz").

    Returns:
      The `TrainingInputs`.

    Raises:
      ValueError: a missing input, centers computed with another model than the old model, a dimension
        that a direct mode cannot compare, an old model (l2, lce-instance) that takes other images, images the
        architecture cannot take (`lce_tf.catalog.check_input_shape`), a module file whose backbone does not
        build or returns no [batch, embedding_dim] embeddings (`lce_tf.module_file.build_backbone_from_module`,
        a trial build); one line each.
    """
    mode = check_inputs(config, old_centers=old_centers is not None, old_model=old_model is not None,
                        new_model=new_model is not None, can_compute_centers=compute_centers is not None,
                        names=names)
    if mode.trains_backbone:  # e.g. a keras.applications family at its minimum size, before any model is loaded
        catalog.check_input_shape(config.architecture, input_shape)
        if config.module_file:  # a trial build: the file's model takes these images and returns [B, D]
            from lce_tf import module_file

            module_file.build_backbone_from_module(config.module_file, input_shape, config.embedding_dim)
    dim_name, centers_name = names.dim, names.centers
    if mode.needs_old_embedder:  # checked before any centers are computed with the old model
        if mode.direct and old_model.embedding_dim != config.embedding_dim:
            raise ValueError(f"the old model {old_model.model_id} has dimension {old_model.embedding_dim} but the new "
                             f"embedding has dimension {config.embedding_dim} ({dim_name}); mode {mode.name!r} "
                             "needs equal dimensions")
        if tuple(old_model.input_shape) != tuple(input_shape):
            raise ValueError(f"mode {mode.name!r}: the old model {old_model.model_id} takes images "
                             f"{tuple(old_model.input_shape)} but the training images are {tuple(input_shape)}")
    inputs = TrainingInputs()
    if mode.needs_old_centers:
        if old_centers is None:
            old_centers = compute_centers(old_model)
        if old_model is not None and old_centers.source_model_id != old_model.model_id:
            raise ValueError(f"the old class centers were computed with model {old_centers.source_model_id} but the "
                             f"old model is {old_model.model_id}")
        old_centers = old_centers.subset(list(class_names))  # row j = training class j
        if mode.direct and old_centers.dim != config.embedding_dim:
            raise ValueError(f"{centers_name} has dimension {old_centers.dim} but the new embedding has dimension "
                             f"{config.embedding_dim} ({dim_name}); mode {mode.name!r} needs equal dimensions, use "
                             f"mode {modes.LCE_TRANSFORM.name!r}")
        inputs.old_centers = old_centers
    if mode.needs_old_embedder:
        inputs.old_embedder = old_model.keras_embedder()
    if mode.needs_new_model:
        inputs.new_centers = compute_centers(new_model)
        inputs.new_backbone = new_model.keras_embedder()
    if mode.compatible_with_old:
        inputs.old_model_id = (old_centers.source_model_id if inputs.old_centers is not None
                               else old_model.model_id)
        inputs.old_dim = inputs.old_centers.dim if inputs.old_centers is not None else old_model.embedding_dim
    return inputs


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
      ValueError: inconsistent settings (unknown names, missing centers, dimension mismatch), or a
        `new_backbone` given to a mode that trains its own backbone (it is never replaced silently).
    """
    import tensorflow as tf

    from lce_tf.model import CompatibilityConfig, CompatibleEmbeddingModel, build_compatible_model

    mode = config.validate()
    if config.precision == "mixed_bfloat16" and bfloat16_is_fast() is False:
        logger.warning("precision mixed_bfloat16: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX) that "
                       "oneDNN can use, so bfloat16 convolutions will be slower than float32")
    seed_everything(config.seed)
    compat = CompatibilityConfig(
        mode=mode.name,
        old_centers=None if old_centers is None else old_centers.centers,
        old_boundary_cos=None if old_centers is None else old_centers.boundary_cos,
        lambda_align=config.lambda_align, lambda_boundary=config.lambda_boundary,
        lambda_compat=config.lambda_compat, lambda_instance=config.lambda_instance,
        instance_temperature=config.instance_temperature, init_from_old_centers=config.init_from_old_centers,
        new_centers=None if new_centers is None else new_centers.centers)
    head_classes = None if config.loss == "triplet" else num_classes
    if mode.needs_new_model and new_backbone is None:
        raise ValueError(f"Mode {mode.name!r} needs the frozen new model (--new-model).")
    if new_backbone is not None and mode.trains_backbone:
        raise ValueError(f"new_backbone is the frozen new model of mode {modes.CROSS_MODEL.name!r}; mode {mode.name!r} "
                         f"trains the backbone of architecture {config.architecture!r} (to train your own network, "
                         "pass it to lce_tf.model.build_compatible_model)")
    with (strategy or tf.distribute.get_strategy()).scope():
        if not mode.trains_backbone:
            model = CompatibleEmbeddingModel(new_backbone, None, compat, embedding_dim=new_centers.dim)
        else:
            backbone = config.architecture
            if config.module_file:  # your own backbone (lce_tf.module_file), built here in the strategy's scope
                from lce_tf import module_file

                backbone = module_file.build_backbone_from_module(config.module_file, input_shape,
                                                                  config.embedding_dim)
            model = build_compatible_model(backbone, input_shape, config.embedding_dim, head_classes,
                                           compat, old_embedder=old_embedder,
                                           sync_batch_norm=config.sync_batch_norm, precision=config.precision,
                                           init_weights=config.init_weights, trainable_from=config.trainable_from)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                      loss=classification_loss(config) if mode.trains_backbone else None,
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
        `lce_tf.datasets.make_image_dataset(..., shuffle=True)`, which decodes the images once into memory).
      num_classes: C, the number of training classes.
      input_shape: (H, W, C).
      old_centers: old class centers aligned to the training labels (modes that need them).
      old_embedder: the frozen old model, images -> embeddings (l2 and lce-instance modes).
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
    mode = config.mode
    if not mode.compatible_with_old or not old_model_id:
        return None
    return {
        "model_id": old_model_id,
        "embedding_space": old_model_id,
        "mode": mode.name,
        "signature": mode.export_signature,
        "dim": int(old_dim),
    }
