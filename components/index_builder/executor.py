"""Executor of IndexBuilder: embeds the gallery split and writes an index directory (ScaNN or Milvus)."""

from __future__ import annotations

import logging
import os
from typing import Any

from tfx.dsl.components.base import base_executor

from components import artifacts, util

# Keys of the inputs, the output and the parameters (component.py re-exports them).
MODEL_KEY = "model"
EXAMPLES_KEY = "examples"
BLESSING_KEY = "blessing"
INDEX_KEY = "index"
SPLIT_KEY = "split"
ALGORITHM_KEY = "algorithm"
NUM_NEIGHBORS_KEY = "num_neighbors"
BATCH_SIZE_KEY = "batch_size"
BACKEND_KEY = "backend"
MILVUS_URI_KEY = "milvus_uri"
MILVUS_INDEX_TYPE_KEY = "milvus_index_type"
BACKENDS = ("scann", "milvus")

# Custom property of the output: 1 when the index was built.
BUILT_PROPERTY = "built"

_LOG = logging.getLogger(__name__)


def entry_ids(paths: list[str] | None, class_names: list[str], labels, split: str) -> list[str]:
    """Index entry ids: the image path relative to the split's folder ("<class>/<file>", the convention of
    lce_tf.search), or "<class>/<split>-<record index>" when the paths are not recorded."""
    if paths is not None and len(paths) == len(labels):
        return list(paths)
    return [f"{class_names[int(label)]}/{split}-{i:07d}" for i, label in enumerate(labels)]


def build_index_dir(index_dir: str, ids: list[str], embeddings, model_id: str, embedding_space: str, *,
                    backend: str = "scann", algorithm: str = "", num_neighbors: int = 10, milvus_uri: str = "",
                    milvus_index_type: str = "") -> dict[str, Any]:
    """Builds the gallery index into `index_dir` with the chosen backend; returns the output's properties.

    ScaNN: an `EmbeddingIndex` saved in the directory (algorithm by size unless given). Milvus: a
    `MilvusIndex` whose collection is on `milvus_uri`, or, when it is "", in a Milvus Lite database file
    inside `index_dir` (under the pipeline root in a local run).
    """
    from lce_tf import search

    overrides: dict[str, Any] = {"num_neighbors": min(num_neighbors, len(ids))}
    if backend == "milvus":
        if milvus_index_type:
            overrides["index_type"] = milvus_index_type
        config = search.config_for(backend, len(ids), embeddings.shape[1], overrides)
        from lce_tf.milvus_index import MilvusIndex

        index = MilvusIndex.build(ids, embeddings, model_id, embedding_space=embedding_space, model_id=model_id,
                                  model_version=model_id, config=config, index_dir=index_dir,
                                  uri=milvus_uri or None)
        try:
            return {"index_dir": index.index_dir, "count": len(index), "dim": index.dim,
                    "algorithm": index.config.algorithm, "backend": backend, "collection": index.collection,
                    "milvus_uri": milvus_uri or "milvus-lite"}
        finally:
            index.close()
    from lce_tf import retrieval

    if algorithm:
        overrides["algorithm"] = algorithm
    config = search.config_for(backend, len(ids), embeddings.shape[1], overrides)
    index = retrieval.EmbeddingIndex.build(ids, embeddings, model_id, embedding_space=embedding_space,
                                           model_id=model_id, model_version=model_id, config=config)
    path = index.save(index_dir)
    return {"index_dir": path, "count": len(index), "dim": index.dim, "algorithm": index.config.algorithm,
            "backend": backend}


class Executor(base_executor.BaseExecutor):
    """Builds the gallery index with the model's own `embed` signature (its own embedding space).

    With a connected blessing that is not blessed, no index is built (NOT_BUILT marker, `built` = 0).
    """

    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        from lce_tf import retrieval
        from lce_tf.data import make_tfrecord_dataset
        from lce_tf.serving import load_embedding_model

        model_artifact = util.single(input_dict, MODEL_KEY)
        examples = util.single(input_dict, EXAMPLES_KEY)
        blessing = util.single(input_dict, BLESSING_KEY, optional=True)
        output = util.single(output_dict, INDEX_KEY)
        split = str(exec_properties.get(SPLIT_KEY) or "gallery")
        algorithm = str(exec_properties.get(ALGORITHM_KEY) or "")
        if algorithm:
            util.check_choice(ALGORITHM_KEY, algorithm, retrieval.ALGORITHMS)
        backend = str(exec_properties.get(BACKEND_KEY) or "scann")
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
        if blessing is not None and blessing.get_int_custom_property("blessed") != 1:
            _LOG.info("IndexBuilder: the model was not blessed: no index built")
            util.write_text(os.path.join(output_dir, artifacts.NOT_BUILT_FILE),
                            f"The model {model_artifact.uri} was not blessed ({blessing.uri}): no index built.\n")
            output.set_int_custom_property(BUILT_PROPERTY, 0)
            return

        util.check_split_records(examples_dir, split, entry)
        model = load_embedding_model(util.model_dir(util.path(model_artifact), MODEL_KEY))
        dataset = make_tfrecord_dataset(util.split_pattern(examples_dir, split), model.input_shape, batch_size)
        embeddings, labels = model.embed_dataset(dataset, signature="embed")
        ids = entry_ids(util.read_split_paths(examples_dir, split), entry["class_names"], labels, split)
        space = model.metadata["embedding_space"]
        built = build_index_dir(os.path.join(output_dir, artifacts.INDEX_SUBDIR), ids, embeddings, model.model_id,
                                space, backend=backend, algorithm=algorithm, num_neighbors=num_neighbors,
                                milvus_uri=milvus_uri, milvus_index_type=milvus_index_type)
        output.set_int_custom_property(BUILT_PROPERTY, 1)
        output.set_string_custom_property("embedding_space", space)
        output.set_string_custom_property("model_id", model.model_id)
        for key, value in built.items():
            if isinstance(value, int):
                output.set_int_custom_property(key, value)
            else:
                output.set_string_custom_property(key, str(value))
        _LOG.info("IndexBuilder: %d gallery entries x %d (%s %s, space %s) -> %s", built["count"], built["dim"],
                  backend, built["algorithm"], space, built["index_dir"])
