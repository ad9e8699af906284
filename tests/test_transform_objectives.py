"""Fit objectives of the forward route's T12 (lce_tf.transform_fit.TransformFitSettings.objective).

NumPy references for the classify and supcon objectives as the fit computes them (centers from the pairs,
labels remapped), the cosine objective pinned to the plain Keras cosine fit bit for bit, small synthetic
fits that must separate the classes, the metadata and the command line's bad input.
"""

import dataclasses
import json

import numpy as np
import pytest

from lce_tf import cli
from lce_tf import losses as L
from lce_tf import transform_fit as TF
from lce_tf import transform_losses as TL
from lce_tf import transformation as TR

from cli_helpers import assert_bad_input


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _class_pairs(n, seed, num_classes=6, old_dim=8, new_dim=10, noise=0.6):
    """Pairs of `num_classes` classes with labels 10, 13, 16, ... (not 0 … C − 1): old = normalize(class
    mean + noise), new = normalize(old @ A + noise) with a fixed random A (the same relation for every seed)."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(7)
    means, mix = fixed.normal(size=(num_classes, old_dim)), fixed.normal(size=(old_dim, new_dim))
    y = rng.integers(0, num_classes, n)
    old = _unit(means[y] + noise * rng.normal(size=(n, old_dim)))
    new = _unit(old @ mix + 0.3 * rng.normal(size=(n, new_dim)))
    return old.astype(np.float32), new.astype(np.float32), 10 + 3 * y


def _np_centers(new, labels):
    """NumPy reference of the new model's class centers, rows in sorted label order."""
    return np.stack([_unit(_unit(new[labels == c]).sum(0)) for c in np.unique(labels)])


def _np_cross_entropy(logits, target):
    shifted = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(target)), target]


def _np_supcon(targets, predictions, index, tau):
    logits = _unit(predictions) @ _unit(targets).T / tau
    positive = index[:, None] == index[None, :]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return lse - (logits * positive).sum(1) / positive.sum(1)


# ---------------------------------------------------------------------------------------------------
# The objectives' values against NumPy
# ---------------------------------------------------------------------------------------------------

def test_objective_loss_hand_worked():
    # targets [[1, 0]], predictions [[1, 0]], label 0, centers [[1, 0], [0, 1]], s = 1:
    # cosine 1 − 1 = 0; classify log(e^1 + e^0) − 1 = log(1 + e^−1) ≈ 0.31326
    value = TL.transform_objective_loss([[1.0, 0.0]], [[1.0, 0.0]], [0], [[1.0, 0.0], [0.0, 1.0]],
                                        classify_weight=1.0, scale=1.0).numpy()
    np.testing.assert_allclose(value, [np.log(1 + np.exp(-1))], rtol=1e-6)
    # weight 0.5 on classify, cosine of [[3, 4]] against [[1, 0]]: 1 − 3/5 = 0.4, plus half of the CE
    value = TL.transform_objective_loss([[1.0, 0.0]], [[3.0, 4.0]], [1], [[1.0, 0.0], [0.0, 1.0]],
                                        classify_weight=0.5, scale=1.0).numpy()
    np.testing.assert_allclose(value, [0.4 + 0.5 * (np.log(np.exp(0.6) + np.exp(0.8)) - 0.8)], rtol=1e-6)


