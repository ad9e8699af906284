"""TrainConfig: every setting of a training run, declared once (docs/design.md, "How to add a training setting").

Each field carries its help text and where it is offered in its `dataclasses.field` metadata (`setting`),
and the three front ends are generated from the fields:

- `lce-tf train`'s flags (`add_cli_arguments`, `from_cli_args`): `--` + the name with dashes unless the
  field names its flag (`--dim` for embedding_dim, `--arch`, `--shift`, `--compat`);
- the LceTrainer component's parameters (`parameter_types`, `from_parameters`), keyed by the field name
  or its `key` (`mode` for compat);
- PipelineConfig's training fields (`pipeline_fields`), with the same keys.

A new setting is one `setting(...)` line here plus the code that uses it; tests/test_training.py checks
that every field reaches each front end it is declared for.

Pure Python: no TensorFlow import (the CLI's parser and the pipeline config read this module).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Mapping, Optional, Sequence

from lce_tf import catalog, defaults, modes

CLI = "cli"
"""Front end: a flag of `lce-tf train`."""
PIPELINE = "pipeline"
"""Front end: an LceTrainer parameter and a PipelineConfig field (the pipeline sets every trainer parameter)."""
EVERYWHERE = (CLI, PIPELINE)
LIBRARY_ONLY = ()


def setting(default: Any, help: str, *, flag: Optional[str] = None, key: Optional[str] = None,
            choices: Optional[Sequence[str]] = None, offered: Sequence[str] = EVERYWHERE,
            cli: Optional[Mapping[str, Any]] = None) -> Any:
    """A TrainConfig field with what the front ends need to offer it.

    Args:
      default: the default value (the one copy: CLI defaults, component and pipeline defaults read it).
      help: one line for `--help`, the component's docstring and PipelineConfig.
      flag: the CLI flag when it is not `--` + the field name with dashes (e.g. "--dim").
      key: the LceTrainer parameter and PipelineConfig field when not the field name (e.g. "mode").
      choices: the allowed values (a tuple of `lce_tf.catalog` or `lce_tf.modes`); the CLI offers them.
      offered: the front ends that offer it: `CLI`, `PIPELINE` (default both); () for library-only settings.
      cli: extra `argparse.add_argument` keywords of the CLI flag (e.g. {"default": None} when the CLI
        derives the value, as --version from --out).

    Returns:
      A `dataclasses.field`.
    """
    # pylint: disable=redefined-builtin
    metadata = {"help": help, "flag": flag, "key": key, "choices": choices, "offered": tuple(offered),
                "cli": dict(cli or {})}
    return dataclasses.field(default=default, metadata=metadata)


def parse_image_size(text: str) -> Optional[tuple[int, ...]]:
    """`image_size` as numbers: "" -> None, "S" -> (S, S), "HxW" -> (H, W), "HxWxC" -> (H, W, C).

    Raises:
      ValueError: anything else (one line naming the setting).
    """
    text = str(text or "").strip().lower()
    if not text:
        return None
    parts = text.split("x")
    if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"image_size: expected HxW or HxWxC of positive integers (e.g. 224x224 or 224x224x3); "
                         f"received {text!r}")
    size = tuple(int(p) for p in parts)
    return size * 2 if len(size) == 1 else size


class ImageSizeAction(argparse.Action):
    """`--image-size H W [C]` (or one number S for S x S) stored as TrainConfig's "HxW[xC]" text."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not 1 <= len(values) <= 3:
            parser.error(f"argument {option_string}: expected H W or H W C; received {' '.join(map(str, values))}")
        setattr(namespace, self.dest, "x".join(str(v) for v in values))


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (defaults are the demo's; docs/design.md, "How to add a training setting").

    Every field's help text is in its declaration below; see `setting` for how the CLI, the LceTrainer
    component and PipelineConfig are generated from them. Notes that do not fit in one line:

    - lambda_align, lambda_boundary, lambda_instance, instance_temperature: defaults chosen on held-out
      training classes (`lce_tf.defaults`; docs/design.md items 5 and 9).
    - steps_per_execution: Keras `compile(steps_per_execution=...)`; callbacks, the progress bar and the
      NaN check see every N-th step; the steps and the results are the same. `train` runs one step per
      call when the dataset's size is unknown (Keras needs it to run several) and no steps_per_epoch is given.
    - precision "mixed_bfloat16": the backbone's convolutions compute in bfloat16 (float32 variables, head
      and losses); faster only on CPUs with bfloat16 instructions (AVX512_BF16, AMX) through oneDNN, and not
      bit-identical to float32 (`lce_tf.backbones.build_backbone`). The trained model computes in float32
      afterwards (export, embedding).
    - jit_compile: off by default: on CPU, XLA's convolutions are several times slower than oneDNN's, and
      with op determinism on, models with max-pooling (small_cnn, cnn) fail (XLA has no deterministic
      max-pool gradient); benchmarks/results/train_speed.md.
    - sync_batch_norm: global-batch statistics under a multi-replica strategy (`lce_tf.backbones.build_backbone`).
    - architecture `keras:NAME`: a keras.applications family (`lce_tf.catalog.KERAS_FAMILIES`) with lce-tf's
      embedding head, its own preprocessing inside the model (images in [0, 1] as every lce-tf model) and
      BatchNormalization momentum 0.9 (`lce_tf.keras_backbones.build_keras_application`); init_weights and
      trainable_from apply to these only, precision and sync_batch_norm to the built-in backbones only.
    - image_size: "" keeps the data's shape; "HxW" the data's channels; a keras family takes 1 or 3 channels.
    - module_file: the backbone is the file's `build_backbone(input_shape, embedding_dim)` with its optional
      `preprocess(images)` inside the model (`lce_tf.module_file`); architecture stays at its default (another
      one is refused: both would name the backbone), and the built-in and keras-family settings (init_weights,
      trainable_from, precision, sync_batch_norm) do not apply. The exported metadata's architecture is
      "module_file" (`backbone_name`), with the file's name and sha256.
    """

    architecture: str = setting(
        "cnn", f"backbone: {', '.join(catalog.ARCHITECTURES)}, or {catalog.KERAS_PREFIX}NAME (a keras.applications "
        f"family: {', '.join(catalog.KERAS_FAMILIES)})", flag="--arch")
    embedding_dim: int = setting(defaults.EMBEDDING_DIM, "embedding size D", flag="--dim")
    image_size: str = setting(
        "", "the model's image size, HxW or HxWxC (the training images are resized to it); \"\" = the data's",
        cli={"default": None, "nargs": "+", "type": int, "metavar": "N", "action": ImageSizeAction,
             "help": "the model's image size: H W, or H W C (the training images are resized to it; default: the "
                     "data's)"})
    init_weights: str = setting(
        "", "keras: backbones: initial weights, 'imagenet' (downloaded by Keras) or a Keras model (.keras, .h5, "
        "SavedModel) or HDF5 weights file (.h5); \"\" = random", cli={"default": None, "metavar": "PATH"})
    trainable_from: str = setting(
        "", "keras: backbones: train the family's layers from this layer on, the earlier ones frozen; \"\" = all",
        cli={"default": None, "metavar": "LAYER"})
    module_file: str = setting(
        "", "your own backbone: a Python file defining build_backbone(input_shape, embedding_dim) -> tf.keras.Model "
        "and optionally preprocess(images) (lce_tf.module_file); replaces architecture; \"\" = none",
        cli={"default": None, "metavar": "PATH"})
    loss: str = setting("arcface", "classification head (docs/design.md item 2)", choices=catalog.HEADS)
    scale: float = setting(16.0, "margin-softmax scale s")
    margin: float = setting(0.1, "margin-softmax margin m")
    compat: str = setting(modes.INDEPENDENT.name, "compatibility mode (lce_tf.modes)", key="mode",
                          choices=modes.MODE_NAMES)
    lambda_align: float = setting(defaults.LAMBDA_ALIGN, "weight λ_a of the alignment loss (item 3)")
    lambda_boundary: float = setting(defaults.LAMBDA_BOUNDARY, "weight λ_b of the boundary loss (item 4)")
    lambda_compat: float = setting(1.0, "weight of the bct / l2 term")
    lambda_instance: float = setting(defaults.LAMBDA_INSTANCE, "lce-instance: weight of the per-image InfoNCE "
                                     "term (docs/design.md item 9)")
    instance_temperature: float = setting(defaults.INSTANCE_TEMPERATURE,
                                          "lce-instance: temperature of the InfoNCE term")
    init_from_old_centers: bool = setting(True, "direct LCE modes: the classifier rows start at the old centers",
                                          offered=LIBRARY_ONLY)
    epochs: int = setting(5, "training epochs")
    batch_size: int = setting(128, "training batch size")
    learning_rate: float = setting(1e-3, "Adam learning rate")
    shift_pixels: int = setting(2, "random-shift augmentation in pixels", flag="--shift")
    sync_batch_norm: bool = setting(False, "synchronized BatchNormalization (multi-replica strategies)",
                                    offered=LIBRARY_ONLY)
    seed: int = setting(0, "seeds Python, NumPy and TensorFlow, with op determinism on")
    version: str = setting("v1", "version label written into the model metadata",
                           cli={"default": None, "help": "version label (default: the --out folder name)"})
    steps_per_execution: int = setting(
        8, "train steps per call into the TensorFlow graph", offered=(CLI,),
        cli={"default": None, "help": "train steps per call into the TensorFlow graph (default: "
             "lce_tf.training.TrainConfig's; the progress and the NaN check see every N-th step)"})
    precision: str = setting(
        "float32", "compute precision of the backbone's convolutions", choices=catalog.PRECISIONS, offered=(CLI,),
        cli={"help": "mixed_bfloat16: convolutions in bfloat16, faster on CPUs with AVX512_BF16/AMX (not "
             "bit-identical to float32; the exported model computes in float32)"})
    jit_compile: bool = setting(False, "compile the train step with XLA", offered=LIBRARY_ONLY)

    @property
    def mode(self) -> modes.Mode:
        """The compatibility mode's declaration (`lce_tf.modes.Mode`): the one look-up of `compat`.

        Raises:
          ValueError: an unknown mode name (the message lists the known ones).
        """
        return modes.get(self.compat)

    def validate(self) -> modes.Mode:
        """Checks every setting; raises ValueError with one line naming the first bad one.

        Returns:
          The mode (`self.mode`), so a caller validates and looks the mode up in one step.
        """
        family = catalog.keras_family(self.architecture)  # raises on an unknown architecture, listing the known
        if self.module_file:
            self._validate_module_file()
        size = parse_image_size(self.image_size)
        if size is not None:
            catalog.check_input_shape(self.architecture, size)
        if family is None:
            for name in ("init_weights", "trainable_from"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to {catalog.KERAS_PREFIX}NAME backbones; {self.architecture!r} "
                                     "is a built-in one")
        elif self.precision != "float32" or self.sync_batch_norm:
            raise ValueError(f"{self.architecture}: precision {self.precision!r} and sync_batch_norm apply to the "
                             "built-in backbones only; use precision float32 without sync_batch_norm")
        if self.loss not in catalog.HEADS:
            raise ValueError(f"Unknown loss {self.loss!r}; expected one of {', '.join(catalog.HEADS)}.")
        mode = self.mode
        if self.precision not in catalog.PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}; expected one of {', '.join(catalog.PRECISIONS)}.")
        if (self.jit_compile and not self.module_file and catalog.has_max_pooling(self.architecture)
                and mode.trains_backbone):
            raise ValueError(f"jit_compile=True cannot train {self.architecture}: XLA has no deterministic max-pool "
                             "gradient and training runs with op determinism on; use jit_compile=False (on CPU it "
                             "is also the faster choice) or a backbone without max-pooling (resnet, mobilenet).")
        for name in ("embedding_dim", "epochs", "batch_size", "steps_per_execution"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected a positive {name}; received {getattr(self, name)}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"Expected a positive learning_rate; received {self.learning_rate}.")
        if not (self.instance_temperature > 0 and math.isfinite(self.instance_temperature)):
            raise ValueError(f"Expected a positive instance_temperature; received {self.instance_temperature}.")
        for name in ("lambda_align", "lambda_boundary", "lambda_compat", "lambda_instance"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"Expected a finite, non-negative {name}; received {getattr(self, name)}.")
        return mode

    @property
    def backbone_name(self) -> str:
        """The backbone as the exported metadata's `architecture` records it: `architecture`, or
        `lce_tf.catalog.MODULE_FILE_ARCHITECTURE` ("module_file") when `module_file` gives the backbone."""
        return catalog.MODULE_FILE_ARCHITECTURE if self.module_file else self.architecture

    def _validate_module_file(self) -> None:
        """The settings that cannot go with a module file's backbone, refused in one line."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == "architecture")
        if self.architecture != default:
            raise ValueError(f"module_file {self.module_file} and architecture {self.architecture!r} both name a "
                             "backbone; give one of them")
        for name in ("init_weights", "trainable_from"):
            if getattr(self, name):
                raise ValueError(f"{name} applies to {catalog.KERAS_PREFIX}NAME backbones, not to module_file "
                                 f"{self.module_file} (initialize or freeze layers in its build_backbone)")
        if self.precision != "float32" or self.sync_batch_norm:
            raise ValueError(f"precision {self.precision!r} and sync_batch_norm apply to the built-in backbones, not "
                             f"to module_file {self.module_file} (set them in its build_backbone)")
        if not self.mode.trains_backbone:
            raise ValueError(f"module_file {self.module_file} builds a backbone to train but mode {self.compat!r} "
                             "trains none (it uses the frozen new model)")

    def input_shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (H, W, C) the model takes: `image_size` when set (its channels, else the data's), else the data's
        own shape. The readers resize and convert the images to it (`lce_tf.datasets`, `lce_tf.tfrecords`).

        Args:
          data_shape: (H, W, C) of the training images (`lce_tf.data.infer_image_shape`).
        """
        size = parse_image_size(self.image_size)
        data_shape = tuple(int(v) for v in data_shape)
        if size is None:
            return data_shape
        return (size[0], size[1], size[2] if len(size) == 3 else data_shape[2])


# ---------------------------------------------------------------------------------------------------
# The front ends, generated from the fields


def fields_offered(front_end: str) -> list[dataclasses.Field]:
    """The TrainConfig fields a front end offers (`CLI` or `PIPELINE`), in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if front_end in f.metadata["offered"]]


