"""GalleryTransformFitter: the fitted old -> new transformation of the forward upgrade route.

    transformation = GalleryTransformFitter(model=trainer.outputs["model"], old_model=resolver.outputs["model"],
                                            examples=example_gen.outputs["examples"]).outputs[TRANSFORMATION_KEY]

docs/design.md, "The forward path": the training split is embedded with the old and the candidate model,
and T12 (the `lce_tf.layers.CompatibilityTransform` block) is fitted on the pairs (φ1(x), φ2(x)) with the
library's default objective (`lce_tf.transform_fit`: cosine distance + 0.1·classification by the new
model's class centers). The CompatibilityValidator measures M(new, T12(old)) with it, the
IndexBuilder upgrades the served index through it on a forward blessing, and the Pusher ships it with
the model.
"""

from __future__ import annotations

from typing import Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from lce_tf.transform_fit import TransformFitSettings
from components.gallery_transform_fitter import executor
from components.gallery_transform_fitter.executor import (  # noqa: F401  (the keys)
    AVAILABLE_PROPERTY, BATCH_SIZE_KEY, DIRECTION_KEY, EPOCHS_KEY, EXAMPLES_KEY, LEARNING_RATE_KEY, MODEL_KEY,
    OLD_MODEL_KEY, SEED_KEY, SPLIT_KEY, TRANSFORM_ID_PROPERTY, TRANSFORMATION_DIR_PROPERTY, TRANSFORMATION_KEY,
    WIDTH_KEY)

_DEFAULTS = TransformFitSettings()


class GalleryTransformFitterSpec(ComponentSpec):
    """Inputs: the candidate Model, the old Model (may be empty), Examples; output: GalleryTransformation."""

    PARAMETERS = {
        SPLIT_KEY: ExecutionParameter(type=str),
        DIRECTION_KEY: ExecutionParameter(type=str),
        WIDTH_KEY: ExecutionParameter(type=int),
        EPOCHS_KEY: ExecutionParameter(type=int),
        BATCH_SIZE_KEY: ExecutionParameter(type=int),
        LEARNING_RATE_KEY: ExecutionParameter(type=float),
        SEED_KEY: ExecutionParameter(type=int),
    }
    INPUTS = {
        MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        OLD_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model, optional=True, allow_empty=True),
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
    }
    OUTPUTS = {TRANSFORMATION_KEY: ChannelParameter(type=artifacts.GalleryTransformation)}


class GalleryTransformFitter(base_component.BaseComponent):
    """Fits the old -> new gallery transformation on the training split.

    Outputs:
      transformation: GalleryTransformation holding transformation/ (custom properties available = 1,
        transform_id, transformation_dir, source/target_embedding_space, fit_loss_<signature>), or only
        NO_OLD_MODEL (available = 0) on the pipeline's first run.
    """

    SPEC_CLASS = GalleryTransformFitterSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, model: channel.BaseChannel, examples: channel.BaseChannel,
                 old_model: Optional[channel.BaseChannel] = None, *, split: str = "train",
                 direction: str = _DEFAULTS.direction, width: int = _DEFAULTS.width, epochs: int = _DEFAULTS.epochs,
                 batch_size: int = _DEFAULTS.batch_size, learning_rate: float = _DEFAULTS.learning_rate,
                 seed: int = _DEFAULTS.seed):
        """Args:
          model: the candidate Model (the target space).
          examples: Examples with the training split (never the held-out query/gallery classes).
          old_model: the old Model (the source space); may be empty at run time (first run).
          split: the split whose images are embedded with both models.
          direction: "old-to-new" (T12) or "both" (also T21, new -> old).
          width, epochs, batch_size, learning_rate, seed: `lce_tf.transform_fit.TransformFitSettings`.
        """
        spec = GalleryTransformFitterSpec(**{
            MODEL_KEY: model, OLD_MODEL_KEY: old_model, EXAMPLES_KEY: examples, SPLIT_KEY: split,
            DIRECTION_KEY: direction, WIDTH_KEY: int(width), EPOCHS_KEY: int(epochs), BATCH_SIZE_KEY: int(batch_size),
            LEARNING_RATE_KEY: float(learning_rate), SEED_KEY: int(seed),
            TRANSFORMATION_KEY: channel.Channel(type=artifacts.GalleryTransformation)})
        super().__init__(spec=spec)
