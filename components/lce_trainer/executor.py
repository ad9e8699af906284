"""Executor of LceTrainer: `lce_tf.training.train` on the training split, `lce_tf.export.export_model`."""

from __future__ import annotations

import logging
import os
from typing import Any

from tfx.dsl.components.base import base_executor

from components import artifacts, util
from lce_tf import modes

# Keys of the inputs, the output and the parameters (component.py re-exports them).
EXAMPLES_KEY = "examples"
CLASS_CENTERS_KEY = "class_centers"
OLD_MODEL_KEY = "old_model"
MODEL_KEY = "model"
MODE_KEY = "mode"
ARCHITECTURE_KEY = "architecture"
EMBEDDING_DIM_KEY = "embedding_dim"
LOSS_KEY = "loss"
SCALE_KEY = "scale"
MARGIN_KEY = "margin"
LAMBDA_ALIGN_KEY = "lambda_align"
LAMBDA_BOUNDARY_KEY = "lambda_boundary"
LAMBDA_COMPAT_KEY = "lambda_compat"
LAMBDA_INSTANCE_KEY = "lambda_instance"
INSTANCE_TEMPERATURE_KEY = "instance_temperature"
EPOCHS_KEY = "epochs"
BATCH_SIZE_KEY = "batch_size"
LEARNING_RATE_KEY = "learning_rate"
SHIFT_PIXELS_KEY = "shift_pixels"
SEED_KEY = "seed"
VERSION_KEY = "version"
SPLIT_KEY = "split"

# The modes this component trains (lce_tf.modes.PIPELINE_MODES: not cross-model, which trains no backbone);
# what each needs is read from its lce_tf.modes.Mode.
MODES = modes.PIPELINE_MODE_NAMES

# Custom properties of the output Model.
MODEL_ID_PROPERTY = "lce_model_id"
EFFECTIVE_MODE_PROPERTY = "compat_mode"

_LOG = logging.getLogger(__name__)

_FLOAT_PARAMS = (SCALE_KEY, MARGIN_KEY, LAMBDA_ALIGN_KEY, LAMBDA_BOUNDARY_KEY, LAMBDA_COMPAT_KEY, LEARNING_RATE_KEY)
# Added with lce-instance: a pipeline compiled before then has no value and gets TrainConfig's default.
_OPTIONAL_FLOAT_PARAMS = (LAMBDA_INSTANCE_KEY, INSTANCE_TEMPERATURE_KEY)
_INT_PARAMS = (EMBEDDING_DIM_KEY, EPOCHS_KEY, BATCH_SIZE_KEY, SHIFT_PIXELS_KEY, SEED_KEY)


def train_config(exec_properties: dict[str, Any], mode: str):
    """The lce_tf.training.TrainConfig of these execution properties (validated)."""
    from lce_tf.training import TrainConfig

    values: dict[str, Any] = {"compat": mode, "version": str(exec_properties.get(VERSION_KEY) or "v1"),
                              "architecture": str(exec_properties[ARCHITECTURE_KEY]),
                              "loss": str(exec_properties[LOSS_KEY])}
    for key in _FLOAT_PARAMS:
        values[key] = float(exec_properties[key])
    for key in _OPTIONAL_FLOAT_PARAMS:
        if exec_properties.get(key) is not None:
            values[key] = float(exec_properties[key])
    for key in _INT_PARAMS:
        values[key] = int(exec_properties[key])
    config = TrainConfig(**values)
    config.validate()
    if config.shift_pixels < 0:
        raise ValueError(f"parameter {SHIFT_PIXELS_KEY} must be >= 0; received {config.shift_pixels}")
    return config


