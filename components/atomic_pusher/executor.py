"""Executor for the stock TFX Pusher whose filesystem push is atomic (`lce_tf.fileio.copy_directory`).

The stock Pusher copies the model file by file into BASE_DIRECTORY/<unix time>, `saved_model.pb` last:
a failure half-way (disk full, read-only mount) leaves a partial version directory that a model server
watching BASE_DIRECTORY sees. This executor copies into a hidden sibling and renames it into place, so
BASE_DIRECTORY only ever holds complete versions and a failed push leaves the previous ones as they
were. Versions are unix seconds made strictly increasing (`next_version`: two pushes in the same second
get two versions). Everything else (blessing check, the PushedModel artifact and its properties) is the
stock Pusher's. Destinations this process cannot address with the local file-system API (a base
directory or model on gs:// without the /gcs mount, s3://, hdfs://, ...) fall back to the stock
Pusher, whose copy is not atomic (a warning says so).

On a forward blessing (the ModelBlessing's `blessed_route` is "forward", components.compatibility_validator)
the fitted transformation ships with the model, in the same atomic copy: BASE_DIRECTORY/<version>/
holds the model directory plus `gallery_transform/` (the transformation directory, whose `old_to_new`
moves the previous version's gallery vectors into this model's space: `lce-tf index upgrade`). The
PushedModel gets the custom property `gallery_transform` (its path). Use it with

    Pusher(model=..., model_blessing=..., push_destination=...,
           custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.executor.Executor))
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from tfx.components.pusher import executor as tfx_pusher
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

from components import artifacts, util
from lce_tf import fileio

_LOG = logging.getLogger(__name__)

GALLERY_TRANSFORM_SUBDIR = "gallery_transform"  # in a pushed version: the forward route's transformation
GALLERY_TRANSFORM_PROPERTY = "gallery_transform"


def shipped_transformation(input_dict: dict[str, list]) -> Optional[str]:
    """The transformation directory to ship with the model: the blessing's `transformation_dir` when it
    names the forward route, else None.

    Raises:
      ValueError: a forward blessing whose transformation directory is missing.
    """
    blessings = input_dict.get(standard_component_specs.MODEL_BLESSING_KEY) or []
    if not blessings or blessings[0].get_string_custom_property(artifacts.BLESSED_ROUTE_PROPERTY) != "forward":
        return None
    path = util.local_path(blessings[0].get_string_custom_property(artifacts.TRANSFORMATION_DIR_PROPERTY))
    if not path or not os.path.isdir(path):
        raise ValueError(f"model_blessing {blessings[0].uri}: the forward route was blessed but its transformation "
                         f"directory {path!r} does not exist")
    return path


def _versions(base_directory: str) -> list[str]:
    """The version directories (all-digit names) under base_directory; [] when it does not exist."""
    return [v for v in os.listdir(base_directory) if v.isdigit()] if os.path.isdir(base_directory) else []


def next_version(base_directory: str, now: Optional[float] = None) -> str:
    """The version of a new push: the current unix second, or one more than the latest existing version
    when that is not earlier (two pushes in the same second, or a clock set back).

    Versions therefore always increase, a model server watching BASE_DIRECTORY serves the latest push, and
    a push never lands in (or is recorded as) a version that already holds another model.
    """
    now = time.time() if now is None else now
    versions = _versions(base_directory)
    latest = max((int(v) for v in versions), default=-1)
    return str(max(int(now), latest + 1))


def latest_version_of(base_directory: str, model_dir: str) -> Optional[str]:
    """The latest version under base_directory when it holds the model of model_dir (same model_id), else None.

    A run killed after its Pusher committed the copy but before TFX recorded the PushedModel reruns the
    Pusher with the same model: it then records that version instead of pushing the model a second time.
    Only the latest version counts, so pushing an older model again (a rollback) still makes a new version.
    """
    def model_id(directory: str) -> Optional[str]:
        path = os.path.join(directory, util.MODEL_METADATA_FILE)
        try:
            return fileio.read_json_metadata(path, path, required=("model_id",))["model_id"]
        except (OSError, ValueError):
            return None

    versions = _versions(base_directory)
    if not versions:
        return None
    latest = max(versions, key=int)
    wanted = model_id(model_dir)
    return latest if wanted is not None and model_id(os.path.join(base_directory, latest)) == wanted else None


class Executor(tfx_pusher.Executor):
    """The stock Pusher executor; the filesystem push goes through `lce_tf.fileio.copy_directory`."""

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") != "filesystem":
            super().Do(input_dict, output_dict, exec_properties)
            return
        remote = [p for p in (destination.filesystem.base_directory, self.GetModelPath(input_dict))
                  if not util.is_local(p)]
        if remote:
            _LOG.warning("AtomicPusher: %s is not on a local or mounted file system: pushing with the stock "
                         "Pusher, whose copy is not atomic%s", remote[0],
                         " and ships the model only (the forward route's transformation stays in the "
                         "GalleryTransformation artifact)" if shipped_transformation(input_dict) else "")
            super().Do(input_dict, output_dict, exec_properties)
            return
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        model_path = self.GetModelPath(input_dict)
        transformation = shipped_transformation(input_dict)
        extra = {GALLERY_TRANSFORM_SUBDIR: transformation} if transformation else None
        if destination.filesystem.versioning not in (pusher_pb2.Versioning.AUTO,
                                                     pusher_pb2.Versioning.UNIX_TIMESTAMP):
            raise NotImplementedError(f"push_destination: versioning {destination.filesystem.versioning} "
                                      "is not supported (AUTO or UNIX_TIMESTAMP)")
        base_directory = destination.filesystem.base_directory
        repeated = latest_version_of(util.local_path(base_directory), util.local_path(model_path))
        version = repeated or next_version(util.local_path(base_directory))
        serving_path = os.path.join(base_directory, version)
        if repeated:
            _LOG.info("AtomicPusher: the latest version %s already holds this model (a push whose run ended "
                      "before recording it): not pushed again", serving_path)
        else:  # a new version, later than every existing one; copy_directory never overwrites
            fileio.copy_directory(util.local_path(model_path), util.local_path(serving_path), "pushed model", extra=extra)
            _LOG.info("AtomicPusher: model written to %s%s", serving_path,
                      f" with its gallery transformation ({GALLERY_TRANSFORM_SUBDIR}/)" if extra else "")
        io_utils.copy_dir(model_path, model_push.uri)  # the archive copy in the PushedModel artifact
        self._MarkPushed(model_push, pushed_destination=serving_path, pushed_version=version)
        if transformation:
            model_push.set_string_custom_property(GALLERY_TRANSFORM_PROPERTY,
                                                  os.path.join(serving_path, GALLERY_TRANSFORM_SUBDIR))
