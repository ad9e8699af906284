"""Executor of IndexBuilder: the served gallery index of a blessed model, ScaNN or Milvus.

Backward blessing or first model: the gallery split is embedded with the model's `embed` signature.
Forward blessing: the current served index (`base_index`) is upgraded through the fitted transformation
T12 (`lce_tf.index.images.upgrade_with_transformation`): every stored vector moves into the new model's space,
no image is read. When no usable base index was resolved (none yet, not built, in another space than
T12's source, or of another backend than `backend`) it falls back to embedding the gallery split, and
says why (`built_from`).

Backends (`backend`, a name of `lce_tf.index.registry`): "scann" saves an
`lce_tf.index.scann_index.EmbeddingIndex` in the artifact's index directory; "milvus" writes an
`lce_tf.index.milvus_index.MilvusIndex` whose collection lives on `milvus_uri`,
or, when that is "", in a Milvus Lite database file inside the artifact's index directory (under the
pipeline root in a local run). A forward upgrade of a Milvus index fills a new collection and serves it
from the new artifact (on a server the alias moves to it); the base artifact keeps its own.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from tfx.dsl.components.base import base_executor

from components import artifacts, util
from components.artifacts import BLESSED_PROPERTY, BLESSED_ROUTE_PROPERTY, BUILT_PROPERTY
from lce_tf.index import registry

# Keys of the inputs, the output and the parameters (component.py re-exports them).
MODEL_KEY = "model"
EXAMPLES_KEY = "examples"
BLESSING_KEY = "blessing"
TRANSFORMATION_KEY = "transformation"
BASE_INDEX_KEY = "base_index"
INDEX_KEY = "index"
SPLIT_KEY = "split"
ALGORITHM_KEY = "algorithm"
NUM_NEIGHBORS_KEY = "num_neighbors"
BATCH_SIZE_KEY = "batch_size"
BACKEND_KEY = "backend"
MILVUS_URI_KEY = "milvus_uri"
MILVUS_INDEX_TYPE_KEY = "milvus_index_type"
BACKENDS = registry.backend_names()

# Custom properties of the output besides artifacts.BUILT_PROPERTY: how it was built ("gallery split" or
# "upgraded from ..."), the model and the index directory.
BUILT_FROM_PROPERTY = "built_from"
MODEL_ID_PROPERTY = "model_id"
INDEX_DIR_PROPERTY = "index_dir"

_LOG = logging.getLogger(__name__)


def entry_ids(paths: list[str] | None, class_names: list[str], labels, split: str) -> list[str]:
    """Index entry ids: the image path relative to the split's folder ("<class>/<file>", the convention of
    lce_tf.index.images), or "<class>/<split>-<record index>" when the paths are not recorded."""
    if paths is not None and len(paths) == len(labels):
        return list(paths)
    return [f"{class_names[int(label)]}/{split}-{i:07d}" for i, label in enumerate(labels)]


def _overrides(backend: str, num_neighbors: int, algorithm: str, milvus_index_type: str) -> dict[str, Any]:
    """The index configuration overrides of the component's parameters for a backend: each parameter
    that is set and names a field of the backend's configuration (ScaNN: algorithm; Milvus: index_type)."""
    fields = registry.backend_class(backend).config_fields()
    chosen = {"algorithm": algorithm, "index_type": milvus_index_type}
    return {"num_neighbors": num_neighbors, **{k: v for k, v in chosen.items() if v and k in fields}}


def index_properties(index, path: str) -> dict[str, Any]:
    """The output's custom properties that describe a written index (`lce_tf.index.images.index_info`, any
    backend, without the model id and the version counts, which the executor records itself)."""
    from lce_tf.index import images

    info = images.index_info(index)
    return {INDEX_DIR_PROPERTY: path, **{k: v for k, v in info.items() if k not in ("model_id", "version_counts")}}


