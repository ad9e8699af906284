"""One training run, from what the caller has to a trained (and exported) model (docs/design.md, "Architecture").

`run_training` is the whole run: the mode checks (`lce_tf.training.check_inputs`), then the training data
and the old / frozen new models loaded, `prepare_training`, the input pipeline, `train`, the collapse check
(`check_collapse`: the mean pairwise cosine of a training sample, logged, recorded, and refused above 0.99
when exporting; docs/design.md "Known traps") and the export of a model directory when given one.
`lce-tf train` (lce_tf/cli.py), the LceTrainer executor (components/lce_trainer/executor.py) and the
compatibility benchmark's zoo (scripts/bench/zoo.py) only adapt their inputs to it:

    result = run_training(config, lambda: TrainingData(class_names, input_shape, make_dataset),
                          old_model=lambda: load_embedding_model(old_dir), out_dir="models/v2")

The inputs are loaders (functions without arguments) so that a missing input fails before anything is
read: the checks look only at which loaders are given.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

from lce_tf import catalog, collapse, training
from lce_tf.centers import ClassCenters
from lce_tf.train_config import TrainConfig
from lce_tf.training import EmbeddingModelLike, InputNames, TrainingInputs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingData:
    """The training set as a run reads it.

    Attributes:
      class_names: the training classes in label order.
      input_shape: (H, W, C) of the images.
      make_dataset: config -> (a tf.data.Dataset of (images [B, H, W, C], labels [B]) batches for one epoch,
        steps_per_epoch or None); called after `prepare_training`, before the model is built.
      compute_centers: model -> its class centers over these images (row j = class j); None when the caller
        cannot compute centers (the LceTrainer: they come from the ClassCenterExtractor).
    """

    class_names: Sequence[str]
    input_shape: tuple
    make_dataset: Callable[[TrainConfig], tuple[Any, Optional[int]]]
    compute_centers: Optional[Callable[[EmbeddingModelLike], ClassCenters]] = None


@dataclasses.dataclass
class TrainingResult:
    """What a run produced.

    Attributes:
      config: the settings the model was trained with (cross-model: the frozen new model's architecture).
      model: the trained `CompatibleEmbeddingModel`.
      history: the fit history, per-epoch lists of every logged loss.
      inputs: what it was trained against (`lce_tf.training.TrainingInputs`: old centers, old model id).
      metadata: the exported model directory's metadata (`lce_tf.export.export_model`), None when not exported.
      collapse_check: the collapse check of the trained model (`check_collapse`; also the metadata's
        `training.collapse_check`).
    """

    config: TrainConfig
    model: Any
    history: dict[str, list[float]]
    inputs: TrainingInputs
    metadata: Optional[dict[str, Any]] = None
    collapse_check: Optional[dict[str, Any]] = None

    def final_losses(self) -> str:
        """The last epoch's losses, "loss=0.1234, cls_loss=..." (the CLI's and the LceTrainer's last line)."""
        return ", ".join(f"{k}={v[-1]:.4f}" for k, v in self.history.items())

    def collapse_text(self) -> str:
        """"mean pairwise cosine 0.3120 of 256 training images (collapsed above 0.99)" (the CLI's last line)."""
        check = self.collapse_check or {}
        cosine = check.get("mean_pairwise_cosine")
        value = "n/a" if cosine is None else f"{cosine:.4f}"
        return (f"mean pairwise cosine {value} of {check.get('sample', 0)} training images (collapsed above "
                f"{collapse.COLLAPSE_MAX_COSINE:g})")


def check_collapse(model, dataset, max_images: int = collapse.SAMPLE_SIZE) -> dict[str, Any]:
    """The collapse check of a trained model on a sample of its training data (docs/design.md, "Known traps").

    The sample: the first `max_images` images the training input pipeline yields in a new pass after the fit
    (its next epoch's order and augmentation, deterministic for a seed), embedded in inference mode, so with
    the BatchNorm moving statistics that serving uses. Training images, not held-out ones: a collapse is a
    property of those statistics, which any images show.

    Args:
      model: the trained `CompatibleEmbeddingModel` (images [B, H, W, C] -> unit embeddings [B, D]).
      dataset: the training dataset (batches of (images, labels), or of images).
      max_images: the sample size.

    Returns:
      `lce_tf.collapse.collapse_record` of the sample's embeddings.
    """
    import numpy as np

    chunks: list[np.ndarray] = []
    count = 0
    for element in dataset:
        images = element[0] if isinstance(element, (tuple, list)) else element
        images = images[: max_images - count]
        chunks.append(np.asarray(model(images, training=False), dtype=np.float32))
        count += len(chunks[-1])
        if count >= max_images:
            break
    return collapse.collapse_record(np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32))


