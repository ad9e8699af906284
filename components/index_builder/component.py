"""IndexBuilder: the served gallery index of a blessed model (ScaNN or Milvus), as a RetrievalIndex.

    index = IndexBuilder(model=trainer.outputs["model"], examples=example_gen.outputs["examples"],
                         blessing=validator.outputs["blessing"]).outputs[INDEX_KEY]

The gallery split is embedded with the model's `embed` signature and indexed with
`lce_tf.index.scann_index.EmbeddingIndex` (ScaNN; brute force / AH / tree-AH chosen by size unless
`algorithm` is given), or, with backend "milvus", written into a Milvus collection
(`lce_tf.index.milvus_index`) on
`milvus_uri`, or in a Milvus Lite database inside the artifact's index directory when the URI is "".
Entry ids are the gallery images' paths relative to the gallery folder ("<class>/<file>"),
entry versions the model id, as `lce-tf index` writes them. The index directory is relocatable (ScaNN's
absolute asset paths are rewritten), so copying the artifact keeps it loadable. With a blessing that is
not blessed nothing is built.

On a forward blessing (the ModelBlessing's `blessed_route` is "forward") the index is not built from
images: the currently served index (`base_index`, resolved with the old model) is upgraded through the
fitted transformation (`transformation`), every stored vector moved into the new model's space with its
id, model version and provenance "transformed from <space> by <transformation>" (`lce-tf index upgrade`).
"""

from __future__ import annotations

from typing import Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from components.index_builder import executor
from components.index_builder.executor import (  # noqa: F401  (the keys)
    ALGORITHM_KEY, BACKEND_KEY, BASE_INDEX_KEY, BATCH_SIZE_KEY, BLESSING_KEY, BUILT_FROM_PROPERTY, BUILT_PROPERTY,
    EXAMPLES_KEY, INDEX_DIR_PROPERTY, INDEX_KEY, MILVUS_INDEX_TYPE_KEY, MILVUS_URI_KEY, MODEL_ID_PROPERTY, MODEL_KEY,
    NUM_NEIGHBORS_KEY, SPLIT_KEY, TRANSFORMATION_KEY)


class IndexBuilderSpec(ComponentSpec):
    """Inputs: Model, Examples, ModelBlessing, GalleryTransformation, the served RetrievalIndex (the last three
    optional); output: RetrievalIndex."""

    PARAMETERS = {
        SPLIT_KEY: ExecutionParameter(type=str),
        ALGORITHM_KEY: ExecutionParameter(type=str),
        NUM_NEIGHBORS_KEY: ExecutionParameter(type=int),
        BATCH_SIZE_KEY: ExecutionParameter(type=int),
        BACKEND_KEY: ExecutionParameter(type=str),
        MILVUS_URI_KEY: ExecutionParameter(type=str),
        MILVUS_INDEX_TYPE_KEY: ExecutionParameter(type=str),
    }
    INPUTS = {
        MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        BLESSING_KEY: ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
        TRANSFORMATION_KEY: ChannelParameter(type=artifacts.GalleryTransformation, optional=True, allow_empty=True),
        BASE_INDEX_KEY: ChannelParameter(type=artifacts.RetrievalIndex, optional=True, allow_empty=True),
    }
    OUTPUTS = {INDEX_KEY: ChannelParameter(type=artifacts.RetrievalIndex)}


class IndexBuilder(base_component.BaseComponent):
    """Builds the index (ScaNN or Milvus) of a gallery split with a model.

    Outputs:
      index: RetrievalIndex holding index/ (custom properties built=1, built_from, index_dir, embedding_space,
        model_id, count, dim, algorithm, backend; Milvus also collection, milvus_uri), or only NOT_BUILT
        (built=0) when the blessing says no.
    """

    SPEC_CLASS = IndexBuilderSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: channel.BaseChannel, examples: channel.BaseChannel,
                 blessing: Optional[channel.BaseChannel] = None, transformation: Optional[channel.BaseChannel] = None,
                 base_index: Optional[channel.BaseChannel] = None, *, split: str = "gallery", algorithm: str = "",
                 num_neighbors: int = 10, batch_size: int = 256, backend: str = "scann", milvus_uri: str = "",
                 milvus_index_type: str = ""):
        """Args:
          model: the Model whose `embed` signature embeds the gallery.
          examples: Examples holding the gallery split.
          blessing: when connected, the index is built only for a blessed model (and upgraded from
            `base_index` when it names the forward route).
          transformation: the fitted old -> new GalleryTransformation (forward route).
          base_index: the currently served RetrievalIndex (forward route; may be empty).
          split: the gallery split.
          algorithm: ScaNN: "brute_force", "ah", "tree_ah", or "" to choose by gallery size.
          num_neighbors: the index's default k.
          batch_size: images per embedding batch.
          backend: a backend of `lce_tf.index.registry`: "scann" or "milvus".
          milvus_uri: Milvus server URI (token from LCE_TF_MILVUS_TOKEN in the executor's environment);
            "" = Milvus Lite in the artifact's index directory (local runs).
          milvus_index_type: "" (IVF_FLAT) or a Milvus index type (Milvus Lite: FLAT, IVF_FLAT, AUTOINDEX).
        """
        spec = IndexBuilderSpec(**{
            MODEL_KEY: model, EXAMPLES_KEY: examples, BLESSING_KEY: blessing, TRANSFORMATION_KEY: transformation,
            BASE_INDEX_KEY: base_index, SPLIT_KEY: split,
            ALGORITHM_KEY: algorithm, NUM_NEIGHBORS_KEY: int(num_neighbors), BATCH_SIZE_KEY: int(batch_size),
            BACKEND_KEY: backend, MILVUS_URI_KEY: milvus_uri, MILVUS_INDEX_TYPE_KEY: milvus_index_type,
            INDEX_KEY: channel.Channel(type=artifacts.RetrievalIndex)})
        super().__init__(spec=spec)