def build_index_dir(index_dir: str, ids: list[str], embeddings, model_id: str, embedding_space: str, *,
                    backend: str = registry.DEFAULT_BACKEND, algorithm: str = "", num_neighbors: int = 10,
                    milvus_uri: str = "", milvus_index_type: str = "") -> dict[str, Any]:
    """Builds the gallery index into `index_dir` with the chosen backend; returns the output's properties.

    The backend's class comes from the registry (`Index.build_in`). ScaNN: an `EmbeddingIndex` saved in
    the directory (algorithm by size unless given). Milvus: a `MilvusIndex` whose collection is on
    `milvus_uri`, or, when it is "", in a Milvus Lite database file inside `index_dir`.
    """
    cls = registry.backend_class(backend)
    overrides = _overrides(backend, min(num_neighbors, len(ids)), algorithm, milvus_index_type)
    config = cls.config_for(len(ids), embeddings.shape[1], overrides)
    with cls.build_in(index_dir, ids, embeddings, model_id, uri=milvus_uri or None, embedding_space=embedding_space,
                      model_id=model_id, model_version=model_id, config=config) as index:
        return index_properties(index, index.save(index_dir))


def _usable_base_index(base, transformation, backend: str) -> tuple[Optional[Any], str]:
    """(the opened base index, "") when it can be upgraded through the transformation, else (None, why not)."""
    from lce_tf.transformation import TransformationError

    if base is None:
        return None, "no served index was resolved"
    if base.get_int_custom_property(BUILT_PROPERTY) != 1:
        return None, f"the resolved index {base.uri} was not built"
    index_dir = os.path.join(util.path(base), artifacts.INDEX_SUBDIR)
    index = registry.open_index(index_dir)
    try:
        transformation.check_source_space(index.embedding_space, f"served index {index_dir}")
    except TransformationError as e:
        index.close()
        return None, str(e)
    if index.backend != backend:
        index.close()
        return None, f"the served index {index_dir} is a {index.backend} index and {BACKEND_KEY} is {backend!r}"
    return index, ""


def upgrade_served_index(base, transformation, index_dir: str, *, backend: str = registry.DEFAULT_BACKEND,
                         algorithm: str = "", num_neighbors: int = 10,
                         milvus_index_type: str = "") -> tuple[Optional[dict[str, Any]], str]:
    """The forward route's step: the served index (`base`, a RetrievalIndex artifact) moved through T12
    into `index_dir` (a Milvus index: a new collection, served from there).

    Returns:
      (the output's properties, built_from), or (None, why the base index cannot be used).
    """
    from lce_tf.index import images

    base_index, why_not = _usable_base_index(base, transformation, backend)
    if base_index is None:
        return None, why_not
    with base_index:
        overrides = _overrides(backend, min(num_neighbors, len(base_index)), algorithm, milvus_index_type)
        # compose: the pipeline fits one T from the previous model, so entries that an earlier run
        # transformed go through it from their stored vectors (a T from their original space is not fitted
        # here; `lce-tf index upgrade` with it moves them from their originals).
        index = images.upgrade_with_transformation(base_index, transformation, overrides=overrides,
                                                   index_dir=base.uri, out_dir=index_dir, compose=True)
        with index:
            built = index_properties(index, index.save(index_dir))
    return built, f"upgraded from {base.uri} by {transformation.transform_id} (no image read)"


