"""Unit tests of the TFX components' parts: the Beam center combiners, executors' checks (the blessing rule,
lce_tf.gate, is tested in tests/test_gate.py).

The Beam test (e2e) runs the combiners on the DirectRunner's FnApiRunner engine in multi-processing mode
with 2 worker processes (as the local runner does) and compares with lce_tf.centers' in-memory
reference to 1e-6.
"""

import os
import types

import numpy as np
import pytest

from components import util
from components.image_example_gen.component import folder_fingerprint
from components.index_builder.executor import build_index_dir, entry_ids, upgrade_served_index
from lce_tf import centers as lce_centers

MULTI_PROCESSING = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _close_to(reference, atol=1e-6):
    """A Beam matcher: the one ClassCenters equals `reference` within atol (counts and names exactly)."""

    def check(actual):
        assert len(actual) == 1, f"expected one ClassCenters, got {len(actual)}"
        got = actual[0]
        assert got.class_names == reference.class_names and got.boundary_rule == reference.boundary_rule
        assert got.source_model_id == reference.source_model_id
        np.testing.assert_array_equal(got.counts, reference.counts)
        np.testing.assert_allclose(got.centers, reference.centers, rtol=0, atol=atol)
        np.testing.assert_allclose(got.boundary_cos, reference.boundary_cos, rtol=0, atol=atol)

    return check


@pytest.mark.e2e  # a Beam pipeline on worker processes
def test_beam_center_combiners_match_in_memory_reference_multiprocessing():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that

    from lce_tf.beam.centers import ComputeClassCenters

    rng = np.random.default_rng(7)
    names = [f"c{j}" for j in range(5)]
    labels = rng.permutation(np.repeat(np.arange(5), [3, 9, 1, 14, 6]))  # uneven classes, one singleton
    embeddings = rng.normal(size=(labels.size, 6)) * rng.uniform(0.5, 3.0, size=(labels.size, 1))
    embeddings[labels == 2] += 4.0  # the singleton class: its boundary is its only cosine, 1
    references = {rule: lce_centers.compute_class_centers(embeddings, labels, names, boundary=rule,
                                                          source_model_id="old-1")
                  for rule in ("min", "percentile:20")}
    keyed = [(int(label), embedding) for label, embedding in zip(labels, embeddings)]
    with beam.Pipeline(options=PipelineOptions(MULTI_PROCESSING)) as pipeline:
        pairs = pipeline | "Create" >> beam.Create(keyed, reshuffle=True)
        for rule, reference in references.items():
            result = pairs | f"Centers {rule}" >> ComputeClassCenters(names, rule, "old-1")
            assert_that(result, _close_to(reference), label=f"Check {rule}")
    # The reference itself, worked by hand for the singleton class: c = f̂, b = <f̂, f̂> = 1.
    assert references["min"].boundary_cos[2] == pytest.approx(1.0, abs=1e-6)


def test_beam_matcher_can_fail():
    reference = lce_centers.compute_class_centers(np.eye(2), np.array([0, 1]), ["a", "b"])
    shifted = lce_centers.ClassCenters(reference.centers[::-1].copy(), reference.boundary_cos, reference.counts,
                                       reference.class_names, reference.source_model_id, reference.boundary_rule)
    with pytest.raises(AssertionError):
        _close_to(reference)([shifted])


def test_combine_fns_follow_the_beam_contract():
    from lce_tf.beam.centers import BoundaryCombineFn, CenterSumCombineFn

    fn = CenterSumCombineFn()
    a = fn.add_input(fn.create_accumulator(), np.array([3.0, 4.0]))  # f̂ = (0.6, 0.8)
    b = fn.add_input(fn.create_accumulator(), np.array([0.0, 2.0]))  # f̂ = (0, 1)
    merged = fn.merge_accumulators([a, b])
    np.testing.assert_allclose(merged.sum, [0.6, 1.8])  # Σ f̂
    np.testing.assert_allclose(b.sum, [0.0, 1.0])       # only the first accumulator is modified
    boundary = BoundaryCombineFn("min")
    acc = boundary.merge_accumulators([boundary.add_input(boundary.create_accumulator(), c) for c in (0.9, 0.2, 0.5)])
    assert boundary.extract_output(acc).boundary() == 0.2
    with pytest.raises(ValueError, match="boundary rule"):
        BoundaryCombineFn("max")