def field_types() -> dict[str, type]:
    """Field name -> its Python type (str, int, float, bool)."""
    return typing.get_type_hints(TrainConfig)


def flag_of(field: dataclasses.Field) -> str:
    """The `lce-tf train` flag of a field: its `flag`, else `--` + the name with dashes."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def key_of(field: dataclasses.Field) -> str:
    """The LceTrainer parameter / PipelineConfig field of a field: its `key`, else its name."""
    return field.metadata["key"] or field.name


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds a flag to `parser` for every field offered on the CLI (dest = the field name).

    The default, type, choices and help come from the field; its `cli` metadata overrides them.
    """
    types = field_types()
    for f in fields_offered(CLI):
        kwargs: dict[str, Any] = {"dest": f.name, "type": types[f.name], "default": f.default,
                                  "help": f.metadata["help"]}
        if types[f.name] is bool:  # no boolean flag is offered yet; argparse's type=bool would take "False" as True
            raise TypeError(f"TrainConfig.{f.name}: boolean settings have no CLI flag form yet")
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["metavar"] = flag_of(f)[2:].upper().replace("-", "_")  # --dim DIM, --shift SHIFT
        if types[f.name] is str:
            del kwargs["type"]
        kwargs.update(f.metadata["cli"])
        parser.add_argument(flag_of(f), **kwargs)