class Executor(base_executor.BaseExecutor):
    """Builds (or, on a forward blessing, upgrades) the gallery index of a blessed model.

    With a connected blessing that is not blessed, no index is built (NOT_BUILT marker, `built` = 0).
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf.index import base as index_base
        from lce_tf.index.scann_config import ALGORITHMS
        from lce_tf.tfrecords import make_tfrecord_dataset
        from lce_tf.serving import load_embedding_model
        from lce_tf.transformation import load_transformation

        model_artifact = util.single(input_dict, MODEL_KEY)
        examples = util.single(input_dict, EXAMPLES_KEY)
        blessing = util.single(input_dict, BLESSING_KEY, optional=True)
        transform_dir = artifacts.transformation_dir(util.single(input_dict, TRANSFORMATION_KEY, optional=True))
        base = util.single(input_dict, BASE_INDEX_KEY, optional=True)
        output = util.single(output_dict, INDEX_KEY)
        split = str(exec_properties.get(SPLIT_KEY) or "gallery")
        algorithm = str(exec_properties.get(ALGORITHM_KEY) or "")
        if algorithm:
            util.check_choice(ALGORITHM_KEY, algorithm, ALGORITHMS)
        backend = str(exec_properties.get(BACKEND_KEY) or registry.DEFAULT_BACKEND)
        util.check_choice(BACKEND_KEY, backend, BACKENDS)
        milvus_uri = str(exec_properties.get(MILVUS_URI_KEY) or "")
        milvus_index_type = str(exec_properties.get(MILVUS_INDEX_TYPE_KEY) or "")
        num_neighbors = int(exec_properties.get(NUM_NEIGHBORS_KEY) or 10)
        batch_size = int(exec_properties.get(BATCH_SIZE_KEY) or 256)
        if num_neighbors < 1 or batch_size < 1:
            raise ValueError(f"parameters {NUM_NEIGHBORS_KEY} and {BATCH_SIZE_KEY} must be >= 1; received "
                             f"{num_neighbors} and {batch_size}")
        examples_dir = util.path(examples)
        info = util.read_examples_info(examples_dir)
        entry = util.split_info(info, split, examples_dir, SPLIT_KEY)
        output_dir = util.path(output)
        os.makedirs(output_dir, exist_ok=True)
        if blessing is not None and blessing.get_int_custom_property(BLESSED_PROPERTY) != 1:
            _LOG.info("IndexBuilder: the model was not blessed: no index built")
            util.write_text(os.path.join(output_dir, artifacts.NOT_BUILT_FILE),
                            f"The model {model_artifact.uri} was not blessed ({blessing.uri}): no index built.\n")
            output.set_int_custom_property(BUILT_PROPERTY, 0)
            return
        route = blessing.get_string_custom_property(BLESSED_ROUTE_PROPERTY) if blessing is not None else ""
        model = load_embedding_model(util.model_dir(util.path(model_artifact), MODEL_KEY))
        index_dir = os.path.join(output_dir, artifacts.INDEX_SUBDIR)
        built, built_from = None, f"gallery split {split}"
        with index_base.closing_opened():  # the indexes opened here (e.g. Milvus) are closed when the step ends
            if route == "forward":
                if transform_dir is None:
                    raise ValueError(f"input {TRANSFORMATION_KEY!r}: the blessing names the forward route but no "
                                     "fitted transformation is connected")
                built, reason = upgrade_served_index(base, load_transformation(transform_dir), index_dir,
                                                     backend=backend, algorithm=algorithm, num_neighbors=num_neighbors,
                                                     milvus_index_type=milvus_index_type)
                if built is not None:
                    built_from = reason
                else:
                    _LOG.warning("IndexBuilder: forward blessing, but %s: embedding the gallery split instead",
                                 reason)
                    built_from = f"gallery split {split} ({reason})"
            if built is None:
                util.check_split_records(examples_dir, split, entry)
                dataset = make_tfrecord_dataset(util.split_pattern(examples_dir, split), model.input_shape,
                                                batch_size)
                embeddings, labels = model.embed_dataset(dataset, signature="embed")
                ids = entry_ids(util.read_split_paths(examples_dir, split), entry["class_names"], labels, split)
                built = build_index_dir(index_dir, ids, embeddings, model.model_id, model.metadata["embedding_space"],
                                        backend=backend, algorithm=algorithm, num_neighbors=num_neighbors,
                                        milvus_uri=milvus_uri, milvus_index_type=milvus_index_type)
        output.set_int_custom_property(BUILT_PROPERTY, 1)
        output.set_string_custom_property(BUILT_FROM_PROPERTY, built_from)
        output.set_string_custom_property(MODEL_ID_PROPERTY, model.model_id)
        for key, value in built.items():
            if isinstance(value, int):
                output.set_int_custom_property(key, value)
            else:
                output.set_string_custom_property(key, str(value))
        _LOG.info("IndexBuilder: %d gallery entries x %d (%s %s, space %s), %s -> %s", built["count"], built["dim"],
                  backend, built["algorithm"], built["embedding_space"], built_from, built[INDEX_DIR_PROPERTY])