def test_entry_ids_follow_the_search_convention():
    assert entry_ids(["a/x.png", "b/y.png"], ["a", "b"], np.array([0, 1]), "gallery") == ["a/x.png", "b/y.png"]
    assert entry_ids(None, ["a", "b"], np.array([1, 0]), "gallery") == ["b/gallery-0000000", "a/gallery-0000001"]


@pytest.mark.parametrize("backend, algorithm", [("scann", "brute_force"), ("milvus", "IVF_FLAT")])
def test_index_builder_writes_either_backend(tmp_path, backend, algorithm):
    """The IndexBuilder's build step (what its executor runs after embedding the gallery split)."""
    from lce_tf.index.registry import open_index

    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(30, 8)).astype(np.float32)
    ids = [f"c{i % 3}/gallery-{i:07d}" for i in range(30)]
    built = build_index_dir(str(tmp_path / "index"), ids, embeddings, "v1-abc", "space-v1", backend=backend,
                            num_neighbors=50)
    assert (built["backend"], built["count"], built["dim"], built["algorithm"]) == (backend, 30, 8, algorithm)
    with open_index(built["index_dir"]) as index:
        assert (index.backend, index.embedding_space, index.model_id, len(index)) == (backend, "space-v1", "v1-abc", 30)
        assert index.config.num_neighbors == 30  # capped at the gallery size
        assert list(index.search(embeddings[:2], 1)[0][:, 0]) == ids[:2]
    if backend == "milvus":
        assert built["milvus_uri"] == "milvus-lite" and built["collection"] == index.collection
        assert os.path.isfile(tmp_path / "index" / "milvus.db")


@pytest.fixture(scope="module")
def fitted_t12(tmp_path_factory):
    """A transformation 8-d space-v1 -> 12-d space-v2 fitted (1 epoch) on random pairs, exported."""
    from lce_tf import transform_fit

    root = tmp_path_factory.mktemp("t12")
    rng = np.random.default_rng(4)
    old = rng.normal(size=(512, 8)).astype(np.float32)
    new = np.concatenate([old, old[:, :4]], axis=1) + 0.01 * rng.normal(size=(512, 12)).astype(np.float32)
    os.makedirs(root / "pairs")
    store = transform_fit.PairStore.from_arrays(str(root / "pairs"), old, new, np.zeros(512, np.int64))
    fitted = transform_fit.fit_transformation(store, transform_fit.TransformFitSettings(epochs=1, width=8))
    transform_fit.export_transformation(
        fitted, str(root / "t12"), source={"embedding_space": "space-v1", "model_id": "v1-abc", "version": "v1",
                                           "dim": 8},
        target={"embedding_space": "space-v2", "model_id": "v2-def", "version": "v2", "dim": 12},
        fitted_on={"data": "random pairs"})
    from lce_tf.transformation import load_transformation

    return load_transformation(str(root / "t12"))