class Executor(base_executor.BaseExecutor):
    """Trains the new model from the Examples (+ ClassCenters / old Model) and exports a model directory.

    The model directory goes to MODEL_URI/Format-Serving, where the stock Pusher looks for it. With an
    empty old-model input (the pipeline's first run) the model is trained independently whatever the
    configured mode; the effective mode is recorded in the custom property `compat_mode` and in the
    model metadata.
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf import tfrecords, training
        from lce_tf.centers import ClassCenters
        from lce_tf.serving import load_embedding_model

        examples = util.single(input_dict, EXAMPLES_KEY)
        centers_artifact = util.single(input_dict, CLASS_CENTERS_KEY, optional=True)
        old_artifact = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        model_artifact = util.single(output_dict, MODEL_KEY)
        mode = util.check_choice(MODE_KEY, str(exec_properties.get(MODE_KEY)), MODES)
        split = str(exec_properties.get(SPLIT_KEY) or "train")
        examples_dir = util.path(examples)
        info = util.read_examples_info(examples_dir)
        entry = util.split_info(info, split, examples_dir, SPLIT_KEY)
        util.check_split_records(examples_dir, split, entry)
        class_names = list(entry["class_names"])
        input_shape = tuple(int(v) for v in info["image_shape"])

        effective = mode
        if modes.get(mode).compatible_with_old and old_artifact is None:
            _LOG.warning("LceTrainer: no old model (first run of the pipeline): training %s independently "
                         "instead of with mode %r", exec_properties.get(VERSION_KEY), mode)
            effective = modes.INDEPENDENT.name
        config = train_config(exec_properties, effective)

        old_model = old_centers = None
        if modes.get(effective).compatible_with_old:
            old_model = load_embedding_model(util.model_dir(util.path(old_artifact), OLD_MODEL_KEY))
        if modes.get(effective).needs_old_centers:
            if centers_artifact is None or centers_artifact.get_int_custom_property(artifacts.AVAILABLE_PROPERTY) != 1:
                raise ValueError(f"input {CLASS_CENTERS_KEY!r} holds no centers but mode {mode!r} needs the old "
                                 f"model's class centers (connect a ClassCenterExtractor fed with the same old model)")
            old_centers = ClassCenters.load(os.path.join(util.path(centers_artifact), artifacts.CENTERS_FILE))
        inputs = training.prepare_training(config, class_names=class_names, input_shape=input_shape,
                                           old_model=old_model, old_centers=old_centers,
                                           dim_name=f"parameter {EMBEDDING_DIM_KEY}",
                                           centers_name=f"input {CLASS_CENTERS_KEY!r}")

        dataset = tfrecords.make_tfrecord_dataset(util.split_pattern(examples_dir, split), input_shape,
                                                  config.batch_size, shuffle=True, seed=config.seed,
                                                  shift_pixels=config.shift_pixels)
        _LOG.info("LceTrainer: %s %s D=%d mode=%s on %d images of %d classes for %d epochs", config.version,
                  config.architecture, config.embedding_dim, effective, entry["num_examples"], len(class_names),
                  config.epochs)
        model, history = training.train(config, dataset, num_classes=len(class_names), input_shape=input_shape,
                                        verbose=2, **inputs.model_inputs())
        old_id = old_model.model_id if old_model is not None else None
        from lce_tf.export import export_model

        serving_dir = os.path.join(util.path(model_artifact), util.SERVING_MODEL_DIR)
        settings = {k: v for k, v in vars(config).items()}
        settings["configured_mode"] = mode
        settings["history"] = {k: [float(x) for x in v] for k, v in history.items()}
        metadata = export_model(model, serving_dir, architecture=config.architecture, input_shape=input_shape,
                                version=config.version, class_names=class_names,
                                compatible_with=inputs.compatible_with(config),
                                training=settings)
        model_artifact.set_string_custom_property(MODEL_ID_PROPERTY, metadata["model_id"])
        model_artifact.set_string_custom_property("version", config.version)
        model_artifact.set_string_custom_property(EFFECTIVE_MODE_PROPERTY, effective)
        model_artifact.set_string_custom_property("architecture", config.architecture)
        model_artifact.set_int_custom_property("embedding_dim", int(metadata["embedding_dim"]))
        model_artifact.set_string_custom_property("compatible_with", old_id or "")
        _LOG.info("LceTrainer: exported %s to %s (%s)", metadata["model_id"], serving_dir,
                  ", ".join(f"{k}={v[-1]:.4f}" for k, v in history.items()))
