"""Every training setting is declared once, in lce_tf.train_config.TrainConfig (docs/design.md, "How to add a
training setting"): these tests check that each field reaches every front end it is offered to (the
`lce-tf train` flags, the LceTrainer's parameters, PipelineConfig's fields) with its default, so a field
added later cannot be forgotten, and that the flag names and keys of before stay as they were."""

import argparse
import dataclasses

import pytest

from lce_tf import catalog, cli, defaults, modes, train_config
from lce_tf.train_config import TrainConfig

# The flags `lce-tf train` had before the settings were declared once (they must not change).
CLI_FLAGS = {
    "architecture": "--arch", "embedding_dim": "--dim", "loss": "--loss", "scale": "--scale", "margin": "--margin",
    "compat": "--compat", "lambda_align": "--lambda-align", "lambda_boundary": "--lambda-boundary",
    "lambda_compat": "--lambda-compat", "lambda_instance": "--lambda-instance",
    "instance_temperature": "--instance-temperature", "epochs": "--epochs", "batch_size": "--batch-size",
    "learning_rate": "--learning-rate", "shift_pixels": "--shift", "seed": "--seed", "version": "--version",
    "steps_per_execution": "--steps-per-execution", "precision": "--precision",
    "image_size": "--image-size", "init_weights": "--init-weights", "trainable_from": "--trainable-from",
}
# The LceTrainer's parameters / PipelineConfig's training keys of before.
PIPELINE_KEYS = {"mode", "architecture", "embedding_dim", "loss", "scale", "margin", "lambda_align", "lambda_boundary",
                 "lambda_compat", "lambda_instance", "instance_temperature", "epochs", "batch_size", "learning_rate",
                 "shift_pixels", "seed", "version", "image_size", "init_weights", "trainable_from"}


def _train_options() -> dict[str, argparse.Action]:
    # pylint: disable=protected-access
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[0]: a for a in sub.choices["train"]._actions if a.option_strings}


def test_every_field_declares_help_and_where_it_is_offered():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert set(f.metadata["offered"]) <= {train_config.CLI, train_config.PIPELINE}, f.name


def test_every_cli_field_is_a_flag_of_lce_tf_train_with_its_default():
    options = _train_options()
    offered = train_config.fields_offered(train_config.CLI)
    flags = {f.name: train_config.flag_of(f) for f in offered}
    assert CLI_FLAGS.items() <= flags.items()  # the flags of before, unchanged; a new setting adds its own
    for f in offered:
        action = options[train_config.flag_of(f)]
        assert action.dest == f.name
        assert action.default == f.metadata["cli"].get("default", f.default), f.name
        assert action.choices == f.metadata["choices"], f.name
    for f in dataclasses.fields(TrainConfig):  # the library-only settings have no flag
        if f not in offered:
            assert "--" + f.name.replace("_", "-") not in options, f.name
    # --arch takes keras:NAME too, so TrainConfig.validate checks it (one line listing the names), not argparse
    assert options["--arch"].choices is None and options["--loss"].choices == catalog.HEADS
    assert options["--compat"].choices == modes.MODE_NAMES and options["--dim"].default == defaults.EMBEDDING_DIM


def test_the_cli_flags_make_the_config():
    args = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--arch", "resnet", "--dim", "16",
                                          "--shift", "0", "--lambda-instance", "2.5", "--compat", "lce-instance"])
    config = train_config.from_cli_args(args, version="o")
    assert config == TrainConfig(architecture="resnet", embedding_dim=16, shift_pixels=0, lambda_instance=2.5,
                                 compat=modes.LCE_INSTANCE.name, version="o")  # the rest: TrainConfig's defaults
    args = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--arch", "keras:EfficientNetB0",
                                          "--image-size", "64", "48", "--init-weights", "w.h5",
                                          "--trainable-from", "block6a_expand_conv"])
    config = train_config.from_cli_args(args)
    assert (config.image_size, config.init_weights, config.trainable_from) == ("64x48", "w.h5", "block6a_expand_conv")
    assert config.input_shape((28, 28, 1)) == (64, 48, 1) and TrainConfig().input_shape((28, 28, 1)) == (28, 28, 1)
    assert TrainConfig(image_size="32x32x3").input_shape((28, 28, 1)) == (32, 32, 3)
    with pytest.raises(SystemExit):  # four numbers: argparse's error, exit 2
        cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--image-size", "1", "2", "3", "4"])


