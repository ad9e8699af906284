"""Executor of ImageFolderExampleGen: `lce_tf.data.read_image_folder` + `lce_tf.tfrecords.write_tfrecords` per split."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from tfx.dsl.components.base import base_executor
from tfx.types import standard_artifact_utils

from components import util

# Keys of the parameters and the output (component.py re-exports them).
TRAIN_DIR_KEY = "train_dir"
QUERY_DIR_KEY = "query_dir"
GALLERY_DIR_KEY = "gallery_dir"
TRAIN_CLASSES_KEY = "train_classes"
EXAMPLES_PER_SHARD_KEY = "examples_per_shard"
INPUT_FINGERPRINT_KEY = "input_fingerprint"
EXAMPLES_KEY = "examples"

TRAIN_SPLIT = "train"
QUERY_SPLIT = "query"
GALLERY_SPLIT = "gallery"
SHARD_PREFIX = "data"

_LOG = logging.getLogger(__name__)


class Executor(base_executor.BaseExecutor):
    """Reads the folders, writes one TFRecord split each and the lce_tf_examples.json description."""

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf import data, tfrecords

        train_dir = str(exec_properties.get(TRAIN_DIR_KEY) or "")
        query_dir = str(exec_properties.get(QUERY_DIR_KEY) or "")
        gallery_dir = str(exec_properties.get(GALLERY_DIR_KEY) or "")
        train_classes = str(exec_properties.get(TRAIN_CLASSES_KEY) or "")
        per_shard = int(exec_properties.get(EXAMPLES_PER_SHARD_KEY) or 4096)
        if not train_dir:
            raise ValueError(f"parameter {TRAIN_DIR_KEY} is empty: give the training image folder DIR/<class>/<image>")
        if per_shard < 1:
            raise ValueError(f"parameter {EXAMPLES_PER_SHARD_KEY} must be >= 1; received {per_shard}")
        examples = util.single(output_dict, EXAMPLES_KEY)

        sources = [(TRAIN_SPLIT, TRAIN_DIR_KEY, train_dir, train_classes or None)]
        sources += [(name, key, path, None) for name, key, path in
                    ((QUERY_SPLIT, QUERY_DIR_KEY, query_dir), (GALLERY_SPLIT, GALLERY_DIR_KEY, gallery_dir)) if path]
        folders = {}
        for split, key, path, classes in sources:  # read (and check) every folder before writing anything
            try:
                folders[split] = data.read_image_folder(path, classes)
            except data.DataError as e:
                raise ValueError(f"parameter {key}: {e}") from None
        image_shape = data.infer_image_shape(folders[TRAIN_SPLIT])

        info: dict[str, Any] = {"format": util.EXAMPLES_FORMAT, "image_shape": list(image_shape), "splits": {}}
        for split, _, path, classes in sources:
            folder = folders[split]
            num_shards = max(1, math.ceil(len(folder) / per_shard))
            out_dir = util.split_dir(util.path(examples), split)
            tfrecords.write_tfrecords(folder, os.path.join(out_dir, SHARD_PREFIX), num_shards)
            root = os.path.abspath(folder.root)
            util.write_text(util.paths_file(util.path(examples), split),
                            "".join(os.path.relpath(p, root).replace(os.sep, "/") + "\n" for p in folder.paths))
            info["splits"][split] = {"class_names": list(folder.class_names), "num_classes": folder.num_classes,
                                     "num_examples": len(folder), "source": path, "classes": classes or "",
                                     "num_shards": num_shards}
            _LOG.info("ImageFolderExampleGen: split %s: %d images of %d classes from %s (%d shards)", split,
                      len(folder), folder.num_classes, path, num_shards)
        util.write_json(os.path.join(util.path(examples), util.EXAMPLES_INFO_FILE), info)

        split_names = [split for split, *_ in sources]
        examples.split_names = standard_artifact_utils.encode_split_names(split_names)
        examples.set_string_custom_property("payload_format", "FORMAT_TF_EXAMPLE")
        examples.set_string_custom_property("image_shape", "x".join(str(v) for v in image_shape))
        for split in split_names:
            examples.set_int_custom_property(f"num_examples_{split}", info["splits"][split]["num_examples"])
            examples.set_int_custom_property(f"num_classes_{split}", info["splits"][split]["num_classes"])
