"""Custom TFX artifact types of the lce-tf pipeline (the standard ones are used wherever they fit).

- `ClassCenters`: a directory holding `class_centers.npz` (lce_tf.centers.ClassCenters.save: centers
  [C, D], boundary_cos [C], counts [C], class names, source model id, checksum). When the pipeline had
  no old model (its first run), the directory holds only `NO_OLD_MODEL` and the custom property
  `available` is 0.
- `RetrievalIndex`: a directory holding `index/` (a relocatable lce_tf.index.scann_index.EmbeddingIndex). When
  the model was not blessed the index is not built: the directory holds only `NOT_BUILT` and the
  custom property `built` is 0.
- `GalleryTransformation`: a directory holding `transformation/` (an lce_tf transformation directory:
  SavedModel with `old_to_new` [and `new_to_old`] plus lce_tf_transform.json, `lce_tf.transformation`),
  the fitted old -> new map of the forward upgrade route. Without an old model (first run) it holds
  only `NO_OLD_MODEL` and the custom property `available` is 0.

This module owns the layout of every artifact that more than one component reads or writes (the file
and folder names, the custom properties another component checks, `transformation_dir`, the first-run
marker `write_no_old_model`), so that no component imports another one: the writer and its readers
both import these names from here. It imports components/util.py, never the reverse.

Type names follow the KFP v2 schema-title rule `<namespace>.<Title>` so the pipeline compiles for
Kubeflow.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from tfx.types import artifact

from components import util

# ClassCenters and GalleryTransformation.
CENTERS_FILE = "class_centers.npz"
NO_OLD_MODEL_FILE = "NO_OLD_MODEL"
AVAILABLE_PROPERTY = "available"  # int: 1 when the artifact holds its content, 0 on the first run
TRANSFORMATION_SUBDIR = "transformation"
TRANSFORM_ID_PROPERTY = "transform_id"
TRANSFORMATION_DIR_PROPERTY = "transformation_dir"
# RetrievalIndex.
INDEX_SUBDIR = "index"
NOT_BUILT_FILE = "NOT_BUILT"
BUILT_PROPERTY = "built"  # int: 1 when the index was built
# ModelBlessing (written by the CompatibilityValidator; read by the IndexBuilder and the Pusher).
BLESSED_PROPERTY = "blessed"  # int 1/0: what the stock Pusher reads
BLESSED_ROUTE_PROPERTY = "blessed_route"  # "backward", "forward", "first-model", or "" when refused
# The blessing also records TRANSFORMATION_DIR_PROPERTY and TRANSFORM_ID_PROPERTY of the forward route.

_LOG = logging.getLogger(__name__)


def transformation_dir(transformation: Optional[artifact.Artifact]) -> Optional[str]:
    """The transformation directory inside a GalleryTransformation artifact, or None when it has none
    (first run: `available` = 0, or an empty channel).

    Raises:
      ValueError: naming the artifact when `available` is 1 but the directory is missing.
    """
    if transformation is None or transformation.get_int_custom_property(AVAILABLE_PROPERTY) != 1:
        return None
    path = os.path.join(util.path(transformation), TRANSFORMATION_SUBDIR)
    if not os.path.isdir(path):
        raise ValueError(f"transformation {transformation.uri}: {TRANSFORMATION_SUBDIR}/ is missing although "
                         f"{AVAILABLE_PROPERTY} = 1")
    return path


def write_no_old_model(output, output_dir: str, component: str, consequence: str) -> None:
    """The first run of the pipeline (the old-model input is empty) for a component whose output needs
    the old model (ClassCenters, GalleryTransformation): logs it, writes only the NO_OLD_MODEL marker
    into `output_dir` and sets the output's custom property `available` to 0.

    Args:
      output: the output artifact.
      output_dir: its local directory (created).
      component: the component's name, for the log.
      consequence: what follows for the pipeline, for the marker ("the new model is trained independently").
    """
    _LOG.warning("%s: no old model (first run of the pipeline): %s", component, consequence)
    os.makedirs(output_dir, exist_ok=True)
    util.write_text(os.path.join(output_dir, NO_OLD_MODEL_FILE),
                    f"No old model was resolved (first run): {consequence}.\n")
    output.set_int_custom_property(AVAILABLE_PROPERTY, 0)


class ClassCenters(artifact.Artifact):
    """Old-model class centers and boundary cosines of the new training set's classes (docs/design.md item 1)."""

    TYPE_NAME = "lce_tf.ClassCenters"


class RetrievalIndex(artifact.Artifact):
    """A versioned, relocatable ScaNN index of a gallery (lce_tf.index)."""

    TYPE_NAME = "lce_tf.RetrievalIndex"


class GalleryTransformation(artifact.Artifact):
    """A fitted transformation old space -> new space (lce_tf.transformation), for the forward route."""

    TYPE_NAME = "lce_tf.GalleryTransformation"