def from_cli_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The TrainConfig of parsed `lce-tf train` flags (a flag left at None keeps the field's default);
    `overrides` (e.g. the version the CLI derives from --out) win. Not validated."""
    values = {f.name: getattr(args, f.name) for f in fields_offered(CLI) if getattr(args, f.name) is not None}
    return TrainConfig(**{**values, **overrides})


def parameter_types() -> dict[str, type]:
    """LceTrainer parameter key -> type, for every field the pipeline offers (the ComponentSpec's PARAMETERS)."""
    types = field_types()
    return {key_of(f): types[f.name] for f in fields_offered(PIPELINE)}


def parameter_defaults() -> dict[str, Any]:
    """LceTrainer parameter key -> TrainConfig's default."""
    return {key_of(f): f.default for f in fields_offered(PIPELINE)}


def parameter_values(config: TrainConfig) -> dict[str, Any]:
    """LceTrainer parameter key -> the value of `config` (the inverse of `from_parameters`)."""
    return {key_of(f): getattr(config, f.name) for f in fields_offered(PIPELINE)}


def from_parameters(values: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The TrainConfig of LceTrainer execution properties (or PipelineConfig values), keyed by `key_of`.

    A missing or None value keeps TrainConfig's default (a pipeline compiled before a setting existed has
    no value for it); values are converted to the field's type; `overrides` (field names) win. Not validated.
    """
    types = field_types()
    settings: dict[str, Any] = {}
    for f in fields_offered(PIPELINE):
        value = values.get(key_of(f))
        if value is not None:
            settings[f.name] = types[f.name](value)
    return TrainConfig(**{**settings, **overrides})


def declare_pipeline_fields(namespace: dict[str, Any], default_overrides: Optional[Mapping[str, Any]] = None) -> None:
    """Declares the training fields in a dataclass body being executed: PipelineConfig calls
    `declare_pipeline_fields(locals(), {...})` where its training fields go, so they keep their place in
    the class and their keys (`architecture`, `mode`, `lambda_instance`, ...) stay the config's keys.

    Args:
      namespace: the class body's namespace (`locals()` inside a class statement).
      default_overrides: key -> the pipeline's own default where it differs (PipelineConfig trains `mode`
        lce by default; TrainConfig is independent).

    Raises:
      ValueError: an override names no training setting, or a key is declared already.
    """
    types = field_types()
    overrides = dict(default_overrides or {})
    unknown = set(overrides) - {key_of(f) for f in fields_offered(PIPELINE)}
    if unknown:
        raise ValueError(f"declare_pipeline_fields: no training setting {', '.join(sorted(unknown))}")
    annotations = namespace.setdefault("__annotations__", {})
    for f in fields_offered(PIPELINE):
        key = key_of(f)
        if key in annotations:
            raise ValueError(f"declare_pipeline_fields: {key} is declared already")
        annotations[key] = types[f.name]
        namespace[key] = dataclasses.field(default=overrides.get(key, f.default), metadata={"help": f.metadata["help"]})