def test_every_pipeline_field_is_a_pipeline_config_field_with_its_default():
    from pipeline.config import PipelineConfig

    offered = train_config.fields_offered(train_config.PIPELINE)
    assert PIPELINE_KEYS <= {train_config.key_of(f) for f in offered}  # the keys of before, unchanged
    pipeline_defaults = PipelineConfig()
    for f in offered:
        key = train_config.key_of(f)
        expected = modes.LCE.name if key == "mode" else f.default  # the pipeline trains lce by default
        assert getattr(pipeline_defaults, key) == expected, key
    config = PipelineConfig().with_overrides(["lambda_instance=0.7", "architecture=resnet", "mode=bct"])
    assert config.training_settings() == TrainConfig(lambda_instance=0.7, architecture="resnet",
                                                     compat=modes.BCT.name)


def test_parameters_round_trip_and_missing_ones_keep_the_defaults():
    config = TrainConfig(architecture="small_cnn", embedding_dim=8, lambda_instance=1.5, seed=3, version="v9",
                         compat=modes.LCE.name)
    values = train_config.parameter_values(config)
    assert set(values) == {train_config.key_of(f) for f in train_config.fields_offered(train_config.PIPELINE)}
    assert PIPELINE_KEYS <= set(values)
    assert train_config.from_parameters(values) == config
    values.pop("lambda_instance")  # a pipeline compiled before the setting existed
    values["epochs"] = None
    expected = dataclasses.replace(config, lambda_instance=TrainConfig().lambda_instance)
    assert train_config.from_parameters(values) == expected


def test_validate_returns_the_mode_and_names_the_bad_setting():
    assert TrainConfig(compat=modes.LCE_TRANSFORM.name).validate() is modes.LCE_TRANSFORM
    assert TrainConfig(compat=modes.BCT.name).mode is modes.BCT
    with pytest.raises(ValueError, match=r"^Unknown architecture 'vgg'; expected one of small_cnn, cnn, resnet, "
                                         r"mobilenet, or keras:NAME with NAME one of MobileNetV2, .*ConvNeXtTiny\.$"):
        TrainConfig(architecture="vgg").validate()
    with pytest.raises(ValueError, match=r"^Unknown keras.applications family 'VGG16' \(keras:VGG16\); expected "
                                         r"keras:NAME with NAME one of .*EfficientNetB0, .*ConvNeXtTiny\.$"):
        TrainConfig(architecture="keras:VGG16").validate()
    with pytest.raises(ValueError, match=r"^Unknown compatibility mode 'magic'"):
        TrainConfig(compat="magic").validate()


def test_the_one_set_of_mode_checks_speaks_in_the_callers_names():
    from lce_tf.training import InputNames, check_inputs

    lce = TrainConfig(compat=modes.LCE.name)
    with pytest.raises(ValueError, match=r"^mode 'lce' needs the old model's class centers \(or the old model to "
                                         r"compute them\)$"):
        check_inputs(lce, old_centers=False, old_model=True, new_model=False, can_compute_centers=False)
    assert check_inputs(lce, old_centers=False, old_model=True, new_model=False, can_compute_centers=True) is modes.LCE
    names = InputNames(missing_old_model="--compat {mode} needs --old-model DIR.")
    with pytest.raises(ValueError, match=r"^--compat lce-instance needs --old-model DIR\.$"):
        check_inputs(TrainConfig(compat=modes.LCE_INSTANCE.name), old_centers=True, old_model=False, new_model=False,
                     can_compute_centers=True, names=names)
    with pytest.raises(ValueError, match=r"^mode 'cross-model' needs the frozen new model$"):
        check_inputs(TrainConfig(compat=modes.CROSS_MODEL.name), old_centers=True, old_model=False, new_model=True,
                     can_compute_centers=False)
    assert check_inputs(TrainConfig(), old_centers=False, old_model=False, new_model=False,
                        can_compute_centers=False) is modes.INDEPENDENT


def test_every_pipeline_field_is_an_lce_trainer_parameter():
    """Imports tfx (about 25 s)."""
    pytest.importorskip("tfx")
    from components.lce_trainer.component import LceTrainer, LceTrainerSpec

    types = train_config.field_types()
    expected = {train_config.key_of(f): types[f.name] for f in train_config.fields_offered(train_config.PIPELINE)}
    assert {k: p.type for k, p in LceTrainerSpec.PARAMETERS.items() if k not in ("split", "module_source")} == expected
    with pytest.raises(ValueError, match=r"^LceTrainer: unknown parameter\(s\) lambda_instanse; expected "):
        LceTrainer(examples=None, lambda_instanse=1.0)
