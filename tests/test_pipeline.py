"""The TFX pipeline: bad configuration, Kubeflow compilation, and (e2e) real local runs on small data.

The e2e module fixture runs the pipeline four times in this process (one TFX import) on a synthetic
dataset, each run with the LocalDagRunner, SQLite metadata and the strict criterion (margins 0); run 2
runs Beam on two worker processes (the default), runs 1 and 3 in the pipeline's process (beam_workers 1):

  run 1  v1, small CNN on half the training classes, 2 epochs: no old model yet -> trained
         independently, blessed on its own accuracy, pushed, gallery indexed;
  run 2  v2 (lce), larger CNN on all classes: old model v1 resolved from the metadata store ->
         ClassCenterExtractor (Beam) -> LCE training -> GalleryTransformFitter (T12 v1 -> v2) ->
         blessed through the FORWARD route (compatibility "either") -> the v1 index upgraded through
         T12 (no image read) -> pushed with its transformation;
  run 3  v3 (independent, compatibility "backward": the paper's criterion only): NOT_BLESSED, nothing
         new pushed;
  run 4  run 3 again: every component is served from the cache.

The data: 1,200 training classes of 3 images and 100 held-out classes (1 query + 2 gallery images
each), 16 px. Many classes with few images each are the regime where the fitted transformation
generalises (an independent replica of the recipe: the forward route passed at 1,445 glyph classes and not at 500); measured with
the CLI on the same data (v1 2 epochs, v2 10, T12 width 64 / 30 epochs), seeds 0 and 1: M(v1, v1) top-1 /
mAP 0.210 / 0.267 and 0.250 / 0.274, M(v2, T12(v1)) 0.430 / 0.445 and 0.380 / 0.415; with 600 classes of
4 images the top-1 lead was 3 to 19 points over three seeds (too close to the bar for a test).
"""

import json
import os

import numpy as np
import pytest

from pipeline.config import MODES, PipelineConfig


# --------------------------------------------------------------------------------------------------
# Bad configuration: one line naming the field, before any component runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("pipeline_data")
    build_synthetic_dataset(str(root / "data"), num_train_classes=120, num_test_classes=16, images_per_class=6,
                            num_query_per_class=2, size=16, seed=0, progress=None)
    return root / "data"


def _config(data, root, **overrides):
    values = dict(train_dir=str(data / "train"), query_dir=str(data / "query"), gallery_dir=str(data / "gallery"),
                  pipeline_root=str(root), embedding_dim=16, batch_size=32, epochs=5)
    values.update(overrides)
    return PipelineConfig(**values)


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"train_dir": ""}, "train_dir", "required"),
    ({"train_dir": "/nonexistent/train"}, "train_dir", "/nonexistent/train does not exist"),
    ({"mode": "lcee"}, "mode", "unknown compatibility mode 'lcee'"),
    ({"mode": "lce", "old_model": "none"}, "old_model", "mode 'lce' needs an old model"),
    ({"mode": "l2", "old_model": "none"}, "old_model", "mode 'l2' needs an old model"),
    ({"query_dir": ""}, "query_dir", "needs the eval split's query images"),
    ({"gallery_dir": ""}, "gallery_dir", "the eval split needs a gallery"),
    ({"old_model": "/nonexistent/v1"}, "old_model", "does not exist"),
    ({"boundary": "percentile:120"}, "boundary", "percentile:120"),
    ({"min_top1": 1.5}, "min_top1", "must be in [0, 1]"),
    ({"beam_workers": 0}, "beam_workers", "positive integer"),
    ({"index_backend": "faiss"}, "index_backend", "unknown index backend 'faiss'; expected one of scann, milvus"),
    ({"index_milvus_uri": "http://m:19530"}, "index_milvus_uri / index_milvus_index_type",
     "set index_backend to 'milvus'"),
    ({"index_backend": "milvus", "index_milvus_index_type": "HNSW"}, "index_milvus_index_type",
     "HNSW needs a Milvus server (index_milvus_uri); Milvus Lite takes FLAT, IVF_FLAT, AUTOINDEX"),
    ({"index_backend": "milvus", "index_milvus_uri": "http://root:pw@m:19530"}, "index_milvus_uri",
     "without credentials"),
    ({"index_backend": "milvus", "index_algorithm": "tree_ah"}, "index_algorithm", "is a ScaNN algorithm"),
])
def test_bad_config_fails_before_any_component_runs(tiny_data, tmp_path, overrides, field, fragment):
    from pipeline.local_runner import run_local

    root = tmp_path / "root"
    with pytest.raises(ValueError) as info:
        run_local(_config(tiny_data, root, **overrides))
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert fragment in message and "\n" not in message
    assert not root.exists()  # nothing ran: no metadata store, no artifact


