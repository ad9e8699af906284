"""LceTrainer: trains the new embedding model with lce_tf and exports a standard Model artifact.

    trainer = LceTrainer(examples=example_gen.outputs["examples"], class_centers=centers.outputs["class_centers"],
                         old_model=resolver.outputs["model"], mode="lce", architecture="cnn", version="v2")
    pusher = Pusher(model=trainer.outputs[MODEL_KEY], ...)

A custom component rather than the stock Trainer with a module file: the parameters are typed (no
JSON-encoded custom_config), and the old model and centers are ordinary (optional) input channels. The
work is `lce_tf.training.train` + `lce_tf.export.export_model`; the Model artifact holds the exported
model directory in Format-Serving/, the layout the stock Pusher and Evaluator read.

Modes: independent (new*), lce (direct, D_new = D_old), lce-instance (lce + a per-image InfoNCE term),
lce-transform (T12/T21, any dimensions), bct,
l2 (docs/design.md, the method, items 3-8). An empty old-model channel (first run) trains independently.
"""

from __future__ import annotations

from typing import Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from lce_tf import defaults, modes
from components.lce_trainer import executor
from components.lce_trainer.executor import (  # noqa: F401  (the keys and modes)
    ARCHITECTURE_KEY, BATCH_SIZE_KEY, CLASS_CENTERS_KEY, EFFECTIVE_MODE_PROPERTY, EMBEDDING_DIM_KEY, EPOCHS_KEY,
    EXAMPLES_KEY, INSTANCE_TEMPERATURE_KEY, LAMBDA_ALIGN_KEY, LAMBDA_BOUNDARY_KEY, LAMBDA_COMPAT_KEY,
    LAMBDA_INSTANCE_KEY, LEARNING_RATE_KEY, LOSS_KEY, MARGIN_KEY, MODE_KEY, MODEL_ID_PROPERTY, MODEL_KEY, MODES, OLD_MODEL_KEY,
    SCALE_KEY, SEED_KEY, SHIFT_PIXELS_KEY, SPLIT_KEY, VERSION_KEY)


class LceTrainerSpec(ComponentSpec):
    """Inputs: Examples, ClassCenters and the old Model (both optional); output: Model."""

    PARAMETERS = {
        MODE_KEY: ExecutionParameter(type=str),
        ARCHITECTURE_KEY: ExecutionParameter(type=str),
        EMBEDDING_DIM_KEY: ExecutionParameter(type=int),
        LOSS_KEY: ExecutionParameter(type=str),
        SCALE_KEY: ExecutionParameter(type=float),
        MARGIN_KEY: ExecutionParameter(type=float),
        LAMBDA_ALIGN_KEY: ExecutionParameter(type=float),
        LAMBDA_BOUNDARY_KEY: ExecutionParameter(type=float),
        LAMBDA_COMPAT_KEY: ExecutionParameter(type=float),
        LAMBDA_INSTANCE_KEY: ExecutionParameter(type=float, optional=True),
        INSTANCE_TEMPERATURE_KEY: ExecutionParameter(type=float, optional=True),
        EPOCHS_KEY: ExecutionParameter(type=int),
        BATCH_SIZE_KEY: ExecutionParameter(type=int),
        LEARNING_RATE_KEY: ExecutionParameter(type=float),
        SHIFT_PIXELS_KEY: ExecutionParameter(type=int),
        SEED_KEY: ExecutionParameter(type=int),
        VERSION_KEY: ExecutionParameter(type=str),
        SPLIT_KEY: ExecutionParameter(type=str),
    }
    INPUTS = {
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        CLASS_CENTERS_KEY: ChannelParameter(type=artifacts.ClassCenters, optional=True, allow_empty=True),
        OLD_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model, optional=True, allow_empty=True),
    }
    OUTPUTS = {MODEL_KEY: ChannelParameter(type=standard_artifacts.Model)}


class LceTrainer(base_component.BaseComponent):
    """Trains a (compatible) embedding model; outputs a standard Model (model directory in Format-Serving/).

    Outputs:
      model: Model with custom properties lce_model_id, version, compat_mode (the effective mode),
        architecture, embedding_dim and compatible_with (the old model id, "" when independent).
    """

    SPEC_CLASS = LceTrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, examples: channel.BaseChannel, class_centers: Optional[channel.BaseChannel] = None,
                 old_model: Optional[channel.BaseChannel] = None, *, mode: str = modes.LCE.name,
                 architecture: str = "cnn",
                 embedding_dim: int = defaults.EMBEDDING_DIM, loss: str = "arcface", scale: float = 16.0, margin: float = 0.1,
                 lambda_align: float = defaults.LAMBDA_ALIGN, lambda_boundary: float = defaults.LAMBDA_BOUNDARY, lambda_compat: float = 1.0,
                 lambda_instance: float = defaults.LAMBDA_INSTANCE,
                 instance_temperature: float = defaults.INSTANCE_TEMPERATURE,
                 epochs: int = 5, batch_size: int = 128, learning_rate: float = 1e-3, shift_pixels: int = 2,
                 seed: int = 0, version: str = "v1", split: str = "train"):
        """Args:
          examples: Examples with the training split.
          class_centers: the old model's ClassCenters (lce, lce-instance, lce-transform, bct).
          old_model: the old Model (all modes but independent; l2 and lce-instance embed with it).
          mode: one of MODES.
          architecture, embedding_dim, loss, scale, margin, lambda_align, lambda_boundary, lambda_compat,
            lambda_instance, instance_temperature, epochs, batch_size, learning_rate, shift_pixels, seed, version: lce_tf.training.TrainConfig.
          split: the training split.
        """
        if mode not in MODES:
            raise ValueError(f"mode: unknown compatibility mode {mode!r}; expected one of {', '.join(MODES)}")
        spec = LceTrainerSpec(**{
            EXAMPLES_KEY: examples, CLASS_CENTERS_KEY: class_centers, OLD_MODEL_KEY: old_model, MODE_KEY: mode,
            ARCHITECTURE_KEY: architecture, EMBEDDING_DIM_KEY: int(embedding_dim), LOSS_KEY: loss,
            SCALE_KEY: float(scale), MARGIN_KEY: float(margin), LAMBDA_ALIGN_KEY: float(lambda_align),
            LAMBDA_BOUNDARY_KEY: float(lambda_boundary), LAMBDA_COMPAT_KEY: float(lambda_compat),
            LAMBDA_INSTANCE_KEY: float(lambda_instance), INSTANCE_TEMPERATURE_KEY: float(instance_temperature),
            EPOCHS_KEY: int(epochs), BATCH_SIZE_KEY: int(batch_size), LEARNING_RATE_KEY: float(learning_rate),
            SHIFT_PIXELS_KEY: int(shift_pixels), SEED_KEY: int(seed), VERSION_KEY: version, SPLIT_KEY: split,
            MODEL_KEY: channel.Channel(type=standard_artifacts.Model)})
        super().__init__(spec=spec)
