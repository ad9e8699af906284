"""Helpers shared by the component executors: Examples layout, model directories, input checks.

Examples written by `image_example_gen` follow the TFX layout (`URI/Split-<name>/` holding the TFRecord
shards of tf.train.Example in the lce_tf.data format) plus, at the artifact root (outside every
Split-* folder, so TFX readers that glob a split never see it):

    lce_tf_examples.json   {"format": "lce_tf.examples/1", "image_shape": [H, W, C], "splits": {name:
                            {"class_names": [...], "num_examples": N, "num_classes": C, "source": DIR}}}
    paths-<split>.txt      the image path of every record, relative to the split's source folder
                            ("<class>/<file>"), one per line, in record order

This module imports neither tfx nor TensorFlow (`check_split_records` imports TensorFlow when called).
Files are written with `lce_tf.fileio`'s atomic writers (`write_text`, `write_json`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

from lce_tf import fileio
from lce_tf.fileio import write_json, write_text  # noqa: F401  (the executors' atomic writers)

EXAMPLES_FORMAT = "lce_tf.examples/1"
EXAMPLES_INFO_FILE = "lce_tf_examples.json"
SERVING_MODEL_DIR = "Format-Serving"  # tfx.utils.path_constants.SERVING_MODEL_DIR (what the Pusher pushes)
MODEL_METADATA_FILE = "lce_tf_model.json"  # lce_tf.serving.METADATA_FILE


def local_path(uri: str) -> str:
    """The local file-system path of an artifact URI.

    lce_tf reads and writes with the local file system API. On Vertex AI Pipelines artifact URIs are
    gs://BUCKET/... while Cloud Storage is mounted at /gcs/BUCKET/... (Cloud Storage FUSE): such URIs
    are mapped onto the mount when it exists. Every other URI is returned unchanged.
    """
    if uri.startswith("gs://") and os.path.isdir("/gcs"):
        return "/gcs/" + uri[len("gs://"):]
    return uri


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(uri: str) -> bool:
    """True when `local_path(uri)` is a path of the local (or mounted) file system: False for a URI
    with a scheme (gs:// without the /gcs mount, s3://, hdfs://, ram://) that os functions would
    misread as a relative path."""
    return _URI_SCHEME.match(local_path(uri)) is None


def path(artifact) -> str:
    """`local_path(artifact.uri)`."""
    return local_path(artifact.uri)


def split_dir(examples_uri: str, split: str) -> str:
    """URI/Split-<split>: the TFX folder of one split."""
    return os.path.join(examples_uri, f"Split-{split}")


def split_pattern(examples_uri: str, split: str) -> str:
    """The glob pattern of a split's TFRecord shards."""
    return os.path.join(split_dir(examples_uri, split), "*")


def paths_file(examples_uri: str, split: str) -> str:
    """URI/paths-<split>.txt: relative image paths of a split's records, in record order."""
    return os.path.join(examples_uri, f"paths-{split}.txt")


def read_examples_info(examples_uri: str) -> dict[str, Any]:
    """Reads URI/lce_tf_examples.json.

    Raises:
      ValueError: one line naming the Examples artifact when the file is missing or malformed.
    """
    not_examples = "{name} is not in format " + repr(EXAMPLES_FORMAT)
    return fileio.read_json_metadata(
        os.path.join(examples_uri, EXAMPLES_INFO_FILE), f"examples {examples_uri}: {EXAMPLES_INFO_FILE}",
        format=EXAMPLES_FORMAT, required=("splits",),
        messages={"missing": f"examples {examples_uri}: {EXAMPLES_INFO_FILE} is missing (write the Examples with "
                             "the lce-tf ImageFolderExampleGen)",
                  "format": not_examples, "fields": not_examples})


def split_info(info: dict[str, Any], split: str, examples_uri: str, parameter: str = "split") -> dict[str, Any]:
    """The entry of one split, or ValueError naming the parameter, the split and the splits present."""
    splits = info["splits"]
    if split not in splits:
        raise ValueError(f"{parameter} {split!r}: examples {examples_uri} have no such split "
                         f"(splits: {', '.join(sorted(splits))})")
    return splits[split]


def check_split_records(examples_uri: str, split: str, entry: dict[str, Any]) -> int:
    """Reads every record of a split's shards once (CRC checks) and compares the count with the description.

    Executors call it before training or embedding, so that a damaged shard fails with its file name
    instead of a TensorFlow DataLossError in the middle of the work.

    Returns:
      The number of records.

    Raises:
      ValueError: one line naming the Examples artifact, the split and the truncated/corrupted shard, or
        the two disagreeing counts.
    """
    from lce_tf.data import DataError
    from lce_tf.tfrecords import count_tfrecord_examples

    try:
        count = count_tfrecord_examples(split_pattern(examples_uri, split))
    except DataError as e:
        raise ValueError(f"examples {examples_uri}: split {split!r}: {e}") from None
    if count != int(entry["num_examples"]):
        raise ValueError(f"examples {examples_uri}: split {split!r} holds {count} records but {EXAMPLES_INFO_FILE} "
                         f"says {entry['num_examples']}")
    return count


def read_split_paths(examples_uri: str, split: str) -> Optional[list[str]]:
    """The relative image paths of a split's records, or None when the file is absent."""
    path = paths_file(examples_uri, split)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def model_dir(uri: str, what: str = "model") -> str:
    """The lce_tf model directory inside a Model artifact.

    A Model written by the LCE trainer holds it in URI/Format-Serving (where the stock Pusher looks);
    a Model imported from an existing model directory (`old_model` given explicitly) is the directory
    itself.

    Raises:
      ValueError: neither location holds lce_tf_model.json.
    """
    for candidate in (os.path.join(uri, SERVING_MODEL_DIR), uri):
        if os.path.isfile(os.path.join(candidate, MODEL_METADATA_FILE)):
            return candidate
    raise ValueError(f"{what} {uri}: not an lce_tf model directory ({MODEL_METADATA_FILE} is missing in "
                     f"{os.path.join(uri, SERVING_MODEL_DIR)} and in {uri})")


def single(input_dict: dict[str, list], key: str, *, optional: bool = False):
    """The one artifact of input `key`; None when optional and empty.

    Raises:
      ValueError: naming the input when it is empty (and required) or holds several artifacts.
    """
    artifacts = list(input_dict.get(key) or [])
    if not artifacts:
        if optional:
            return None
        raise ValueError(f"input {key!r} is empty: the component needs one artifact there")
    if len(artifacts) > 1:
        raise ValueError(f"input {key!r} holds {len(artifacts)} artifacts; expected one")
    return artifacts[0]


def as_bool(value: Any, name: str) -> bool:
    """A boolean execution property (the orchestrators pass bool, 0/1 or "true"/"false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"parameter {name} must be a boolean; received {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Returns value when it is one of choices, else ValueError naming the parameter."""
    if value not in choices:
        raise ValueError(f"parameter {name}: unknown value {value!r}; expected one of {', '.join(choices)}")
    return value
