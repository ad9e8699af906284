"""Executor of LceTrainer: its inputs adapted to `lce_tf.training_run.run_training` (the one training run)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from typing import Any, Iterator

from tfx.dsl.components.base import base_executor

from components import artifacts, util
from lce_tf import modes, train_config

# Keys of the inputs, the output and the parameters (component.py re-exports them). The training settings'
# parameters are TrainConfig's fields offered to the pipeline (lce_tf.train_config.parameter_types()); the
# keys named here are the ones this executor reads itself.
EXAMPLES_KEY = "examples"
CLASS_CENTERS_KEY = "class_centers"
OLD_MODEL_KEY = "old_model"
MODEL_KEY = "model"
MODE_KEY = "mode"
EMBEDDING_DIM_KEY = "embedding_dim"
SHIFT_PIXELS_KEY = "shift_pixels"
VERSION_KEY = "version"
SPLIT_KEY = "split"
MODULE_FILE_KEY = "module_file"
MODULE_SOURCE_KEY = "module_source"
"""The text of the module file (`module_file`: its path where the pipeline was built, for the record), read by
the component when the pipeline is built and carried in the pipeline as TFX carries a Trainer's module file:
the executor writes it to a temporary file and trains from that, so a run needs no path of the building machine."""

# The modes this component trains (lce_tf.modes.PIPELINE_MODES: not cross-model, which trains no backbone);
# what each needs is read from its lce_tf.modes.Mode.
MODES = modes.PIPELINE_MODE_NAMES

# Custom properties of the output Model.
MODEL_ID_PROPERTY = "lce_model_id"
EFFECTIVE_MODE_PROPERTY = "compat_mode"

_LOG = logging.getLogger(__name__)

# How the one-line errors of lce_tf.training.check_inputs / prepare_training name this component's inputs.
_MISSING_CENTERS = (f"input {CLASS_CENTERS_KEY!r} holds no centers but mode {{mode!r}} needs the old model's class "
                    "centers (connect a ClassCenterExtractor fed with the same old model)")


def train_config_of(exec_properties: dict[str, Any], mode: str):
    """The lce_tf.training.TrainConfig of these execution properties, trained in `mode` (validated).

    Every training setting is read by `lce_tf.train_config.from_parameters`: a parameter without a value
    (a pipeline compiled before the setting existed) keeps TrainConfig's default.
    """
    version = str(exec_properties.get(VERSION_KEY) or train_config.TrainConfig().version)
    config = train_config.from_parameters(exec_properties, compat=mode, version=version)
    config.validate()
    if config.shift_pixels < 0:
        raise ValueError(f"parameter {SHIFT_PIXELS_KEY} must be >= 0; received {config.shift_pixels}")
    return config


@contextlib.contextmanager
def module_file_of(exec_properties: dict[str, Any]) -> Iterator[str]:
    """The module file to train from: the carried text (`module_source`) written to a temporary file of the
    original's basename (removed afterwards), else `module_file` as given ("" when none)."""
    path = str(exec_properties.get(MODULE_FILE_KEY) or "")
    source = exec_properties.get(MODULE_SOURCE_KEY)
    if not source:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lce_tf_module_") as tmp:
        local = os.path.join(tmp, os.path.basename(path) or "module_file.py")
        with open(local, "w", encoding="utf-8") as f:
            f.write(str(source))
        yield local


class Executor(base_executor.BaseExecutor):
    """Trains the new model from the Examples (+ ClassCenters / old Model) and exports a model directory.

    The model directory goes to MODEL_URI/Format-Serving, where the stock Pusher looks for it. With an
    empty old-model input (the pipeline's first run) the model is trained independently whatever the
    configured mode; the effective mode is recorded in the custom property `compat_mode` and in the
    model metadata.
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf import training
        from lce_tf.training_run import TrainingData, run_training

        examples = util.single(input_dict, EXAMPLES_KEY)
        centers_artifact = util.single(input_dict, CLASS_CENTERS_KEY, optional=True)
        old_artifact = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        model_artifact = util.single(output_dict, MODEL_KEY)
        configured = modes.get(util.check_choice(MODE_KEY, str(exec_properties.get(MODE_KEY)), MODES))
        split = str(exec_properties.get(SPLIT_KEY) or "train")
        examples_dir = util.path(examples)
        info = util.read_examples_info(examples_dir)
        entry = util.split_info(info, split, examples_dir, SPLIT_KEY)
        util.check_split_records(examples_dir, split, entry)
        class_names = list(entry["class_names"])

        mode = configured
        if configured.compatible_with_old and old_artifact is None:
            _LOG.warning("LceTrainer: no old model (first run of the pipeline): training %s independently "
                         "instead of with mode %r", exec_properties.get(VERSION_KEY), configured.name)
            mode = modes.INDEPENDENT
        config = train_config_of(exec_properties, mode.name)
        input_shape = config.input_shape(info["image_shape"])  # image_size, else the Examples' shape

        def make_dataset(config):
            from lce_tf import tfrecords

            return tfrecords.make_tfrecord_dataset(util.split_pattern(examples_dir, split), input_shape,
                                                   config.batch_size, shuffle=True, seed=config.seed,
                                                   shift_pixels=config.shift_pixels), None

        def load_old_model():
            from lce_tf.serving import load_embedding_model

            return load_embedding_model(util.model_dir(util.path(old_artifact), OLD_MODEL_KEY))

        def load_old_centers():
            from lce_tf.centers import ClassCenters

            return ClassCenters.load(os.path.join(util.path(centers_artifact), artifacts.CENTERS_FILE))

        def announce(config, _data) -> None:
            _LOG.info("LceTrainer: %s %s D=%d mode=%s on %d images of %d classes for %d epochs", config.version,
                      os.path.basename(config.module_file) or config.architecture, config.embedding_dim, mode.name,
                      entry["num_examples"], len(class_names), config.epochs)

        centers_available = (centers_artifact is not None
                             and centers_artifact.get_int_custom_property(artifacts.AVAILABLE_PROPERTY) == 1)
        names = training.InputNames(dim=f"parameter {EMBEDDING_DIM_KEY}", centers=f"input {CLASS_CENTERS_KEY!r}",
                                    missing_centers=_MISSING_CENTERS)
        serving_dir = os.path.join(util.path(model_artifact), util.SERVING_MODEL_DIR)
        with module_file_of(exec_properties) as module_path:  # the carried text, as a file while training
            result = run_training(
                dataclasses.replace(config, module_file=module_path),
                lambda: TrainingData(class_names, input_shape, make_dataset),
                old_model=load_old_model if mode.compatible_with_old else None,
                old_centers=load_old_centers if mode.needs_old_centers and centers_available else None,
                can_compute_centers=False, names=names, out_dir=serving_dir,
                metadata_extra={"configured_mode": configured.name}, on_start=announce, verbose=2)
        model_artifact.set_string_custom_property(MODEL_ID_PROPERTY, result.metadata["model_id"])
        model_artifact.set_string_custom_property("version", config.version)
        model_artifact.set_string_custom_property(EFFECTIVE_MODE_PROPERTY, mode.name)
        model_artifact.set_string_custom_property("architecture", result.metadata["architecture"])
        model_artifact.set_int_custom_property("embedding_dim", int(result.metadata["embedding_dim"]))
        model_artifact.set_string_custom_property("compatible_with", result.inputs.old_model_id or "")
        _LOG.info("LceTrainer: exported %s to %s (%s)", result.metadata["model_id"], serving_dir,
                  result.final_losses())
