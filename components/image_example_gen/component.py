"""ImageFolderExampleGen: image folders -> TFRecord Examples with train / query / gallery splits.

    examples = ImageFolderExampleGen(train_dir="data/train", query_dir="data/query",
                                     gallery_dir="data/gallery").outputs[EXAMPLES_KEY]

The training folder becomes the `train` split; the held-out query and gallery folders (disjoint classes,
docs/design.md "Demo and benchmark data") become the `query` and `gallery` splits that the
CompatibilityValidator and the IndexBuilder read. Records are tf.train.Example in the lce_tf.data format
(image/encoded, image/class/label, image/class/text), written by `lce_tf.tfrecords.write_tfrecords`.

Caching: the component has no input artifacts, so the folders' content enters the cache key through
the `input_fingerprint` parameter. By default it is computed here, when the pipeline is built, from the
relative path, size and modification time of every file under the local folders (remote URIs are not
listed: pass `input_fingerprint` yourself, e.g. a data version, when the data under a URI changes).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components.image_example_gen import executor
from components.image_example_gen.executor import (  # noqa: F401  (the keys and split names)
    EXAMPLES_KEY, EXAMPLES_PER_SHARD_KEY, GALLERY_DIR_KEY, GALLERY_SPLIT, INPUT_FINGERPRINT_KEY, QUERY_DIR_KEY,
    QUERY_SPLIT, TRAIN_CLASSES_KEY, TRAIN_DIR_KEY, TRAIN_SPLIT)


class ImageFolderExampleGenSpec(ComponentSpec):
    """Parameters: the three folders (query/gallery may be ""), a class selection, shard size, fingerprint."""

    PARAMETERS = {
        TRAIN_DIR_KEY: ExecutionParameter(type=str),
        QUERY_DIR_KEY: ExecutionParameter(type=str),
        GALLERY_DIR_KEY: ExecutionParameter(type=str),
        TRAIN_CLASSES_KEY: ExecutionParameter(type=str),
        EXAMPLES_PER_SHARD_KEY: ExecutionParameter(type=int),
        INPUT_FINGERPRINT_KEY: ExecutionParameter(type=str),
    }
    INPUTS = {}
    OUTPUTS = {EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples)}


def _is_remote(path: str) -> bool:
    return "://" in path


def folder_fingerprint(*folders: str) -> str:
    """sha256 over (folder, relative path, size, mtime_ns) of every file under the local folders.

    Remote URIs ("gs://...") and "" contribute only their name. Hidden files and folders are skipped,
    as `lce_tf.data.read_image_folder` skips them.
    """
    digest = hashlib.sha256()
    for folder in folders:
        digest.update(f"\0folder\0{folder}\0".encode("utf-8"))
        if not folder or _is_remote(folder) or not os.path.isdir(folder):
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                rel = os.path.relpath(path, folder)
                digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


class ImageFolderExampleGen(base_component.BaseComponent):
    """Writes image folders as TFRecord Examples (splits `train`, `query`, `gallery`).

    Outputs:
      examples: standard Examples; `URI/lce_tf_examples.json` records the image shape and, per split, the
        class names, record count and source folder; `URI/paths-<split>.txt` the relative image path of
        every record.
    """

    SPEC_CLASS = ImageFolderExampleGenSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, train_dir: str, query_dir: str = "", gallery_dir: str = "", *, train_classes: str = "",
                 examples_per_shard: int = 4096, input_fingerprint: Optional[str] = None):
        """Args:
          train_dir: training image folder DIR/<class>/<image>.
          query_dir: held-out query images ("" = no query split).
          gallery_dir: held-out gallery images ("" = no gallery split).
          train_classes: `lce_tf.data.select_classes` spec of the training classes to keep ("0:50%",
            a names file); "" keeps all.
          examples_per_shard: records per TFRecord shard.
          input_fingerprint: cache key of the folders' content; None computes `folder_fingerprint`.
        """
        if input_fingerprint is None:
            input_fingerprint = folder_fingerprint(train_dir, query_dir, gallery_dir)
        spec = ImageFolderExampleGenSpec(**{
            TRAIN_DIR_KEY: train_dir, QUERY_DIR_KEY: query_dir, GALLERY_DIR_KEY: gallery_dir,
            TRAIN_CLASSES_KEY: train_classes, EXAMPLES_PER_SHARD_KEY: int(examples_per_shard),
            INPUT_FINGERPRINT_KEY: input_fingerprint,
            EXAMPLES_KEY: channel.Channel(type=standard_artifacts.Examples)})
        super().__init__(spec=spec)
