"""ClassCenterExtractor: the old model's class centers and boundaries over the training Examples (Beam).

    centers = ClassCenterExtractor(examples=example_gen.outputs["examples"],
                                   old_model=resolver.outputs["model"]).outputs[CLASS_CENTERS_KEY]

docs/design.md, the method, item 1: for every class j of the NEW training split, c_j = normalize(Σ f̂_i) and
b_j = min or P-th percentile of ⟨f̂_i, c_j⟩, f̂ = normalize(φ1(x)). Exact, in two Beam passes with
combiners (lce_tf.beam.centers); the old model is loaded in the DoFn's setup() on every worker.
"""

from __future__ import annotations

from typing import Optional

from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from lce_tf import defaults
from components.class_center_extractor import executor
from components.class_center_extractor.executor import (  # noqa: F401  (the keys)
    AVAILABLE_PROPERTY, BATCH_SIZE_KEY, BOUNDARY_KEY, CLASS_CENTERS_KEY, EXAMPLES_KEY, FLIP_AVERAGE_KEY,
    OLD_MODEL_KEY, SPLIT_KEY)


class ClassCenterExtractorSpec(ComponentSpec):
    """Inputs: Examples and the old Model (may be empty at run time); output: ClassCenters."""

    PARAMETERS = {
        SPLIT_KEY: ExecutionParameter(type=str),
        BOUNDARY_KEY: ExecutionParameter(type=str),
        FLIP_AVERAGE_KEY: ExecutionParameter(type=bool),
        BATCH_SIZE_KEY: ExecutionParameter(type=int),
    }
    INPUTS = {
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        OLD_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model, optional=True, allow_empty=True),
    }
    OUTPUTS = {CLASS_CENTERS_KEY: ChannelParameter(type=artifacts.ClassCenters)}


class ClassCenterExtractor(base_beam_component.BaseBeamComponent):
    """Computes the old model's ClassCenters of the training split with Apache Beam.

    Outputs:
      class_centers: ClassCenters holding class_centers.npz (custom property `available` = 1), or only
        the NO_OLD_MODEL marker (`available` = 0) when the old-model channel is empty (first run).
    """

    SPEC_CLASS = ClassCenterExtractorSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: channel.BaseChannel, old_model: Optional[channel.BaseChannel] = None, *,
                 split: str = "train", boundary: str = defaults.BOUNDARY_RULE, flip_average: bool = False,
                 batch_size: int = 256):
        """Args:
          examples: Examples with the training split (lce_tf.data records).
          old_model: the old Model (resolved from the metadata store or imported); may be empty.
          split: the split to compute the centers over.
          boundary: "min" (reference) or "percentile:P" (robust).
          flip_average: sum the embeddings of each image and its horizontal flip (off for glyph data).
          batch_size: images per embedding batch in the workers.
        """
        spec = ClassCenterExtractorSpec(**{
            EXAMPLES_KEY: examples, OLD_MODEL_KEY: old_model, SPLIT_KEY: split, BOUNDARY_KEY: boundary,
            FLIP_AVERAGE_KEY: bool(flip_average), BATCH_SIZE_KEY: int(batch_size),
            CLASS_CENTERS_KEY: channel.Channel(type=artifacts.ClassCenters)})
        super().__init__(spec=spec)