def test_old_model_dimension_checked_up_front(tiny_data, tmp_path):
    old = tmp_path / "v1"
    old.mkdir()
    (old / "lce_tf_model.json").write_text(json.dumps({"embedding_dim": 8}))
    with pytest.raises(ValueError, match=r"^embedding_dim: mode 'lce' needs the old model's dimension 8"):
        _config(tiny_data, tmp_path / "root", old_model=str(old), mode="lce").resolved().validate()
    _config(tiny_data, tmp_path / "root", old_model=str(old), mode="lce-transform").resolved().validate()


def test_config_file_overrides_and_unknown_fields(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mode": "bct", "epochs": 3, "beam_pipeline_args": ["--a=1"]}))
    from pipeline.config import load_config

    config = load_config(str(path), ["version=v7", "margin_top1=0.01", "enable_cache=false",
                                     "beam_pipeline_args=--x=1,--y=2"])
    assert (config.mode, config.epochs, config.version, config.margin_top1, config.enable_cache) == \
        ("bct", 3, "v7", 0.01, False)
    assert config.beam_pipeline_args == ["--x=1", "--y=2"]
    path.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ValueError, match="unknown field.*'epoch'"):
        load_config(str(path))
    with pytest.raises(ValueError, match="--set epochs: expected an integer"):
        load_config(None, ["epochs=three"])
    path.write_text(json.dumps({"epochs": "3"}))
    with pytest.raises(ValueError, match="field epochs must be an integer"):
        load_config(str(path))


def test_config_choices_mirror_the_library():
    from lce_tf import backbones, catalog, model
    from lce_tf.index import milvus_config, registry
    from components.index_builder import executor as index_executor
    from components.lce_trainer import executor
    from pipeline import config

    assert set(config.MODES) == set(model.MODES) - {"cross-model"} == set(executor.MODES)
    assert set(config.INDEX_BACKENDS) == set(registry.BACKENDS) == set(index_executor.BACKENDS)
    assert set(config.MILVUS_INDEX_TYPES) - {""} == set(milvus_config.SERVER_INDEX_TYPES)
    assert set(config.MILVUS_LITE_INDEX_TYPES) - {""} == set(milvus_config.LITE_INDEX_TYPES)
    assert set(config.ARCHITECTURES) == set(backbones.ARCHITECTURES)
    assert set(config.LOSSES) == set(catalog.HEADS)
    from components.compatibility_validator import executor as validator

    assert config.COMPATIBILITY_ROUTES == validator.COMPATIBILITY_ROUTES
    assert "independent" in MODES


