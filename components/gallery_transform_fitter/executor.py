"""Executor of GalleryTransformFitter: `lce_tf.transform_fit.fit_between_models` on the training split.

The pairs (φ1(x), φ2(x)) are embedded in this process, not in a Beam job like the class centers: the
fit is one Keras `fit` that reads every pair once per epoch, so the pairs must end up in one place
anyway, and embedding the training split with two small models costs seconds per 10,000 images on 2
cores (the demo's 33,000 training images: about 10 s). Memory stays bounded: the records are streamed
and the pairs go to disk (`lce_tf.transform_fit.PairStore`, under this component's output directory,
deleted after the fit).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tfx.dsl.components.base import base_executor

from components import artifacts, util
from components.artifacts import AVAILABLE_PROPERTY, TRANSFORM_ID_PROPERTY, TRANSFORMATION_DIR_PROPERTY

# Keys of the inputs, the output and the parameters (component.py re-exports them).
MODEL_KEY = "model"
OLD_MODEL_KEY = "old_model"
EXAMPLES_KEY = "examples"
TRANSFORMATION_KEY = "transformation"
SPLIT_KEY = "split"
DIRECTION_KEY = "direction"
WIDTH_KEY = "width"
EPOCHS_KEY = "epochs"
BATCH_SIZE_KEY = "batch_size"
LEARNING_RATE_KEY = "learning_rate"
SEED_KEY = "seed"

_LOG = logging.getLogger(__name__)


def fit_settings(exec_properties: dict[str, Any]):
    """The lce_tf.transform_fit.TransformFitSettings of these execution properties (validated; a bad value
    fails naming the parameter)."""
    from lce_tf.transform_fit import TransformFitSettings

    defaults = TransformFitSettings()
    values = {
        "direction": str(exec_properties.get(DIRECTION_KEY) or defaults.direction),
        "width": int(exec_properties.get(WIDTH_KEY) or defaults.width),
        "epochs": int(exec_properties.get(EPOCHS_KEY) or defaults.epochs),
        "batch_size": int(exec_properties.get(BATCH_SIZE_KEY) or defaults.batch_size),
        "learning_rate": float(exec_properties.get(LEARNING_RATE_KEY) or defaults.learning_rate),
        "seed": int(exec_properties.get(SEED_KEY) or 0),
    }
    try:
        return TransformFitSettings(**values).validate()
    except ValueError as e:
        raise ValueError(f"parameter {e}") from None


class Executor(base_executor.BaseExecutor):
    """Fits T12 (old -> new; with direction "both" also T21) on the candidate's training split.

    With no old model (the pipeline's first run) it writes only the NO_OLD_MODEL marker and sets the
    custom property `available` to 0.
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf.comparison import EvalData
        from lce_tf.serving import load_embedding_model
        from lce_tf.transform_fit import fit_between_models

        candidate = util.single(input_dict, MODEL_KEY)
        old_artifact = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        examples = util.single(input_dict, EXAMPLES_KEY)
        output = util.single(output_dict, TRANSFORMATION_KEY)
        settings = fit_settings(exec_properties)
        split = str(exec_properties.get(SPLIT_KEY) or "train")
        examples_dir = util.path(examples)
        entry = util.split_info(util.read_examples_info(examples_dir), split, examples_dir, SPLIT_KEY)
        output_dir = util.path(output)
        os.makedirs(output_dir, exist_ok=True)
        if old_artifact is None:
            artifacts.write_no_old_model(output, output_dir, "GalleryTransformFitter", "there is no gallery to transform")
            return
        util.check_split_records(examples_dir, split, entry)
        old = load_embedding_model(util.model_dir(util.path(old_artifact), OLD_MODEL_KEY))
        new = load_embedding_model(util.model_dir(util.path(candidate), MODEL_KEY))
        data = EvalData.from_tfrecords(util.split_pattern(examples_dir, split), entry["class_names"],
                                       name=f"split {split}", num_images=entry["num_examples"])
        transform_dir = os.path.join(output_dir, artifacts.TRANSFORMATION_SUBDIR)
        metadata = fit_between_models(
            old, new, data, transform_dir, settings, data_label=f"examples {examples_dir} split {split}",
            work_dir=output_dir, progress=lambda line: _LOG.info("GalleryTransformFitter: %s", line))
        output.set_int_custom_property(AVAILABLE_PROPERTY, 1)
        output.set_string_custom_property(TRANSFORM_ID_PROPERTY, metadata["transform_id"])
        output.set_string_custom_property(TRANSFORMATION_DIR_PROPERTY, transform_dir)
        output.set_string_custom_property("source_embedding_space", metadata["source"]["embedding_space"])
        output.set_string_custom_property("target_embedding_space", metadata["target"]["embedding_space"])
        for signature, loss in metadata["fit_loss"].items():
            output.set_float_custom_property(f"fit_loss_{signature}", float(loss))
        _LOG.info("GalleryTransformFitter: %s (%s -> %s) fitted on %d pairs, final loss %s -> %s",
                  metadata["transform_id"], old.model_id, new.model_id, metadata["fitted_on"]["num_pairs"],
                  metadata["fit_loss"], transform_dir)