@pytest.mark.parametrize("backend", ["scann", "milvus"])
def test_index_builder_forward_step_upgrades_the_served_index(tmp_path, fitted_t12, backend):
    """On a forward blessing the served index (a RetrievalIndex artifact) is moved through T12 into the new
    artifact, in the same backend; a served index of the other backend is not used (the executor then
    embeds the gallery split and says why)."""
    from lce_tf.index.registry import open_index

    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(40, 8)).astype(np.float32)
    ids = [f"c{i % 4}/gallery-{i:07d}" for i in range(40)]
    base = types.SimpleNamespace(uri=str(tmp_path / "base"), get_int_custom_property=lambda key: 1)
    build_index_dir(str(tmp_path / "base" / "index"), ids, embeddings, "v1-abc", "space-v1", backend=backend)
    built, built_from = upgrade_served_index(base, fitted_t12, str(tmp_path / "new" / "index"), backend=backend)
    assert built_from == f"upgraded from {base.uri} by {fitted_t12.transform_id} (no image read)"
    assert (built["backend"], built["embedding_space"], built["dim"], built["count"]) == (backend, "space-v2", 12, 40)
    with open_index(str(tmp_path / "base" / "index")) as old, open_index(built["index_dir"]) as new:
        assert new.backend == backend and sorted(new.ids) == sorted(old.ids)
        moved = {i: e for b in new.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        before = {i: e for b in old.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        keys = sorted(before)
        np.testing.assert_allclose(np.stack([moved[i] for i in keys]),
                                   fitted_t12.old_to_new(np.stack([before[i] for i in keys])), atol=1e-5)
        assert new.provenance_counts() == {f"transformed from space-v1 by {fitted_t12.transform_id}": 40}
    other = "milvus" if backend == "scann" else "scann"
    built, why_not = upgrade_served_index(base, fitted_t12, str(tmp_path / "other" / "index"), backend=other)
    assert built is None and why_not.endswith(f"is a {backend} index and backend is {other!r}")
    assert not (tmp_path / "other").exists()


def test_index_builder_forward_step_composes_on_an_already_upgraded_index(tmp_path, fitted_t12):
    """A third generation: the served index holds entries transformed from space-v1; the pipeline fitted
    only T23 (from the previous model), so the IndexBuilder moves their stored space-v2 vectors through it
    (the composed route) instead of refusing for want of a T from space-v1."""
    from cli_helpers import write_linear_transformation
    from lce_tf.index.registry import open_index
    from lce_tf.transformation import load_transformation

    rng = np.random.default_rng(6)
    ids = [f"c{i % 4}/gallery-{i:07d}" for i in range(30)]
    build_index_dir(str(tmp_path / "v1" / "index"), ids, rng.normal(size=(30, 8)).astype(np.float32), "v1-abc",
                    "space-v1", backend="scann")
    v1 = types.SimpleNamespace(uri=str(tmp_path / "v1"), get_int_custom_property=lambda key: 1)
    built, _ = upgrade_served_index(v1, fitted_t12, str(tmp_path / "v2" / "index"), backend="scann")
    matrix = rng.normal(size=(12, 12))
    write_linear_transformation(tmp_path / "t23", matrix, "space-v2", "space-v3", "t23")
    t23 = load_transformation(str(tmp_path / "t23"))
    v2 = types.SimpleNamespace(uri=str(tmp_path / "v2"), get_int_custom_property=lambda key: 1)
    built, built_from = upgrade_served_index(v2, t23, str(tmp_path / "v3" / "index"), backend="scann")
    assert built_from.startswith(f"upgraded from {v2.uri} by t23")
    with open_index(str(tmp_path / "v2" / "index")) as stored, open_index(built["index_dir"]) as new:
        before = {i: e for b in stored.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        moved = {i: e for b in new.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        expected = np.stack([before[i] for i in ids]) @ matrix
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack([moved[i] for i in ids]), expected, atol=1e-5)
        assert new.embedding_space == "space-v3"


def test_folder_fingerprint_changes_with_the_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    first = folder_fingerprint(str(tmp_path), "")
    assert folder_fingerprint(str(tmp_path), "") == first
    (tmp_path / "a" / ".hidden").write_bytes(b"ignored")
    assert folder_fingerprint(str(tmp_path), "") == first
    (tmp_path / "a" / "1.png").write_bytes(b"xy")
    assert folder_fingerprint(str(tmp_path), "") != first
    assert folder_fingerprint("gs://bucket/x") != folder_fingerprint("gs://bucket/y")  # names only


def test_util_model_dir_and_bool(tmp_path):
    (tmp_path / "Format-Serving").mkdir()
    with pytest.raises(ValueError, match=r"^old_model .*: not an lce_tf model directory"):
        util.model_dir(str(tmp_path), "old_model")
    (tmp_path / "lce_tf_model.json").write_text("{}")
    assert util.model_dir(str(tmp_path)) == str(tmp_path)  # an imported model directory
    (tmp_path / "Format-Serving" / "lce_tf_model.json").write_text("{}")
    assert util.model_dir(str(tmp_path)) == os.path.join(str(tmp_path), "Format-Serving")  # a trained Model
    assert util.as_bool("true", "x") is True and util.as_bool(0, "x") is False
    assert util.is_local(str(tmp_path)) and util.is_local("relative/dir") and util.is_local("/gcs-like/a:b")
    assert not util.is_local("ram://serving") and not util.is_local("s3://bucket/serving")
    assert util.is_local("gs://bucket/serving") == os.path.isdir("/gcs")  # mapped onto the FUSE mount
    with pytest.raises(ValueError, match="parameter flip must be a boolean"):
        util.as_bool("maybe", "flip")


@pytest.fixture(scope="module")
def examples_and_model(tmp_path_factory):
    """Examples written by the ingest executor and a tiny model trained on their train split."""
    from tfx.types import standard_artifacts

    from components.image_example_gen.executor import Executor
    from lce_tf import cli
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("components")
    build_synthetic_dataset(str(root / "data"), num_train_classes=6, num_test_classes=3, images_per_class=5,
                            size=16, seed=1, progress=None)
    examples = standard_artifacts.Examples()
    examples.uri = str(root / "examples")
    Executor().Do({}, {"examples": [examples]}, {
        "train_dir": str(root / "data/train"), "query_dir": str(root / "data/query"),
        "gallery_dir": str(root / "data/gallery"), "train_classes": "", "examples_per_shard": 12,
        "input_fingerprint": "x"})
    # 80 steps: with 4 (1 epoch at batch 8) the BatchNorm statistics had not converged and the embeddings
    # collapsed (mean pairwise cosine 0.997), which the collapse guard refuses to export (lce_tf.collapse).
    assert cli.main(["train", "--data", str(root / "data/train"), "--out", str(root / "model"), "--arch",
                     "small_cnn", "--dim", "8", "--epochs", "10", "--batch-size", "4", "--shift", "0",
                     "--verbose", "0"]) == 0
    return root, examples


def test_ingest_writes_splits_with_their_description(examples_and_model):
    from lce_tf.data import read_image_folder
    from lce_tf.tfrecords import count_tfrecord_examples

    root, examples = examples_and_model
    info = util.read_examples_info(examples.uri)
    assert info["image_shape"] == [16, 16, 1]
    assert examples.split_names == '["train", "query", "gallery"]'
    for split, n in (("train", 30), ("query", 6), ("gallery", 9)):  # 6 x 5; 3 x 2; 3 x 3
        records = count_tfrecord_examples(util.split_pattern(examples.uri, split))
        assert info["splits"][split]["num_examples"] == n == records
    assert info["splits"]["train"]["num_shards"] == 3  # ceil(30 / 12)
    folder = read_image_folder(str(root / "data/gallery"))
    assert util.read_split_paths(examples.uri, "gallery") == [os.path.relpath(p, folder.root) for p in folder.paths]
    with pytest.raises(ValueError, match=r"^split 'eval': examples .* no such split \(splits: gallery, query, train\)"):
        util.split_info(info, "eval", examples.uri)


@pytest.mark.parametrize("spill", [False, True], ids=["kept-by-runner", "spilled"])
def test_embed_examples_dofn_matches_the_model(examples_and_model, tmp_path, spill):
    """The DoFn's decode + embed path equals EmbeddingModel.embed_dataset on the same records.

    Spilled: pass 2 reads the embeddings back from the shards that pass 1 wrote (the executor's way).
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from lce_tf.beam.centers import extract_class_centers
    from lce_tf.tfrecords import make_tfrecord_dataset
    from lce_tf.serving import load_embedding_model

    root, examples = examples_and_model
    model = load_embedding_model(str(root / "model"))
    pattern = util.split_pattern(examples.uri, "train")
    embeddings, labels = model.embed_dataset(make_tfrecord_dataset(pattern, model.input_shape, 7))
    names = util.read_examples_info(examples.uri)["splits"]["train"]["class_names"]
    reference = lce_centers.compute_class_centers(embeddings, labels, names, source_model_id=model.model_id)
    out = str(tmp_path / "centers.npz")
    spill_dir = str(tmp_path / "spill") if spill else None
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:  # in-process
        written = extract_class_centers(pipeline, pattern, str(root / "model"), model.input_shape, names, out,
                                        source_model_id=model.model_id, batch_size=4, spill_dir=spill_dir)
        assert_that(written, equal_to([out]))
    _close_to(reference, atol=1e-5)([lce_centers.ClassCenters.load(out)])
    if spill:  # every embedding went through the spilled shards, bit for bit
        from lce_tf.beam.centers import read_embedding_shard

        prefixes = sorted({os.path.join(spill_dir, f.split(".")[0]) for f in os.listdir(spill_dir)})
        spilled = [chunk for p in prefixes for chunk in read_embedding_shard(p)]
        got_embeddings = np.concatenate([e for e, _ in spilled])
        got_labels = np.concatenate([l for _, l in spilled])
        order = np.lexsort(got_embeddings.T[::-1])
        ref_order = np.lexsort(np.asarray(embeddings).T[::-1])
        np.testing.assert_allclose(got_embeddings[order], np.asarray(embeddings)[ref_order], atol=1e-5)
        np.testing.assert_array_equal(got_labels[order], np.asarray(labels)[ref_order])


def _nan_tfrecord_reader(monkeypatch):
    """Makes lce_tf.tfrecords.make_tfrecord_dataset hand over NaN images: what a reader of float records would
    do (the lce_tf records hold encoded PNG/JPEG bytes, which decode to finite pixels in [0, 1])."""
    from lce_tf import tfrecords

    real = tfrecords.make_tfrecord_dataset

    def nan_records(*args, **kwargs):
        return real(*args, **kwargs).map(lambda images, labels: (images * np.float32("nan"), labels))

    monkeypatch.setattr(tfrecords, "make_tfrecord_dataset", nan_records)


def test_trainer_executor_refuses_non_finite_records(examples_and_model, tmp_path, monkeypatch):
    from tfx.types import standard_artifacts

    from components.lce_trainer import executor as trainer

    _, examples = examples_and_model
    _nan_tfrecord_reader(monkeypatch)
    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "model")
    properties = {**_trainer_properties(trainer, "independent", 8, version="v1"), "batch_size": 8}
    # 8 images of 16 x 16 x 1 per batch, all NaN.
    with pytest.raises(ValueError, match=r"^training data batch 0 contains 2048 non-finite values \(NaN/Inf\), "
                                         r"first at row 0$"):
        trainer.Executor().Do({trainer.EXAMPLES_KEY: [examples]}, {trainer.MODEL_KEY: [model]}, properties)
    assert not os.path.exists(os.path.join(model.uri, util.SERVING_MODEL_DIR))


def test_index_builder_executor_refuses_non_finite_records(examples_and_model, tmp_path, monkeypatch):
    from tfx.types import standard_artifacts

    from components import artifacts
    from components.index_builder import executor as index_builder

    root, examples = examples_and_model
    _nan_tfrecord_reader(monkeypatch)
    model = standard_artifacts.Model()
    model.uri = str(root / "model")
    index = artifacts.RetrievalIndex()
    index.uri = str(tmp_path / "index")
    # The gallery split: 9 images of 16 x 16 x 1 in one batch of 256.
    with pytest.raises(ValueError, match=r"^images of batch 0 contains 2304 non-finite values \(NaN/Inf\), "
                                         r"first at row 0$"):
        index_builder.Executor().Do({index_builder.MODEL_KEY: [model], index_builder.EXAMPLES_KEY: [examples]},
                                    {index_builder.INDEX_KEY: [index]}, {index_builder.SPLIT_KEY: "gallery"})
    assert os.listdir(index.uri) == []


def _trainer_properties(trainer, mode: str, dim: int, version: str = "v2") -> dict:
    """The LceTrainer's execution properties of a tiny run (every training setting, from TrainConfig): 80 steps,
    enough for the BatchNorm statistics (4 steps collapsed, which the export refuses: lce_tf.collapse)."""
    from lce_tf import train_config

    config = train_config.TrainConfig(architecture="small_cnn", embedding_dim=dim, epochs=10, batch_size=4,
                                      shift_pixels=0, version=version)
    return {**train_config.parameter_values(config), trainer.MODE_KEY: mode, trainer.SPLIT_KEY: "train"}


@pytest.mark.parametrize("mode, dim, pattern", [
    ("lce", 8, r"^the old class centers were computed with model other-model but the old model is \S+$"),
    ("l2", 16, r"^the old model \S+ has dimension 8 but the new embedding has dimension 16 \(parameter "
               r"embedding_dim\); mode 'l2' needs equal dimensions$"),
])
def test_trainer_executor_checks_the_set_up(examples_and_model, tmp_path, mode, dim, pattern):
    """The LceTrainer's set-up is lce_tf.training.prepare_training's: it fails before training."""
    from tfx.types import standard_artifacts

    from components import artifacts
    from components.lce_trainer import executor as trainer
    from lce_tf.centers import ClassCenters
    from lce_tf.serving import load_embedding_model

    root, examples = examples_and_model
    old = standard_artifacts.Model()
    old.uri = str(root / "model")
    centers = artifacts.ClassCenters()
    centers.uri = str(tmp_path / "centers")
    os.makedirs(centers.uri)
    old_model = load_embedding_model(old.uri)
    embeddings = old_model.embed(np.eye(6, 16 * 16).reshape(6, 16, 16, 1).astype(np.float32))
    ClassCenters(embeddings, np.zeros(6, np.float32), np.ones(6, np.int64),
                 list(util.split_info(util.read_examples_info(examples.uri), "train", examples.uri, "split")
                      ["class_names"]), "other-model").save(os.path.join(centers.uri, artifacts.CENTERS_FILE))
    centers.set_int_custom_property("available", 1)
    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "model")
    with pytest.raises(ValueError, match=pattern):
        trainer.Executor().Do({trainer.EXAMPLES_KEY: [examples], trainer.CLASS_CENTERS_KEY: [centers],
                               trainer.OLD_MODEL_KEY: [old]}, {trainer.MODEL_KEY: [model]},
                              _trainer_properties(trainer, mode, dim))
    assert not os.path.exists(model.uri)


# A module file's backbone (lce_tf.module_file): Flatten + Dense, as the pipeline carries it (its text).
MODULE_SOURCE = """\
import tensorflow as tf


def build_backbone(input_shape, embedding_dim):
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(embedding_dim, use_bias=False)(x))
"""


def test_trainer_executor_trains_exports_and_falls_back_on_the_first_run(examples_and_model, tmp_path):
    """lce without an old model (first run) trains independently, here on the backbone of a module file carried as
    its text (module_source; its path is the building machine's, absent here); l2 with an old model records it
    (lce_tf.training_run)."""
    from tfx.types import standard_artifacts

    from components.lce_trainer import executor as trainer
    from lce_tf.serving import load_embedding_model, read_model_metadata

    root, examples = examples_and_model
    old = standard_artifacts.Model()
    old.uri = str(root / "model")
    old_id = load_embedding_model(old.uri).model_id
    module = {"architecture": "cnn", trainer.MODULE_FILE_KEY: "/building/machine/my_net.py",
              trainer.MODULE_SOURCE_KEY: MODULE_SOURCE}
    for mode, inputs, effective, compatible_with, own in (
            ("lce", {}, "independent", "", module),
            ("l2", {trainer.OLD_MODEL_KEY: [old]}, "l2", old_id, {})):
        model = standard_artifacts.Model()
        model.uri = str(tmp_path / mode)
        trainer.Executor().Do({trainer.EXAMPLES_KEY: [examples], **inputs}, {trainer.MODEL_KEY: [model]},
                              {**_trainer_properties(trainer, mode, 8), **own})
        metadata = read_model_metadata(os.path.join(model.uri, util.SERVING_MODEL_DIR))
        assert model.get_string_custom_property(trainer.EFFECTIVE_MODE_PROPERTY) == effective
        assert model.get_string_custom_property("compatible_with") == compatible_with
        assert model.get_string_custom_property(trainer.MODEL_ID_PROPERTY) == metadata["model_id"]
        assert (metadata["training"]["compat"], metadata["training"]["configured_mode"]) == (effective, mode)
        architecture = "module_file" if own else "small_cnn"
        assert model.get_string_custom_property("architecture") == architecture
        assert metadata["training"]["architecture"] == architecture and metadata["version"] == "v2"
        if own:
            assert metadata["module_file"]["file"] == "my_net.py" and metadata["training"]["module_file"] == "my_net.py"
        check = metadata["training"]["collapse_check"]  # all 30 training images (fewer than 256)
        assert check["sample"] == 30 and check["mean_pairwise_cosine"] < 0.99
        assert (metadata.get("compatible_with") or {}).get("model_id", "") == compatible_with


def test_first_run_marker_and_transformation_dir_of_a_shared_artifact(tmp_path):
    from components import artifacts

    transformation = artifacts.GalleryTransformation()
    transformation.uri = str(tmp_path / "t")
    artifacts.write_no_old_model(transformation, transformation.uri, "GalleryTransformFitter",
                                 "there is no gallery to transform")
    assert os.listdir(transformation.uri) == [artifacts.NO_OLD_MODEL_FILE]
    assert (tmp_path / "t" / artifacts.NO_OLD_MODEL_FILE).read_text() == \
        "No old model was resolved (first run): there is no gallery to transform.\n"
    assert transformation.get_int_custom_property(artifacts.AVAILABLE_PROPERTY) == 0
    assert artifacts.transformation_dir(transformation) is None and artifacts.transformation_dir(None) is None
    transformation.set_int_custom_property(artifacts.AVAILABLE_PROPERTY, 1)
    with pytest.raises(ValueError, match=r"^transformation \S+/t: transformation/ is missing although available = 1$"):
        artifacts.transformation_dir(transformation)
    os.mkdir(tmp_path / "t" / artifacts.TRANSFORMATION_SUBDIR)
    assert artifacts.transformation_dir(transformation) == str(tmp_path / "t" / artifacts.TRANSFORMATION_SUBDIR)


def test_validator_fails_a_collapsed_candidate_and_blesses_a_healthy_one(examples_and_model, tmp_path):
    """The collapse guard at the gate (lce_tf.collapse, lce_tf.gate.decide): a first-run candidate whose gallery
    embeddings collapsed is NOT_BLESSED, with floors of 0 that any model passes, and the reason names it and the
    value; the fixture's trained model, judged the same way, is blessed."""
    import json

    from tfx.types import standard_artifacts

    from cli_helpers import export_collapsed_model
    from components.compatibility_validator import executor as validator

    root, examples = examples_and_model
    export_collapsed_model(tmp_path / "collapsed", (16, 16, 1), version="vc")
    properties = {validator.QUERY_SPLIT_KEY: "query", validator.GALLERY_SPLIT_KEY: "gallery",
                  validator.MIN_TOP1_KEY: 0.0, validator.MIN_MAP_KEY: 0.0, validator.COMPATIBILITY_KEY: "backward"}
    verdicts = {}
    for name, model_dir in (("collapsed", tmp_path / "collapsed"), ("healthy", root / "model")):
        model, blessing = standard_artifacts.Model(), standard_artifacts.ModelBlessing()
        model.uri, blessing.uri = str(model_dir), str(tmp_path / f"blessing-{name}")
        validator.Executor().Do({validator.MODEL_KEY: [model], validator.EXAMPLES_KEY: [examples]},
                                {validator.BLESSING_KEY: [blessing]}, properties)
        metrics = json.loads((tmp_path / f"blessing-{name}" / validator.METRICS_FILE).read_text())
        verdicts[name] = (blessing.get_int_custom_property("blessed"), metrics)
    blessed, metrics = verdicts["collapsed"]
    assert blessed == 0 and metrics["verdict"] == "NOT_BLESSED" and metrics["collapse"]["vc"]["sample"] == 9
    assert any(r.startswith("not collapsed: mean pairwise cosine of vc's gallery embeddings = ") and r.endswith(
        "<= 0.99: NO") for r in metrics["reasons"]), metrics["reasons"]
    assert any(r.startswith("refused: vc's embeddings collapsed") for r in metrics["reasons"])
    assert (tmp_path / "blessing-collapsed" / validator.NOT_BLESSED_FILE).exists()
    blessed, metrics = verdicts["healthy"]
    assert blessed == 1 and metrics["route"] == "first-model", metrics["reasons"]
    assert metrics["collapse"]["model"]["mean_pairwise_cosine"] < 0.99