def test_cli_pipeline_bad_config_is_one_line(capsys):
    from lce_tf import cli

    code = cli.main(["pipeline", "run", "--set", "mode=bogus", "--set", "train_dir=/nonexistent"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert err.strip() == ("lce-tf: error: mode: unknown compatibility mode 'bogus'; expected one of "
                           "independent, lce, lce-instance, lce-transform, bct, l2")


# --------------------------------------------------------------------------------------------------
# Kubeflow
# --------------------------------------------------------------------------------------------------


def test_kubeflow_compiles_to_a_strict_pipeline_spec(tmp_path):
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipeline.kubeflow_runner import compile_kubeflow

    module_text = ("def build_backbone(input_shape, embedding_dim):  # carried in the spec\n"
                   "    raise NotImplementedError\n")
    (tmp_path / "my_model.py").write_text(module_text)
    config = PipelineConfig(train_dir="/gcs/bucket/data/train", query_dir="/gcs/bucket/data/query",
                            gallery_dir="/gcs/bucket/data/gallery", pipeline_root="/gcs/bucket/root",
                            beam_pipeline_args=["--runner=DataflowRunner", "--project=p", "--region=r"],
                            train_independent_reference=True, kubeflow_image="example.org/lce-tf:1",
                            module_file=str(tmp_path / "my_model.py"))
    written = compile_kubeflow(config, str(tmp_path / "compiled"))
    with open(written["v2"], encoding="utf-8") as f:
        job_json = json.load(f)
    # your own backbone travels in the spec (the LceTrainer's module_source), not as a path of this machine
    for trainer in ("LceTrainer", "IndependentTrainer"):
        parameters = job_json["pipelineSpec"]["components"][trainer]["inputDefinitions"]["parameters"]
        assert "module_source" in parameters, sorted(parameters)
    assert json.dumps(module_text) in json.dumps(job_json)
    with open(written["v1"], encoding="utf-8") as f:
        assert "# carried in the spec" in f.read()  # the Argo workflow too
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.Parse(json.dumps(job_json["pipelineSpec"]), spec)  # strict: unknown fields raise
    job = pipeline_spec_pb2.PipelineJob()
    json_format.Parse(json.dumps(job_json), job)
    tasks = set(spec.root.dag.tasks)
    assert {"ImageFolderExampleGen", "ClassCenterExtractor", "LceTrainer", "IndependentTrainer",
            "GalleryTransformFitter", "CompatibilityValidator", "IndexBuilder", "Pusher"} <= tasks
    assert any(t.startswith("latest_blessed_model_resolver") for t in tasks)
    assert any(t.startswith("latest_index_resolver") for t in tasks)  # the served index for the forward route
    executors = job_json["pipelineSpec"]["deploymentSpec"]["executors"]
    centers = executors["ClassCenterExtractor_executor"]["container"]
    assert centers["image"] == "example.org/lce-tf:1"
    assert "--runner=DataflowRunner" in centers["args"] and "--setup_file=/lce-tf/setup.py" in centers["args"]
    assert "components.class_center_extractor.executor.Executor" in centers["args"]
    with open(written["v1"], encoding="utf-8") as f:
        workflow = yaml.safe_load(f)
    assert workflow["kind"] == "Workflow"
    templates = {t["name"] for t in workflow["spec"]["templates"]}
    assert {"classcenterextractor", "lcetrainer", "compatibilityvalidator", "pusher"} <= templates


# --------------------------------------------------------------------------------------------------
# e2e: four local runs
# --------------------------------------------------------------------------------------------------

# Own-accuracy floor of the tiny models (not a compatibility tolerance: the margins stay 0).
FLOORS = dict(min_top1=0.2)


@pytest.fixture(scope="module")
def e2e_data(tmp_path_factory):
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("pipeline_e2e_data")
    build_synthetic_dataset(str(root / "data"), num_train_classes=1200, num_test_classes=100, images_per_class=3,
                            num_query_per_class=1, size=16, seed=0, progress=None)
    return root / "data"


def _tree_state(path):
    """{relative path: (size, mtime_ns)} of every file under path."""
    state = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            state[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def runs(e2e_data, tmp_path_factory):
    from pipeline.local_runner import run_local, run_summary

    root = tmp_path_factory.mktemp("pipeline_root")
    configs = {
        "v1": _config(e2e_data, root, version="v1", architecture="small_cnn", train_classes="0:50%", epochs=2,
                      beam_workers=1, **FLOORS),
        "v2": _config(e2e_data, root, version="v2", architecture="cnn", mode="lce", epochs=10,
                      compatibility="either", **FLOORS),
        "v3": _config(e2e_data, root, version="v3", architecture="cnn", mode="independent", epochs=10,
                      compatibility="backward", beam_workers=1, **FLOORS),
    }
    out = {"root": root, "configs": configs, "serving": [], "seconds": {}}
    for name in ("v1", "v2", "v3", "v3-rerun"):
        config = configs[name.split("-")[0]]
        out["seconds"][name] = run_local(config)
        out[name] = run_summary(config)
        serving = config.resolved().serving_dir
        versions = sorted(os.listdir(serving)) if os.path.isdir(serving) else []
        out["serving"].append({v: _tree_state(os.path.join(serving, v)) for v in versions})
    return out


def _metrics(summary):
    with open(summary["metrics"], encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.e2e
def test_first_run_pushes_v1_on_its_own_accuracy(runs):
    v1 = runs["v1"]
    assert v1["verdict"] == "BLESSED" and v1["pushed"]
    assert os.path.isfile(os.path.join(v1["blessing_dir"], "BLESSED"))
    metrics = _metrics(v1)
    assert metrics["old"] is None and metrics["reasons"][0].startswith("no old model (first run")
    centers_dir = v1["nodes"]["ClassCenterExtractor"]["outputs"]["class_centers"][0]
    assert centers_dir["properties"]["available"] == 0  # nothing to be compatible with yet
    trained = v1["nodes"]["LceTrainer"]["outputs"]["model"][0]["properties"]
    assert trained["compat_mode"] == "independent" and trained["version"] == "v1"
    assert len(runs["serving"][0]) == 1
    pushed = v1["pushed_destination"]
    with open(os.path.join(pushed, "lce_tf_model.json"), encoding="utf-8") as f:
        assert json.load(f)["model_id"] == v1["model_id"]
    assert v1["index_dir"] and os.path.isfile(os.path.join(v1["index_dir"], "index.json"))


@pytest.mark.e2e
def test_second_run_is_blessed_through_the_forward_route(runs):
    from lce_tf.centers import ClassCenters

    v1, v2 = runs["v1"], runs["v2"]
    metrics = _metrics(v2)
    assert v2["verdict"] == "BLESSED" and v2["pushed"] and v2["route"] == "forward", metrics["reasons"]
    assert metrics["model_ids"]["v1"] == v1["model_id"] and metrics["model_ids"]["v2"] == v2["model_id"]
    pairs = {(p["query"], p["gallery"], p["via"]): p for p in metrics["pairs"]}
    assert {("v1", "v1", None), ("v2", "v1", None), ("v2", "v2", None), ("v2", "v1", "T12")} <= set(pairs)
    # The decision follows the numbers, with the strict criterion (margin 0): M(v2, T12(v1)) > M(v1, v1).
    for metric in ("top1", "mAP"):
        assert pairs[("v2", "v1", "T12")][metric] > pairs[("v1", "v1", None)][metric]
    assert metrics["criterion"]["v2 via T12"]["pass"] and metrics["criterion"]["v2 via T12"]["route"] == "forward"
    assert "forward" in metrics["passed_routes"]
    # Both routes are reported; the backward one (the paper's criterion) with its own verdict lines.
    backward = [r for r in metrics["reasons"] if r.startswith("backward route: criterion")]
    assert len(backward) == 2 and metrics["criterion"]["v2"]["route"] == "backward"
    centers_uri = v2["nodes"]["ClassCenterExtractor"]["outputs"]["class_centers"][0]["uri"]
    centers = ClassCenters.load(os.path.join(centers_uri, "class_centers.npz"))
    assert centers.source_model_id == v1["model_id"] and centers.num_classes == 1200  # all classes of v2
    assert sorted(os.listdir(centers_uri)) == ["class_centers.npz"]  # the spilled embeddings are gone
    report = open(v2["report"], encoding="utf-8").read()
    assert "BLESSED" in report and "Upgrade routes" in report and "M(v2, T12(v1))" in report


@pytest.mark.e2e
def test_forward_blessing_upgrades_the_served_index_and_ships_the_transformation(runs):
    from lce_tf.index.scann_index import EmbeddingIndex
    from lce_tf.transformation import load_transformation

    v1, v2 = runs["v1"], runs["v2"]
    transformation = load_transformation(v2["transformation_dir"])
    assert transformation.source["model_id"] == v1["model_id"] and transformation.target["model_id"] == v2["model_id"]
    # The index: v1's served index moved through T12, no image read; ids and versions kept.
    assert v2["index_built_from"].startswith(f"upgraded from {os.path.dirname(v1['index_dir'])}")
    old, new = EmbeddingIndex.load(v1["index_dir"]), EmbeddingIndex.load(v2["index_dir"])
    with open(os.path.join(v2["pushed_destination"], "lce_tf_model.json"), encoding="utf-8") as f:
        pushed = json.load(f)
    assert new.embedding_space == pushed["embedding_space"] and new.ids == old.ids
    assert set(new.versions) == {v1["model_id"]}
    assert set(new.provenance) == {f"transformed from {old.embedding_space} by {transformation.transform_id}"}
    np.testing.assert_allclose(new.embeddings, transformation.old_to_new(old.embeddings), atol=1e-5)
    # The push: model + gallery_transform/, one atomic version; v1's version untouched.
    assert v2["gallery_transform"] == os.path.join(v2["pushed_destination"], "gallery_transform")
    shipped = load_transformation(v2["gallery_transform"])
    assert shipped.transform_id == transformation.transform_id
    assert pushed["compatible_with"]["model_id"] == v1["model_id"] and pushed["training"]["compat"] == "lce"
    before, after = runs["serving"][0], runs["serving"][1]
    assert len(after) == 2 and all(after[v] == state for v, state in before.items())
    # v2's queries are accepted by the upgraded index; v1's are refused.
    from lce_tf.index.base import IncompatibleModelError
    from lce_tf.index.operations import check_query_compatibility
    from lce_tf.serving import read_model_metadata

    assert check_query_compatibility(new, pushed) == "embed"
    with pytest.raises(IncompatibleModelError):
        check_query_compatibility(new, read_model_metadata(v1["pushed_destination"]))


@pytest.mark.e2e
def test_independent_candidate_is_not_blessed_and_nothing_is_pushed(runs):
    v3 = runs["v3"]
    assert v3["verdict"] == "NOT_BLESSED" and not v3["pushed"] and v3["route"] == ""
    assert os.path.isfile(os.path.join(v3["blessing_dir"], "NOT_BLESSED"))
    metrics = _metrics(v3)
    reasons = metrics["reasons"]
    assert metrics["compatibility"] == "backward"
    # v3 was trained without compatibility terms: it does not declare compatibility with v2 (so the
    # backward route fails whatever the numbers), and the criterion lines say what the numbers say.
    assert any(r.startswith("backward route: v3 declares compatibility") and r.endswith("NO") for r in reasons), reasons
    pairs = {(p["query"], p["gallery"], p["via"]): p for p in metrics["pairs"]}
    for m in ("top1", "mAP"):
        ok = pairs[("v3", "v2", None)][m] > pairs[("v2", "v2", None)][m]
        assert any(r.startswith(f"backward route: criterion {m}: M(v3, v2)") and r.endswith("yes" if ok else "NO")
                   for r in reasons), reasons
    # The forward route was measured (T12 v2 -> v3) and reported, but "backward" does not let it bless.
    assert ("v3", "v2", "T12") in pairs and "v3 via T12" in metrics["criterion"]
    assert v3["index_dir"] is None
    assert runs["serving"][2] == runs["serving"][1]  # no new version, nothing overwritten


@pytest.mark.e2e
def test_lineage_read_back_with_ml_metadata(runs):
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2

    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = runs["configs"]["v2"].resolved().metadata_path
    store = mlmd.MetadataStore(connection)
    type_names = {t.id: t.name for t in store.get_artifact_types()}
    pushed_id = runs["v2"]["nodes"]["Pusher"]["outputs"]["pushed_model"][0]["id"]

    def producer(artifact_id):
        events = store.get_events_by_artifact_ids([artifact_id])
        [event] = [e for e in events if e.type == metadata_store_pb2.Event.OUTPUT]
        return event.execution_id

    def inputs(execution_id):
        events = [e for e in store.get_events_by_execution_ids([execution_id])
                  if e.type == metadata_store_pb2.Event.INPUT]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
        return {e.path.steps[0].key: artifacts[e.artifact_id] for e in events}

    pusher_inputs = inputs(producer(pushed_id))
    assert type_names[store.get_artifacts_by_id([pushed_id])[0].type_id] == "PushedModel"
    model, blessing = pusher_inputs["model"], pusher_inputs["model_blessing"]
    assert (type_names[model.type_id], type_names[blessing.type_id]) == ("Model", "ModelBlessing")
    assert blessing.custom_properties["blessed"].int_value == 1
    assert blessing.custom_properties["current_model_id"].int_value == model.id
    assert inputs(producer(blessing.id))["model"].id == model.id
    trainer_inputs = inputs(producer(model.id))
    centers, examples = trainer_inputs["class_centers"], trainer_inputs["examples"]
    assert (type_names[centers.type_id], type_names[examples.type_id]) == ("lce_tf.ClassCenters", "Examples")
    extractor_inputs = inputs(producer(centers.id))
    assert extractor_inputs["examples"].id == examples.id
    v1_model_id = runs["v1"]["nodes"]["LceTrainer"]["outputs"]["model"][0]["id"]
    assert extractor_inputs["old_model"].id == trainer_inputs["old_model"].id == v1_model_id


@pytest.mark.e2e
def test_rerun_with_cache_executes_no_component(runs):
    first, rerun = runs["v3"], runs["v3-rerun"]
    assert rerun["run_id"] != first["run_id"]
    components = {node: info for node, info in rerun["nodes"].items() if "resolver" not in node}
    assert set(components) == set(first["nodes"]) - {"latest_blessed_model_resolver"}
    assert all(info["state"] == "CACHED" for info in components.values()), \
        {n: i["state"] for n, i in components.items()}
    for node, info in components.items():  # the cached executions point at the first run's artifacts
        assert info["outputs"] == first["nodes"][node]["outputs"], node
    assert runs["serving"][3] == runs["serving"][2]
    print("pipeline run seconds:", {k: round(v, 1) for k, v in runs["seconds"].items()})
