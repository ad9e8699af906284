"""Executor for the stock TFX Pusher whose filesystem push is atomic (`lce_tf.fileio.copy_directory`).

The stock Pusher copies the model file by file into BASE_DIRECTORY/<unix time>, `saved_model.pb` last:
a failure half-way (disk full, read-only mount) leaves a partial version directory that a model server
watching BASE_DIRECTORY sees. This executor copies into a hidden sibling and renames it into place, so
BASE_DIRECTORY only ever holds complete versions and a failed push leaves the previous ones as they
were. Everything else (blessing check, versioning, the PushedModel artifact and its properties) is the
stock Pusher's. Use it with

    Pusher(model=..., model_blessing=..., push_destination=...,
           custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.executor.Executor))
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tfx.components.pusher import executor as tfx_pusher
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

from components import util

_LOG = logging.getLogger(__name__)


class Executor(tfx_pusher.Executor):
    """The stock Pusher executor; the filesystem push goes through `lce_tf.fileio.copy_directory`."""

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf import fileio

        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") != "filesystem":
            super().Do(input_dict, output_dict, exec_properties)
            return
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        model_path = self.GetModelPath(input_dict)
        if destination.filesystem.versioning not in (pusher_pb2.Versioning.AUTO,
                                                     pusher_pb2.Versioning.UNIX_TIMESTAMP):
            raise NotImplementedError(f"push_destination: versioning {destination.filesystem.versioning} "
                                      "is not supported (AUTO or UNIX_TIMESTAMP)")
        version = str(int(time.time()))
        serving_path = os.path.join(destination.filesystem.base_directory, version)
        if os.path.exists(util.local_path(serving_path)):
            _LOG.info("AtomicPusher: %s already exists, skipping the copy", serving_path)
        else:
            fileio.copy_directory(util.local_path(model_path), util.local_path(serving_path), "pushed model")
            _LOG.info("AtomicPusher: model written to %s", serving_path)
        io_utils.copy_dir(model_path, model_push.uri)  # the archive copy in the PushedModel artifact
        self._MarkPushed(model_push, pushed_destination=serving_path, pushed_version=version)