@pytest.mark.parametrize("objective", ["classify", "cosine+classify", "cosine+supcon", "supcon"])
def test_fit_objective_equals_the_numpy_reference_on_a_fixed_batch(tmp_path, objective):
    """The Keras loss the fit compiles for T12 (centers from the pairs, labels as the dataset packs
    them) equals the formula computed by hand in NumPy on one fixed batch of 12 pairs."""
    old, new, labels = _class_pairs(40, seed=1)
    store = TF.PairStore.from_arrays(str(tmp_path), old, new, labels)
    settings = TF.TransformFitSettings(objective=objective, classify_weight=0.3, supcon_weight=0.7,
                                       scale=16.0, temperature=0.1)
    loss, metrics = TF._objective(store, settings)
    (inputs, targets), = store.dataset(12, seed=0, signatures=(TR.OLD_TO_NEW,), labels=True).take(1)
    y_true = targets[TR.OLD_TO_NEW].numpy()
    rng = np.random.default_rng(5)
    predictions = rng.normal(size=(12, 10)).astype(np.float32)  # stands in for T12's outputs

    # NumPy: the batch's new embeddings and labels come back from the packed target
    t, index = y_true[:, :-1], y_true[:, -1].astype(int)
    classes = np.unique(labels)
    assert {tuple(row) for row in t} <= {tuple(row) for row in new}
    np.testing.assert_array_equal(classes[index], [labels[np.flatnonzero((new == row).all(1))[0]] for row in t])
    p = _unit(predictions)
    cosine = 1 - (p * _unit(t)).sum(1)
    classify = _np_cross_entropy(16.0 * p @ _np_centers(new, labels).T, index)
    supcon = _np_supcon(t, predictions, index, 0.1)
    expected = {"classify": 0.3 * classify, "cosine+classify": cosine + 0.3 * classify,
                "cosine+supcon": cosine + 0.7 * supcon, "supcon": 0.7 * supcon}[objective]
    np.testing.assert_allclose(loss(y_true, predictions).numpy(), expected.mean(), rtol=1e-5)
    # the unweighted terms the fit logs
    logged = {m.name: m for m in metrics}
    logged["cosine_distance"].update_state(y_true, predictions)
    np.testing.assert_allclose(logged["cosine_distance"].result().numpy(), cosine.mean(), rtol=1e-5)
    term = "classify" if "classify" in objective else "supcon"
    logged[TF.TERM_METRICS[term]].update_state(y_true, predictions)
    np.testing.assert_allclose(logged[TF.TERM_METRICS[term]].result().numpy(),
                               {"classify": classify, "supcon": supcon}[term].mean(), rtol=1e-5)


def test_pair_store_centers_are_the_exact_centers_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(TF.PairStore, "BLOCK_ROWS", 7)
    old, new, labels = _class_pairs(50, seed=2)
    store = TF.PairStore.from_arrays(str(tmp_path), old, new, labels)
    np.testing.assert_array_equal(store.class_ids, np.unique(labels))
    index = np.searchsorted(np.unique(labels), labels)
    np.testing.assert_array_equal(store.new_class_centers(), TL.transform_class_centers(new, index, 6))
    np.testing.assert_allclose(store.new_class_centers(), _np_centers(new, labels), atol=1e-6)


def test_labels_do_not_change_the_order_of_the_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(TF.PairStore, "BLOCK_ROWS", 16)
    old, new, labels = _class_pairs(50, seed=3)
    store = TF.PairStore.from_arrays(str(tmp_path), old, new, labels)
    plain = list(store.dataset(8, 0, (TR.OLD_TO_NEW,)).take(10))
    labelled = list(store.dataset(8, 0, (TR.OLD_TO_NEW,), labels=True).take(10))
    for (x, y), (x2, y2) in zip(plain, labelled):
        np.testing.assert_array_equal(x["old"], x2["old"])
        np.testing.assert_array_equal(y[TR.OLD_TO_NEW], y2[TR.OLD_TO_NEW][:, :-1])


# ---------------------------------------------------------------------------------------------------
# The fits
# ---------------------------------------------------------------------------------------------------

def _plain_cosine_fit(store, settings):
    """The cosine fit as lce-tf did it before the objectives existed: Keras fit, cosine loss per direction,
    a dataset without labels."""
    import tensorflow as tf

    from lce_tf.training import seed_everything

    seed_everything(settings.seed)
    model = TF.build_transform_model(store.old_dim, store.new_dim, settings)
    model.compile(optimizer=tf.keras.optimizers.Adam(settings.learning_rate),
                  loss={s: TL.CosineDistanceLoss() for s in settings.signatures},
                  steps_per_execution=TF.STEPS_PER_EXECUTION)
    model.optimizer.build(model.trainable_variables)
    model.fit(store.dataset(settings.batch_size, settings.seed, settings.signatures), epochs=settings.epochs,
              steps_per_epoch=store.steps_per_epoch(settings.batch_size), verbose=0)
    return model.get_weights()