def run_training(config: TrainConfig, data: Callable[[], TrainingData], *,
                 old_model: Optional[Callable[[], EmbeddingModelLike]] = None,
                 old_centers: Optional[Callable[[], ClassCenters]] = None,
                 new_model: Optional[Callable[[], EmbeddingModelLike]] = None,
                 can_compute_centers: bool = True, names: InputNames = InputNames(),
                 out_dir: Optional[str] = None, overwrite: bool = False,
                 metadata_extra: Optional[dict[str, Any]] = None,
                 on_start: Optional[Callable[[TrainConfig, TrainingData], None]] = None,
                 verbose: int | str = "auto", callbacks: Sequence = (), strategy=None) -> TrainingResult:
    """Trains a (compatible) model from what the caller has and exports it when given a directory.

    Args:
      config: the run's settings.
      data: loads the training data (called after the checks).
      old_model: loads the old model (loaded whenever given; the modes that need it use it).
      old_centers: loads the old class centers (loaded when the mode needs them).
      new_model: loads the frozen new model (loaded when the mode needs it: cross-model, whose run then
        records the frozen model's architecture).
      can_compute_centers: `data` will give a `compute_centers` (else centers must be given).
      names: how errors name the caller's inputs (`lce_tf.training.InputNames`).
      out_dir: the model directory to export to; None: not exported (the benchmark keeps models in memory).
      overwrite: replace an existing `out_dir` atomically.
      metadata_extra: entries added to the exported metadata's `training` record, after the settings.
      on_start: called with the final settings and the data just before fitting (progress output).
      verbose, callbacks, strategy: as in `lce_tf.training.train`.

    Returns:
      The `TrainingResult`.

    Raises:
      ValueError: bad settings, a missing or inconsistent input (one line; `check_inputs`,
        `prepare_training`), non-finite images (`lce_tf.checks.NonFiniteError`); with `out_dir`, a model
        whose embeddings collapsed (`lce_tf.collapse.CollapsedEmbeddingError`, one line with the cosine; nothing
        is exported). Without `out_dir` a collapse is only logged and returned (`TrainingResult.collapse_check`).
      lce_tf.training.TrainingDivergedError: a loss became NaN/Inf (nothing is exported).
    """
    mode = training.check_inputs(config, old_centers=old_centers is not None, old_model=old_model is not None,
                                 new_model=new_model is not None, can_compute_centers=can_compute_centers,
                                 names=names)
    train_data = data()
    loaded_old = old_model() if old_model is not None else None
    loaded_centers = old_centers() if old_centers is not None and mode.needs_old_centers else None
    loaded_new = new_model() if new_model is not None and mode.needs_new_model else None
    inputs = training.prepare_training(config, class_names=train_data.class_names,
                                       input_shape=train_data.input_shape, old_model=loaded_old,
                                       old_centers=loaded_centers, new_model=loaded_new,
                                       compute_centers=train_data.compute_centers, names=names)
    backbone_name = config.backbone_name  # what the metadata's architecture records
    if loaded_new is not None:  # cross-model trains no backbone: the model is the frozen one's architecture
        backbone_name = getattr(loaded_new, "metadata", {}).get("architecture", config.architecture)
        if catalog.is_known_architecture(backbone_name):  # not e.g. "module_file" or "imported": no --arch value
            config = dataclasses.replace(config, architecture=backbone_name)
    dataset, steps_per_epoch = train_data.make_dataset(config)
    if on_start is not None:
        on_start(config, train_data)
    model, history = training.train(config, dataset, num_classes=len(train_data.class_names),
                                    input_shape=train_data.input_shape, steps_per_epoch=steps_per_epoch,
                                    verbose=verbose, callbacks=callbacks, strategy=strategy,
                                    **inputs.model_inputs())
    result = TrainingResult(config, model, history, inputs, collapse_check=check_collapse(model, dataset))
    cosine = result.collapse_check["mean_pairwise_cosine"]
    # A warning when nothing else will say it; an export refuses with the value (one line: no warning above it).
    warn = collapse.is_collapsed(cosine) and out_dir is None
    (logger.warning if warn else logger.info)("collapse check of %s: %s", config.version, result.collapse_text())
    if out_dir is not None:
        from lce_tf.export import export_model

        collapse.check_not_collapsed(cosine, f"model {config.version} not exported to {out_dir}",
                                     f"{result.collapse_check['sample']} training images")
        extra = {}
        record = {**vars(config), "architecture": backbone_name}
        if config.module_file:  # its name and hash; the file's path is the caller's (a temporary one in a pipeline)
            from lce_tf import module_file

            extra["module_file"] = module_file.module_record(config.module_file)
            record["module_file"] = extra["module_file"]["file"]
        record.update({**(metadata_extra or {}), "history": {k: [float(x) for x in v] for k, v in history.items()},
                       "collapse_check": result.collapse_check})
        result.metadata = export_model(model, out_dir, architecture=backbone_name,
                                       input_shape=train_data.input_shape, version=config.version,
                                       class_names=train_data.class_names,
                                       compatible_with=inputs.compatible_with(config), training=record,
                                       overwrite=overwrite, extra=extra)
    return result
