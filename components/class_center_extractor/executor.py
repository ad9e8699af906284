"""Executor of ClassCenterExtractor: a Beam job over the training split (lce_tf.beam.centers)."""

from __future__ import annotations

import logging
import os
from typing import Any

from tfx.dsl.components.base import base_beam_executor

from components import artifacts, util
from components.artifacts import AVAILABLE_PROPERTY

# Keys of the inputs, the output and the parameters (component.py re-exports them).
EXAMPLES_KEY = "examples"
OLD_MODEL_KEY = "old_model"
CLASS_CENTERS_KEY = "class_centers"
SPLIT_KEY = "split"
BOUNDARY_KEY = "boundary"
FLIP_AVERAGE_KEY = "flip_average"
BATCH_SIZE_KEY = "batch_size"

# Where pass 2's input is spilled during the run (inside the output artifact; deleted after it).
SPILL_DIR = ".spill"

_LOG = logging.getLogger(__name__)


class Executor(base_beam_executor.BaseBeamExecutor):
    """Embeds the split with the old model (in Beam workers) and writes class_centers.npz.

    With no old model (the pipeline's first run) it writes only the NO_OLD_MODEL marker and sets the
    custom property `available` to 0; the trainer then trains independently.
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf.center_accumulators import parse_boundary_rule
        from lce_tf.centers import ClassCenters
        from lce_tf.serving import read_model_metadata

        # Validate every input and parameter before any work.
        examples = util.single(input_dict, EXAMPLES_KEY)
        old_model = util.single(input_dict, OLD_MODEL_KEY, optional=True)
        output = util.single(output_dict, CLASS_CENTERS_KEY)
        split = str(exec_properties.get(SPLIT_KEY) or "train")
        try:
            boundary = str(parse_boundary_rule(str(exec_properties.get(BOUNDARY_KEY) or "")))
        except ValueError as e:
            raise ValueError(f"parameter {BOUNDARY_KEY}: {e}") from None
        flip_average = util.as_bool(exec_properties.get(FLIP_AVERAGE_KEY, False), FLIP_AVERAGE_KEY)
        batch_size = int(exec_properties.get(BATCH_SIZE_KEY) or 256)
        if batch_size < 1:
            raise ValueError(f"parameter {BATCH_SIZE_KEY} must be >= 1; received {batch_size}")
        examples_dir = util.path(examples)
        info = util.read_examples_info(examples_dir)
        entry = util.split_info(info, split, examples_dir, SPLIT_KEY)
        output_dir = util.path(output)
        os.makedirs(output_dir, exist_ok=True)
        if old_model is None:
            artifacts.write_no_old_model(output, output_dir, "ClassCenterExtractor",
                                         "the new model is trained independently")
            return
        util.check_split_records(examples_dir, split, entry)
        model_dir = util.model_dir(util.path(old_model), OLD_MODEL_KEY)
        metadata = read_model_metadata(model_dir)
        image_shape = tuple(int(v) for v in metadata["input_shape"])

        from lce_tf.beam import centers as centers_beam

        out_path = os.path.join(output_dir, artifacts.CENTERS_FILE)
        _LOG.info("ClassCenterExtractor: embedding split %s (%d images, %d classes) with %s; boundary %s",
                  split, entry["num_examples"], entry["num_classes"], metadata["model_id"], boundary)
        # Pass 2 reads the embeddings back from shards spilled here (memory stays bounded by buffers).
        spill_dir = os.path.join(output_dir, SPILL_DIR)
        try:
            with self._make_beam_pipeline() as pipeline:
                centers_beam.extract_class_centers(
                    pipeline, util.split_pattern(examples_dir, split), model_dir, image_shape,
                    entry["class_names"], out_path, boundary=boundary, source_model_id=metadata["model_id"],
                    batch_size=batch_size, flip_average=flip_average, spill_dir=spill_dir)
        finally:
            centers_beam.delete_spill_dir(spill_dir)
        centers = ClassCenters.load(out_path)  # verifies the checksum; small ([C, D])
        output.set_int_custom_property(AVAILABLE_PROPERTY, 1)
        output.set_string_custom_property("source_model_id", centers.source_model_id)
        output.set_string_custom_property("boundary_rule", centers.boundary_rule)
        output.set_int_custom_property("num_classes", centers.num_classes)
        output.set_int_custom_property("dim", centers.dim)
        output.set_float_custom_property("mean_pairwise_cosine", float(centers.mean_pairwise_cosine()))
        _LOG.info("ClassCenterExtractor: %d centers of dimension %d (mean pairwise cosine %.3f) -> %s",
                  centers.num_classes, centers.dim, centers.mean_pairwise_cosine(), out_path)