@pytest.mark.parametrize("direction", ["old-to-new", "both"])
def test_cosine_objective_is_the_plain_cosine_fit_bit_for_bit(tmp_path, direction):
    old, new, labels = _class_pairs(200, seed=4)
    store = TF.PairStore.from_arrays(str(tmp_path), old, new, labels)
    settings = dataclasses.replace(TF.TransformFitSettings(direction=direction, width=8, epochs=2, batch_size=64),
                                   objective="cosine", classify_weight=0.1)  # a weight of an absent term: no effect
    fitted = TF.fit_transformation(store, settings)
    for got, want in zip(fitted.model.get_weights(), _plain_cosine_fit(store, settings), strict=True):
        np.testing.assert_array_equal(got, want)
    assert set(fitted.history) == ({"loss"} if direction == "old-to-new" else
                                   {"loss", "old_to_new_loss", "new_to_old_loss"})


def _separation(fitted, old, new, labels):
    """Nearest-center accuracy and margin of normalize(T12(old)) against the new model's class centers."""
    out = fitted.apply(TR.OLD_TO_NEW, old)
    cos = out @ _np_centers(new, labels).T
    index = np.searchsorted(np.unique(labels), labels)
    own = cos[np.arange(len(index)), index]
    others = (cos.sum(1) - own) / (cos.shape[1] - 1)
    return float((cos.argmax(1) == index).mean()), float((own - others).mean())


@pytest.mark.parametrize("objective", ["classify", "supcon", "cosine+classify", "cosine+supcon"])
def test_label_objectives_fit_and_separate_the_classes(tmp_path, objective):
    from lce_tf.training import seed_everything

    old, new, labels = _class_pairs(1200, seed=5)
    held = slice(1000, None)
    store = TF.PairStore.from_arrays(str(tmp_path), old[:1000], new[:1000], labels[:1000])
    settings = TF.TransformFitSettings(direction="both", width=16, epochs=4, batch_size=64, objective=objective,
                                       classify_weight=0.5, supcon_weight=0.5)
    seed_everything(settings.seed)
    unfitted = TF.FittedTransformation(TF.build_transform_model(8, 10, settings), settings, {}, 0, 0)
    fitted = TF.fit_transformation(store, settings)
    assert all(np.isfinite(v).all() for v in fitted.history.values())
    assert set(fitted.fit_loss) == {TR.OLD_TO_NEW, TR.NEW_TO_OLD}
    assert np.isfinite(list(fitted.fit_loss.values())).all()
    term = TF.TERM_METRICS["classify" if "classify" in objective else "supcon"]
    assert fitted.history[f"old_to_new_{term}"][-1] < fitted.history[f"old_to_new_{term}"][0]
    before_acc, before_margin = _separation(unfitted, old[held], new[held], labels[held])
    after_acc, after_margin = _separation(fitted, old[held], new[held], labels[held])
    assert after_acc > before_acc + 0.2 and after_acc > 0.8, (before_acc, after_acc)
    assert after_margin > before_margin + 0.1, (before_margin, after_margin)


# ---------------------------------------------------------------------------------------------------
# Settings, metadata, command line
# ---------------------------------------------------------------------------------------------------

def test_objective_settings_are_validated():
    with pytest.raises(ValueError, match="^objective: expected one of cosine, cosine\\+classify, .*; received 'ce'"):
        TF.TransformFitSettings(objective="ce").validate()
    for bad, field in ((dict(classify_weight=0.0), "classify_weight"), (dict(supcon_weight=-1.0), "supcon_weight"),
                       (dict(scale=float("inf")), "scale"), (dict(temperature=0), "temperature")):
        with pytest.raises(ValueError, match=f"^{field}: expected a positive number"):
            TF.TransformFitSettings(**bad).validate()
    assert TF.TransformFitSettings(objective="cosine+classify", classify_weight=0.1).terms == {"cosine": 1.0,
                                                                                                "classify": 0.1}
    assert TF.TransformFitSettings(objective="supcon", supcon_weight=2).terms == {"supcon": 2.0}
    assert TF.TransformFitSettings().objective in TF.OBJECTIVES
    with pytest.raises(ValueError, match="classify_weight 1.0 needs new_centers"):
        TL.TransformObjectiveLoss(None, classify_weight=1.0)
    with pytest.raises(ValueError, match="expected a weight > 0"):
        TL.transform_objective_loss([[1.0]], [[1.0]], [0], cosine_weight=0.0)


