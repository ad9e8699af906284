"""Side information for the forward route (lce_tf.side_info, FCT): the InfoNCE loss, the label-free side
model, the side-information T12 and its artifact, which refuses old vectors without their side vectors."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from lce_tf import side_info as SI
from lce_tf import transform_fit as TF
from lce_tf import transformation as TR

from cli_helpers import run_cli, write_linear_transformation


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_info_nce_loss_by_hand():
    # B = 2, two orthogonal images, each view equal to its image; τ = 1. Row 0 (image 0, view 1) sees
    # row 1 (image 1, view 1) at cos 0, row 2 (its positive) at cos 1, row 3 at cos 0:
    # ℓ = −log(e / (e + 2)) = log(1 + 2/e) = 0.5514, the same for every row by symmetry.
    z = np.eye(2, dtype=np.float32)
    losses = SI.info_nce_loss(z, z, temperature=1.0).numpy()
    np.testing.assert_allclose(losses, [math.log(1 + 2 / math.e)] * 4, rtol=1e-5)
    # B = 1: the only other row is the positive, so the loss is −log 1 = 0.
    np.testing.assert_allclose(SI.info_nce_loss(z[:1], 3 * z[:1], 0.1).numpy(), [0.0, 0.0], atol=1e-6)


def test_append_side_normalizes_each_part_and_bytes_per_entry():
    joined = SI.append_side(np.array([[3.0, 4.0]]), np.array([[0.0, 2.0, 0.0]]))
    np.testing.assert_allclose(joined, [[0.6, 0.8, 0.0, 1.0, 0.0]], atol=1e-7)
    assert [SI.bytes_per_entry(16, d) for d in ("float32", "float16", "int8")] == [64, 32, 16]
    with pytest.raises(ValueError, match="same N"):
        SI.append_side(np.zeros((2, 3)), np.zeros((3, 2)))


def _tiny_glyphs(n=48, size=12, seed=0):
    """n images of 6 bar patterns (dark strokes on white), a few pixels of noise each."""
    rng = np.random.default_rng(seed)
    images = np.ones((n, size, size, 1), np.float32)
    for i in range(n):
        k = i % 6
        if k < 3:
            images[i, 2 + 3 * k:4 + 3 * k, 2:-2] = 0.0
        else:
            images[i, 2:-2, 2 + 3 * (k - 3):4 + 3 * (k - 3)] = 0.0
    return np.clip(images + 0.02 * rng.normal(size=images.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """A side model (D_s 8) trained for 6 epochs of 3 steps on 48 tiny images."""
    settings = SI.SideModelSettings(dim=8, projection_dim=16, epochs=6, batch_size=16, learning_rate=3e-3, seed=0)
    return SI.train_side_model(_tiny_glyphs(), settings)


def test_side_model_loss_decreases_and_export_round_trip_records_side_info(trained, tmp_path):
    images = _tiny_glyphs()
    assert len(trained.history) == 6 and trained.history[-1] < trained.history[0]
    psi = trained.embed(images[:5])
    assert psi.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(psi, axis=1), 1.0, atol=1e-5)

    out = str(tmp_path / "side")
    metadata = SI.export_side_model(trained, out, trained_on={"data": "tiny"})
    loaded = SI.load_side_model(out)
    record = loaded.metadata["training"][SI.SIDE_INFO_KEY]
    assert record["objective"] == SI.OBJECTIVE and record["labels_used"] is False
    assert record["settings"]["dim"] == 8 and loaded.embedding_dim == 8 and loaded.model_id == metadata["model_id"]
    np.testing.assert_allclose(loaded.embed(images[:5]), psi, atol=1e-5)
    assert SI.side_record(loaded.metadata) == {"model_id": metadata["model_id"],
                                               "embedding_space": metadata["embedding_space"], "dim": 8}

    path = os.path.join(out, "lce_tf_model.json")  # the same directory without the side record: refused
    plain = json.load(open(path, encoding="utf-8"))
    plain["training"] = {}
    json.dump(plain, open(path, "w", encoding="utf-8"))
    with pytest.raises(ValueError, match="is not a side-information model") as err:
        SI.load_side_model(out)
    assert "\n" not in str(err.value)


def test_fit_between_models_and_the_cli_with_a_side_model_record_it(trained, tmp_path, capsys):
    import tensorflow as tf

    from lce_tf.comparison import EvalData
    from lce_tf.serving import load_embedding_model

    # Three exports of one network are three models (three ids and spaces): old, new and the side model.
    dirs = {role: str(tmp_path / role) for role in ("old", "new", "side")}
    for role, path in dirs.items():
        SI.export_side_model(trained, path, version=role)
    images = _tiny_glyphs(n=40)
    labels = np.arange(40) % 4
    data = EvalData("tiny", ["a", "b", "c", "d"], 40,
                    lambda shape, batch: tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch))
    side = SI.load_side_model(dirs["side"])
    metadata = TF.fit_between_models(load_embedding_model(dirs["old"]), load_embedding_model(dirs["new"]), data,
                                     str(tmp_path / "t12"), TF.TransformFitSettings(epochs=1, width=4, batch_size=8),
                                     side_model=side)
    assert metadata["side_info"] == SI.side_record(side.metadata) and metadata["settings"]["side_dim"] == 8
    loaded = TR.load_transformation(str(tmp_path / "t12"))
    old, psi = load_embedding_model(dirs["old"]).embed(images[:3]), side.embed(images[:3])
    assert loaded.old_to_new(old, side=psi).shape == (3, 8)

    # The same through `lce-tf transform fit --side-model`, on an image folder.
    from PIL import Image

    for i, image in enumerate(images):
        os.makedirs(tmp_path / "train" / f"c{labels[i]}", exist_ok=True)
        Image.fromarray((image[..., 0] * 255).astype(np.uint8)).save(tmp_path / "train" / f"c{labels[i]}" / f"{i}.png")
    code, _, err = run_cli(capsys, "transform", "fit", "--old-model", dirs["old"], "--new-model", dirs["new"], "--data",
                           tmp_path / "train", "--out", tmp_path / "cli_t12", "--epochs", 1, "--width", 4,
                           "--batch-size", 8, "--side-model", dirs["side"])
    assert code == 0, err
    assert TR.load_transformation(str(tmp_path / "cli_t12")).side_info == SI.side_record(side.metadata)


def test_side_model_settings_are_validated():
    with pytest.raises(ValueError, match="dim: expected a positive integer"):
        SI.SideModelSettings(dim=0).validate()
    with pytest.raises(ValueError, match="architecture"):
        SI.SideModelSettings(architecture="vit").validate()
    with pytest.raises(ValueError, match="side_dim"):
        TF.TransformFitSettings(side_dim=-1).validate()
    with pytest.raises(ValueError, match="T12 only"):
        TF.TransformFitSettings(side_dim=4, direction="both").validate()


def _side_pairs(n, seed):
    """old, side: random unit 4-d; new = normalize([old; side]): half of new is invisible in old alone."""
    rng = np.random.default_rng(seed)
    old, side = _unit(rng.normal(size=(n, 4))), _unit(rng.normal(size=(n, 4)))
    return old, side, _unit(np.concatenate([old, side], axis=1))


def test_side_information_t12_fits_exports_and_is_refused_without_side_vectors(tmp_path):
    old, side, new = _side_pairs(1200, seed=0)
    settings = TF.TransformFitSettings(objective="cosine", width=16, epochs=4, batch_size=64, learning_rate=1e-2,
                                       seed=0, side_dim=4)
    with_side = TF.fit_transformation(TF.PairStore.from_arrays(str(tmp_path), SI.append_side(old[:1000], side[:1000]),
                                                               new[:1000], np.zeros(1000, np.int64)), settings)
    cos_side = float((with_side.apply(TR.OLD_TO_NEW, SI.append_side(old[1000:], side[1000:])) * new[1000:]).sum(1).mean())
    assert cos_side > 0.85  # from old alone the best is cos = 1/√2 ≈ 0.71: T12 reads the side vector

    source = {"embedding_space": "v1-space", "model_id": "v1", "version": "v1", "dim": 4}
    target = {"embedding_space": "v2-space", "model_id": "v2", "version": "v2", "dim": 8}
    side_model = {"model_id": "side-1", "embedding_space": "side-1", "dim": 4}
    with pytest.raises(ValueError, match="side_dim 4"):  # a side fit needs its side model's record
        TF.export_transformation(with_side, str(tmp_path / "t0"), source=source, target=target, fitted_on={})
    out = str(tmp_path / "t")
    metadata = TF.export_transformation(with_side, out, source=source, target=target, fitted_on={"data": "synthetic"},
                                        side=side_model)
    assert metadata["side_info"] == side_model and metadata["settings"]["side_dim"] == 4
    loaded = TR.load_transformation(out)
    assert loaded.side_info == side_model and "side information 4-d from side-1" in loaded.describe()
    moved = loaded.old_to_new(old[1000:], side=side[1000:])
    np.testing.assert_allclose(moved, with_side.apply(TR.OLD_TO_NEW, SI.append_side(old[1000:], side[1000:])),
                               atol=1e-5)
    with pytest.raises(TR.TransformationError, match="pass the stored side vectors") as err:
        loaded.old_to_new(old[1000:])
    assert "\n" not in str(err.value) and "side-1" in str(err.value)
    with pytest.raises(TR.TransformationError, match=r"side vectors \[N, 4\]"):
        loaded.old_to_new(old[1000:], side=side[1000:, :3])

    plain_dir = str(tmp_path / "plain")  # and a transformation without side information refuses side vectors
    write_linear_transformation(plain_dir, np.eye(4, 8), "v1-space", "v2-space", "v1-to-v2-plain")
    plain = TR.load_transformation(plain_dir)
    assert plain.side_info is None and "side_info" not in plain.metadata
    with pytest.raises(TR.TransformationError, match="fitted without side information"):
        plain.old_to_new(old[:3], side=side[:3])


def test_compatibility_transform_skip_reads_the_first_features_only():
    import tensorflow as tf

    from lce_tf.layers import CompatibilityTransform

    layer = CompatibilityTransform(4, bottleneck_dim=2, num_paths=1, skip_input_dim=4)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 6)), tf.float32)
    out = layer(x, training=False)
    assert layer.uses_identity_skip and out.shape == (3, 4)
    for kernel in layer.kernels:  # paths off: the output is the skip, x[:, :4]
        kernel.assign(tf.zeros_like(kernel))
    np.testing.assert_allclose(layer(x, training=False).numpy(), x.numpy()[:, :4], atol=1e-6)
    clone = CompatibilityTransform.from_config(layer.get_config())
    assert clone.skip_input_dim == 4
    with pytest.raises(ValueError, match="skip_input_dim <= the input dimension 6"):
        CompatibilityTransform(4, skip_input_dim=7)(x)
