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

Type names follow the KFP v2 schema-title rule `<namespace>.<Title>` so the pipeline compiles for
Kubeflow.
"""

from __future__ import annotations

from tfx.types import artifact

CENTERS_FILE = "class_centers.npz"
NO_OLD_MODEL_FILE = "NO_OLD_MODEL"
INDEX_SUBDIR = "index"
NOT_BUILT_FILE = "NOT_BUILT"
TRANSFORMATION_SUBDIR = "transformation"


class ClassCenters(artifact.Artifact):
    """Old-model class centers and boundary cosines of the new training set's classes (docs/design.md item 1)."""

    TYPE_NAME = "lce_tf.ClassCenters"


class RetrievalIndex(artifact.Artifact):
    """A versioned, relocatable ScaNN index of a gallery (lce_tf.index)."""

    TYPE_NAME = "lce_tf.RetrievalIndex"


class GalleryTransformation(artifact.Artifact):
    """A fitted transformation old space -> new space (lce_tf.transformation), for the forward route."""

    TYPE_NAME = "lce_tf.GalleryTransformation"