def test_objective_loss_config_round_trip():
    loss = TL.TransformObjectiveLoss([[1.0, 0.0], [0.0, 1.0]], cosine_weight=0.0, classify_weight=0.5,
                                     supcon_weight=2.0, scale=8.0, temperature=0.2)
    again = TL.TransformObjectiveLoss.from_config(loss.get_config())
    y_true = L.pack_embeddings_and_labels([[1.0, 0.0], [0.6, 0.8]], [0, 1])
    np.testing.assert_allclose(again(y_true, [[0.0, 1.0], [1.0, 1.0]]).numpy(),
                               loss(y_true, [[0.0, 1.0], [1.0, 1.0]]).numpy(), rtol=1e-6)


def test_metadata_records_the_objective_and_old_files_still_load(tmp_path):
    from lce_tf import fileio

    old, new, labels = _class_pairs(200, seed=6)
    store = TF.PairStore.from_arrays(str(tmp_path), old, new, labels)
    fitted = TF.fit_transformation(store, TF.TransformFitSettings(width=8, epochs=1, batch_size=64,
                                                                  objective="cosine+supcon", supcon_weight=0.25))
    space = {"embedding_space": "s1", "model_id": "s1", "version": "v1", "dim": 8}
    metadata = TF.export_transformation(fitted, str(tmp_path / "t"), source=space,
                                        target={**space, "embedding_space": "s2", "model_id": "s2", "dim": 10},
                                        fitted_on={"data": "pairs"})
    settings = json.loads((tmp_path / "t" / TR.METADATA_FILE).read_text())["settings"]
    assert settings == metadata["settings"]
    assert (settings["objective"], settings["supcon_weight"], settings["classify_weight"]) == (
        "cosine+supcon", 0.25, TF.TransformFitSettings().classify_weight)
    assert metadata["fit_loss"][TR.OLD_TO_NEW] == fitted.history["cosine_distance"][-1]
    # a file written before the objectives existed (no objective in its settings) still loads and applies
    path = tmp_path / "t" / TR.METADATA_FILE
    old_meta = json.loads(path.read_text())
    for key in ("objective", "classify_weight", "supcon_weight", "scale", "temperature"):
        del old_meta["settings"][key]
    old_meta.pop("checksum")
    old_meta["checksum"] = fileio.json_checksum(old_meta)
    path.write_text(json.dumps(old_meta))
    loaded = TR.load_transformation(str(tmp_path / "t"))
    np.testing.assert_allclose(loaded.old_to_new(old[:5]), fitted.apply(TR.OLD_TO_NEW, old[:5]), atol=1e-6)


def test_cli_objective_bad_input(capsys, tmp_path):
    base = ["transform", "fit", "--old-model", str(tmp_path / "a"), "--new-model", str(tmp_path / "b"), "--data",
            str(tmp_path / "d"), "--out", str(tmp_path / "t")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--objective", "fastfill"])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'fastfill'" in err[0] and "cosine+classify" in err[0]
    assert_bad_input(capsys, *base, "--objective", "cosine+classify", "--classify-weight", "-1",
                     match="classify_weight: expected a positive number; received -1.0")
    assert not (tmp_path / "t").exists()
    parser = cli.build_parser()
    args = parser.parse_args(base)
    assert (args.objective, args.classify_weight, args.supcon_weight) == (
        TF.TransformFitSettings().objective, TF.TransformFitSettings().classify_weight,
        TF.TransformFitSettings().supcon_weight)
