"""LceTrainer: trains the new embedding model with lce_tf and exports a standard Model artifact.

    trainer = LceTrainer(examples=example_gen.outputs["examples"], class_centers=centers.outputs["class_centers"],
                         old_model=resolver.outputs["model"], mode="lce", architecture="cnn", version="v2")
    pusher = Pusher(model=trainer.outputs[MODEL_KEY], ...)

A custom component rather than the stock Trainer with a module file: the parameters are typed (no
JSON-encoded custom_config), and the old model and centers are ordinary (optional) input channels. Your own
backbone still comes the Trainer's way: `module_file="my_model.py"` defines build_backbone (lce_tf.module_file),
and its text travels in the pipeline (the parameter `module_source`). The
work is `lce_tf.training_run.run_training` (train, then export); the Model artifact holds the exported
model directory in Format-Serving/, the layout the stock Pusher and Evaluator read.

Modes: independent (new*), lce (direct, D_new = D_old), lce-instance (lce + a per-image InfoNCE term),
lce-transform (T12/T21, any dimensions), bct,
l2 (docs/design.md, the method, items 3-8). An empty old-model channel (first run) trains independently.
"""

from __future__ import annotations

from typing import Any, Optional

from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import artifacts
from lce_tf import module_file, modes, train_config
from components.lce_trainer import executor
from components.lce_trainer.executor import (  # noqa: F401  (the keys and modes)
    CLASS_CENTERS_KEY, EFFECTIVE_MODE_PROPERTY, EMBEDDING_DIM_KEY, EXAMPLES_KEY, MODE_KEY, MODEL_ID_PROPERTY,
    MODEL_KEY, MODES, MODULE_FILE_KEY, MODULE_SOURCE_KEY, OLD_MODEL_KEY, SHIFT_PIXELS_KEY, SPLIT_KEY, VERSION_KEY)

DEFAULT_MODE = modes.LCE.name
"""The component's default mode (TrainConfig's default is independent)."""


class LceTrainerSpec(ComponentSpec):
    """Inputs: Examples, ClassCenters and the old Model (both optional); output: Model.

    The parameters are the training settings TrainConfig offers to the pipeline (`mode` and every
    `lce_tf.train_config.parameter_types()` key, each optional: a pipeline compiled before a setting existed
    has no value, and the executor then uses TrainConfig's default), plus `split` and `module_source` (the text
    of `module_file`, read when the pipeline is built).
    """

    PARAMETERS = {
        **{key: ExecutionParameter(type=kind, optional=True) for key, kind in train_config.parameter_types().items()},
        SPLIT_KEY: ExecutionParameter(type=str),
        MODULE_SOURCE_KEY: ExecutionParameter(type=str, optional=True),
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
                 old_model: Optional[channel.BaseChannel] = None, *, mode: str = DEFAULT_MODE, split: str = "train",
                 **settings: Any):
        """Args:
          examples: Examples with the training split.
          class_centers: the old model's ClassCenters (lce, lce-instance, lce-transform, bct).
          old_model: the old Model (all modes but independent; l2 and lce-instance embed with it).
          mode: one of MODES.
          split: the training split.
          **settings: the training settings by parameter key (`lce_tf.train_config.parameter_types()`:
            architecture, embedding_dim, loss, ..., seed, version); each defaults to TrainConfig's. A
            `module_file` (your own backbone, `lce_tf.module_file`) is read here, when the pipeline is built: its
            text goes into the pipeline as the parameter `module_source` (as TFX carries a Trainer's module file),
            and the executor trains from that text, so a run (e.g. on Kubeflow) needs no path of this machine.

        Raises:
          ValueError: an unknown mode, a setting that is not a parameter, or a module file that cannot be read.
        """
        if mode not in MODES:
            raise ValueError(f"mode: unknown compatibility mode {mode!r}; expected one of {', '.join(MODES)}")
        types = train_config.parameter_types()
        unknown = sorted(set(settings) - set(types))
        if unknown:
            raise ValueError(f"LceTrainer: unknown parameter(s) {', '.join(unknown)}; expected "
                             f"{', '.join(k for k in types if k != MODE_KEY)}")
        values = {**train_config.parameter_defaults(), **settings, MODE_KEY: mode}
        module_source = None
        if values.get(MODULE_FILE_KEY):
            module_source = module_file.read_source(str(values[MODULE_FILE_KEY]))
        spec = LceTrainerSpec(**{
            EXAMPLES_KEY: examples, CLASS_CENTERS_KEY: class_centers, OLD_MODEL_KEY: old_model,
            **{key: types[key](value) for key, value in values.items()}, SPLIT_KEY: split,
            MODULE_SOURCE_KEY: module_source, MODEL_KEY: channel.Channel(type=standard_artifacts.Model)})
        super().__init__(spec=spec)
