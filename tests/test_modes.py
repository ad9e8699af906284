"""lce_tf.modes: every compatibility mode declared once; the declarations match what the code does."""

import numpy as np
import pytest

from lce_tf import modes


def test_every_mode_is_declared_once_with_a_constant():
    assert modes.MODE_NAMES == ("independent", "lce", "lce-instance", "lce-transform", "bct", "l2", "cross-model")
    assert list(modes.ALL) == [modes.INDEPENDENT, modes.LCE, modes.LCE_INSTANCE, modes.LCE_TRANSFORM, modes.BCT,
                               modes.L2, modes.CROSS_MODEL]
    assert all(modes.get(name).name == name for name in modes.MODE_NAMES)
    assert modes.get(modes.LCE) is modes.LCE


@pytest.mark.parametrize("name", ["LCE", "lce_transform", "", None])
def test_unknown_name_names_the_known_modes(name):
    with pytest.raises(ValueError, match=r"^Unknown compatibility mode .*; expected one of independent, lce, "
                                         r"lce-instance, lce-transform, bct, l2, cross-model\.$"):
        modes.get(name)


def test_what_each_mode_needs():
    needs = {m.name: (m.needs_old_centers, m.needs_old_embedder, m.needs_new_model) for m in modes.ALL}
    assert needs == {"independent": (False, False, False), "lce": (True, False, False),
                     "lce-instance": (True, True, False), "lce-transform": (True, False, False), "bct": (True, False, False),
                     "l2": (False, True, False), "cross-model": (True, False, True)}
    # Every mode but independent trains against an old model (the pipeline needs one; the metadata names it).
    assert [m.name for m in modes.ALL if not m.compatible_with_old] == ["independent"]
    assert [m.name for m in modes.ALL if m.direct] == ["lce", "lce-instance", "bct", "l2"]
    assert [m.name for m in modes.ALL if m.direct_lce] == ["lce", "lce-instance"]
    assert [m.name for m in modes.ALL if m.uses_transforms] == ["lce-transform", "cross-model"]
    assert [m.export_signature for m in modes.ALL] == ["embed", "embed", "embed", "embed_compat", "embed", "embed",
                                                       "embed_compat"]


def test_pipeline_modes_are_those_that_train_a_backbone():
    assert modes.PIPELINE_MODE_NAMES == ("independent", "lce", "lce-instance", "lce-transform", "bct", "l2")
    assert all(m.trains_backbone == m.in_pipeline for m in modes.ALL)


def test_cli_and_configs_read_the_declarations():
    from lce_tf import cli, training
    from pipeline import config

    choices = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions
                   if a.dest == "compat").choices
    assert tuple(choices) == modes.MODE_NAMES
    assert training.TrainConfig().compat == modes.INDEPENDENT.name
    assert config.MODES == modes.PIPELINE_MODE_NAMES


def _tiny_model(mode, dim=4, old_dim=4, classes=3):
    import tensorflow as tf

    from lce_tf.model import CompatibilityConfig, CompatibleEmbeddingModel

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, old_dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    backbone = tf.keras.Sequential([tf.keras.layers.Flatten(), tf.keras.layers.Dense(dim)])
    backbone.build((None, 2, 2, 1))
    spec = modes.get(mode)
    config = CompatibilityConfig(mode, old_centers=centers if spec.needs_old_centers else None,
                                 old_boundary_cos=np.zeros(classes, np.float32) if spec.needs_old_centers else None,
                                 new_centers=rng.normal(size=(classes, dim)).astype(np.float32)
                                 if spec.needs_new_model else None)
    old = (lambda images: tf.zeros((tf.shape(images)[0], dim))) if spec.needs_old_embedder else None
    return CompatibleEmbeddingModel(backbone, None if spec.needs_new_model else classes, config, old_embedder=old,
                                    embedding_dim=dim)


@pytest.mark.parametrize("mode", modes.MODE_NAMES)
def test_the_model_follows_the_declaration(mode):
    """The model logs the declared loss terms, has T12/T21 exactly in the transformation modes and a
    classifier exactly when it trains a backbone."""
    import tensorflow as tf

    spec = modes.get(mode)
    model = _tiny_model(mode, old_dim=4 if spec.direct else 3)
    assert model.loss_term_names == spec.loss_terms
    assert (model.t12 is not None) == (model.t21 is not None) == spec.uses_transforms
    assert (model.classifier is not None) == spec.trains_backbone
    if spec.trains_backbone:
        model.compile(loss=lambda labels, logits: tf.reduce_mean(logits) * 0.0)
    terms = model.compute_loss_terms(np.zeros((2, 2, 2, 1), np.float32), np.array([0, 1]), training=False)
    assert tuple(terms) == spec.loss_terms


def test_direct_modes_refuse_other_dimensions_and_l2_needs_the_old_model():
    with pytest.raises(ValueError, match="compares embeddings directly"):
        _tiny_model(modes.LCE.name, dim=4, old_dim=3)
    from lce_tf.model import CompatibleEmbeddingModel, CompatibilityConfig
    import tensorflow as tf

    backbone = tf.keras.Sequential([tf.keras.layers.Flatten(), tf.keras.layers.Dense(4)])
    backbone.build((None, 2, 2, 1))
    with pytest.raises(ValueError, match=r"Mode 'l2' needs the old model"):
        CompatibleEmbeddingModel(backbone, 3, CompatibilityConfig(modes.L2.name))


def test_compatibility_record_follows_the_declaration():
    from lce_tf.training import TrainConfig, compatibility_record

    for mode in modes.ALL:
        record = compatibility_record(TrainConfig(compat=mode.name), "v1-abc", 8)
        if not mode.compatible_with_old:
            assert record is None
        else:
            assert record == {"model_id": "v1-abc", "embedding_space": "v1-abc", "mode": mode.name,
                              "signature": mode.export_signature, "dim": 8}
