"""CompatibilityValidator: gates a candidate model on measured compatibility with the old model.

    validator = CompatibilityValidator(model=trainer.outputs["model"], examples=example_gen.outputs["examples"],
                                       old_model=resolver.outputs["model"], margin_top1=0.0, margin_map=0.0,
                                       min_top1=0.5)
    Pusher(model=trainer.outputs["model"], model_blessing=validator.outputs[BLESSING_KEY], ...)

On the held-out query and gallery splits it computes the compatibility matrix M(query model, gallery
model) of the candidate, the old model and (when connected) the independently trained reference new*
with `lce_tf.comparison.compare_models`: new/old, old/old, new/new (and new*/new*, update gain, new-model
sacrifice), and, with a fitted transformation T12 (GalleryTransformFitter), the forward pair
M(new, T12(old)). Two upgrade routes (docs/design.md, "The forward path"):

    backward  the candidate declares compatibility with the old space and
              M(new, old) > M(old, old) + margin on top-1 and on mAP      (the paper's criterion);
    forward   M(new, T12(old)) > M(old, old) + margin on top-1 and on mAP (the old gallery's vectors
              moved into the new space, no image re-encoded).

It blesses (`lce_tf.gate.decide`) when M(new, new) >= the floors (min_top1, min_map) and a route that
`compatibility` allows passes ("backward", "forward" or "either"; under "either" with both passing the
blessing names forward).
With an empty old-model channel (the pipeline's first run) only the floors apply. The standard
ModelBlessing gets the int custom property `blessed` (1/0, what the stock Pusher reads), `blessed_route`
(which route; read by the IndexBuilder and the Pusher), `passed_routes`, `transformation_dir`, the
`current_model_id` LatestBlessedModelStrategy uses, the BLESSED / NOT_BLESSED file, metrics.json and a
self-contained report.html with both routes side by side and the matrix heatmaps.
"""

from __future__ import annotations

from typing import Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from components.compatibility_validator import executor
from components.compatibility_validator.executor import (  # noqa: F401  (the keys and file names)
    BASELINE_MODEL_ID_PROPERTY, BATCH_SIZE_KEY, BLESSED_FILE, BLESSED_PROPERTY, BLESSED_ROUTE_PROPERTY, BLESSING_KEY,
    COMPATIBILITY_KEY, COMPATIBILITY_ROUTES, CURRENT_MODEL_ID_PROPERTY, EXAMPLES_KEY, GALLERY_SPLIT_KEY,
    INDEPENDENT_MODEL_KEY, MARGIN_MAP_KEY, MARGIN_TOP1_KEY, METRICS_FILE, MIN_MAP_KEY, MIN_TOP1_KEY, MODEL_KEY,
    NOT_BLESSED_FILE, OLD_MODEL_KEY, PASSED_ROUTES_PROPERTY, QUERY_SPLIT_KEY, REPORT_FILE,
    TRANSFORMATION_DIR_PROPERTY, TRANSFORMATION_KEY)


class CompatibilityValidatorSpec(ComponentSpec):
    """Inputs: the candidate Model, Examples, the old and independent Models (optional); output: ModelBlessing."""

    PARAMETERS = {
        QUERY_SPLIT_KEY: ExecutionParameter(type=str),
        GALLERY_SPLIT_KEY: ExecutionParameter(type=str),
        MARGIN_TOP1_KEY: ExecutionParameter(type=float),
        MARGIN_MAP_KEY: ExecutionParameter(type=float),
        MIN_TOP1_KEY: ExecutionParameter(type=float),
        MIN_MAP_KEY: ExecutionParameter(type=float),
        BATCH_SIZE_KEY: ExecutionParameter(type=int),
        COMPATIBILITY_KEY: ExecutionParameter(type=str),
    }
    INPUTS = {
        MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        OLD_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model, optional=True, allow_empty=True),
        INDEPENDENT_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model, optional=True, allow_empty=True),
        TRANSFORMATION_KEY: ChannelParameter(type=artifacts.GalleryTransformation, optional=True, allow_empty=True),
    }
    OUTPUTS = {BLESSING_KEY: ChannelParameter(type=standard_artifacts.ModelBlessing)}


class CompatibilityValidator(base_component.BaseComponent):
    """Blesses the candidate only when it is compatible with the old model by the configured margins.

    Outputs:
      blessing: ModelBlessing (blessed 1/0, blessed_route, passed_routes, compatibility, transformation_dir,
        transform_id, current_model(_id), baseline_model(_id), per-pair metrics as float properties) holding
        BLESSED or NOT_BLESSED, metrics.json and report.html.
    """

    SPEC_CLASS = CompatibilityValidatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: channel.BaseChannel, examples: channel.BaseChannel,
                 old_model: Optional[channel.BaseChannel] = None,
                 independent_model: Optional[channel.BaseChannel] = None,
                 transformation: Optional[channel.BaseChannel] = None, *, query_split: str = "query",
                 gallery_split: str = "gallery", margin_top1: float = 0.0, margin_map: float = 0.0,
                 min_top1: float = 0.5, min_map: float = 0.0, compatibility: str = "backward",
                 batch_size: int = 256):
        """Args:
          model: the candidate Model.
          examples: Examples holding the query and gallery splits (held-out classes).
          old_model: the old Model (may be empty at run time: first run).
          independent_model: the independently trained new model new* (update gain, sacrifice); optional.
          transformation: the fitted old -> new GalleryTransformation (the forward route); optional.
          query_split, gallery_split: split names in `examples`.
          margin_top1, margin_map: required lead of M(new, old) and M(new, T12(old)) over M(old, old).
          min_top1, min_map: floors of the candidate's own accuracy M(new, new).
          compatibility: the route that may bless: "backward", "forward" or "either".
          batch_size: images per embedding batch.
        """
        spec = CompatibilityValidatorSpec(**{
            MODEL_KEY: model, EXAMPLES_KEY: examples, OLD_MODEL_KEY: old_model,
            INDEPENDENT_MODEL_KEY: independent_model, TRANSFORMATION_KEY: transformation,
            QUERY_SPLIT_KEY: query_split, GALLERY_SPLIT_KEY: gallery_split, COMPATIBILITY_KEY: compatibility,
            MARGIN_TOP1_KEY: float(margin_top1), MARGIN_MAP_KEY: float(margin_map), MIN_TOP1_KEY: float(min_top1),
            MIN_MAP_KEY: float(min_map), BATCH_SIZE_KEY: int(batch_size),
            BLESSING_KEY: channel.Channel(type=standard_artifacts.ModelBlessing)})
        super().__init__(spec=spec)
