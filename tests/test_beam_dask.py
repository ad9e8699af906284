"""Beam on Dask (issue 21, item 3): the ClassCenterExtractor's transform on a dask.distributed cluster.

A LocalCluster of 2 worker processes (processes=True, one thread each, 127.0.0.1, free ports, no
dashboard) is started once for the module and closed after it; the tests that use it are e2e (make test
runs them, make test-fast does not). Against it:

- the centers transform (`lce_tf.beam.centers.ComputeClassCentersFromBatches`, the component's) on
  lce_tf/beam/dask_runner.py's DaskRunner gives the DirectRunner's centers, boundary cosines and counts bit
  for bit (np.array_equal), for the three ways of feeding its two passes, and both boundary rules;
- the runner's fixes of Beam 2.74's DaskRunner (lce_tf/beam/dask_runner.py's docstring): outputs of
  finish_bundle kept, a singleton side input read by many partitions, ReadFromTFRecord, work spread
  over both workers;
- `lce-tf centers --beam-runner dask` (TFRecords, the old model loaded in the Dask workers) and the
  ClassCenterExtractor's executor with the Dask flags equal the in-process `lce-tf centers` bit for bit;
- PipelineConfig's beam_runner / beam_dask_address validation and the ClassCenterExtractor's flags;
  bad scheduler addresses: one line, exit 2, nothing written.
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import pytest

from lce_tf import cli
from lce_tf.centers import ClassCenters, compute_class_centers

from cli_helpers import assert_bad_input

beam = pytest.importorskip("apache_beam")
pytest.importorskip("distributed")

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from lce_tf.beam import centers as centers_beam  # noqa: E402
from lce_tf.beam import dask_runner, options  # noqa: E402
from pipeline import config as pipeline_config  # noqa: E402

NUM_CLASSES = 12
DIM = 8
DIRECT_ARGS = ["--runner=FnApiRunner"]  # the DirectRunner's engine, in this process (no worker start-up)


@pytest.fixture(scope="module")
def cluster():
    """A dask.distributed LocalCluster: 2 worker processes on 127.0.0.1, free ports, no dashboard."""
    from distributed import LocalCluster

    # The workers are started with this interpreter's sys.path (multiprocessing spawn), so they import
    # the checkout's lce_tf like this process.
    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
                         dashboard_address=None, worker_dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})  # its HTTP server, not on 8787
    try:
        yield local
    finally:
        dask_runner.close_cluster(local)


def dask_args(cluster) -> list[str]:
    return options.dask_beam_args(cluster.scheduler_address)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Seeded embeddings in 5 shards of 300 rows (every class in every shard), and their labels."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(21)
    means = rng.normal(size=(NUM_CLASSES, DIM))
    prefixes, all_emb, all_lab = [], [], []
    for i in range(5):
        labels = rng.permutation(np.arange(300) % NUM_CLASSES).astype(np.int64)
        emb = (means[labels] + 0.6 * rng.normal(size=(300, DIM))).astype(np.float32)
        prefixes.append(centers_beam.write_embedding_shard(str(root / f"shard-{i}"), emb, labels))
        all_emb.append(emb)
        all_lab.append(labels)
    return prefixes, np.concatenate(all_emb), np.concatenate(all_lab)


def run_centers(args, prefixes, out_path, *, feed: str, boundary: str) -> ClassCenters:
    """The component's transform over the shards: feed "two-reads", "spill" or "one-read" (centers_beam)."""
    spill_dir = os.path.join(os.path.dirname(out_path), "spill") if feed == "spill" else None
    names = [f"c{j:02d}" for j in range(NUM_CLASSES)]
    with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
        first = pipeline | "Read1" >> centers_beam.ReadEmbeddingShards(prefixes, chunk_rows=128)
        source = ((first, pipeline | "Read2" >> centers_beam.ReadEmbeddingShards(prefixes, chunk_rows=128))
                  if feed == "two-reads" else first)
        _ = (source
             | "Centers" >> centers_beam.ComputeClassCentersFromBatches(names, boundary, "synthetic",
                                                                         spill_dir=spill_dir, rows_per_shard=400)
             | "Save" >> beam.Map(centers_beam.save_class_centers, path=out_path))
    if spill_dir:
        centers_beam.delete_spill_dir(spill_dir)
    return ClassCenters.load(out_path)


@pytest.mark.e2e  # the tests on the cluster (2 worker processes) are e2e: make test-fast skips them
@pytest.mark.parametrize("feed, boundary", [("two-reads", "min"), ("spill", "percentile:20"),
                                            ("one-read", "percentile:50")])
def test_centers_on_dask_equal_the_direct_runners_bit_for_bit(cluster, shards, tmp_path, feed, boundary):
    prefixes, embeddings, labels = shards
    (tmp_path / "dask").mkdir()
    (tmp_path / "direct").mkdir()
    on_dask = run_centers(dask_args(cluster), prefixes, str(tmp_path / "dask" / "c.npz"), feed=feed,
                          boundary=boundary)
    direct = run_centers(DIRECT_ARGS, prefixes, str(tmp_path / "direct" / "c.npz"), feed=feed, boundary=boundary)
    assert np.array_equal(on_dask.centers, direct.centers)
    assert np.array_equal(on_dask.boundary_cos, direct.boundary_cos)
    assert np.array_equal(on_dask.counts, direct.counts)
    assert on_dask == direct  # and names, rule, source model
    # ... and both equal the library's in-process computation (so neither lost or repeated a row).
    reference = compute_class_centers(embeddings, labels, direct.class_names, boundary=boundary,
                                      source_model_id="synthetic")
    assert on_dask == reference
    assert on_dask.counts.tolist() == [1500 // NUM_CLASSES] * NUM_CLASSES
    if feed == "spill":
        assert not os.path.exists(tmp_path / "dask" / "spill")


class _EmitInFinishBundle(beam.DoFn):
    """Buffers elements in threes; what is left is emitted in finish_bundle (like BatchElements)."""

    def start_bundle(self):
        self._buffer = []

    def process(self, element):
        self._buffer.append(element)
        if len(self._buffer) == 3:
            yield sorted(self._buffer)
            self._buffer = []

    def finish_bundle(self):
        if self._buffer:
            from apache_beam.transforms.window import GlobalWindows

            yield GlobalWindows.windowed_value(sorted(self._buffer))


def _write_json_line(value, directory):
    import json
    import uuid

    with open(os.path.join(directory, uuid.uuid4().hex), "w") as f:
        json.dump(value, f)


def _read_json_lines(directory):
    import json

    out = []
    for path in glob.glob(os.path.join(directory, "*")):
        with open(path) as f:
            out.append(json.load(f))
    return out


@pytest.mark.e2e
def test_runner_fixes_finish_bundle_side_inputs_and_spreads_work(cluster, tmp_path):
    """Outputs of finish_bundle kept; a singleton side input read by every partition; both workers used."""
    for name in ("batches", "pairs", "pids"):
        (tmp_path / name).mkdir()
    with beam.Pipeline(options=PipelineOptions(dask_args(cluster))) as pipeline:
        numbers = pipeline | beam.Create(list(range(20)))
        _ = (numbers | "Buffer" >> beam.ParDo(_EmitInFinishBundle())
             | "WriteBatches" >> beam.Map(_write_json_line, directory=str(tmp_path / "batches")))
        total = numbers | "Sum" >> beam.CombineGlobally(sum)
        _ = (numbers | "WithTotal" >> beam.Map(lambda x, t: [x, t], t=beam.pvalue.AsSingleton(total))
             | "WritePairs" >> beam.Map(_write_json_line, directory=str(tmp_path / "pairs")))
        _ = (numbers | "Pid" >> beam.Map(lambda _: os.getpid())
             | "WritePids" >> beam.Map(_write_json_line, directory=str(tmp_path / "pids")))
    batches = _read_json_lines(str(tmp_path / "batches"))
    assert sorted(x for batch in batches for x in batch) == list(range(20))  # none lost, none repeated
    assert sorted(map(tuple, _read_json_lines(str(tmp_path / "pairs")))) == [(x, 190) for x in range(20)]
    assert len(set(_read_json_lines(str(tmp_path / "pids"))) - {os.getpid()}) == 2  # both worker processes


@pytest.mark.e2e
def test_runner_reads_tfrecords(cluster, tmp_path):
    """beam.io.ReadFromTFRecord (a beam.io.Read, which the stock DaskRunner turns into a no-op)."""
    records = [f"record-{i}".encode() for i in range(30)]
    with beam.Pipeline(options=PipelineOptions(DIRECT_ARGS)) as pipeline:
        _ = (pipeline | beam.Create(records)
             | beam.io.WriteToTFRecord(str(tmp_path / "in" / "part"), num_shards=3))
    assert len(glob.glob(str(tmp_path / "in" / "part*"))) == 3
    (tmp_path / "out").mkdir()
    with beam.Pipeline(options=PipelineOptions(dask_args(cluster))) as pipeline:
        _ = (pipeline | beam.io.ReadFromTFRecord(str(tmp_path / "in" / "part*"))
             | beam.Map(lambda r: r.decode()) | beam.Map(_write_json_line, directory=str(tmp_path / "out")))
    assert sorted(_read_json_lines(str(tmp_path / "out"))) == sorted(r.decode() for r in records)


def test_runner_names_agree():
    assert options.DASK_RUNNER == dask_runner.RUNNER
    assert options.dask_beam_args("tcp://10.0.0.5:8786") == [
        "--runner=lce_tf.beam.dask_runner.DaskRunner", "--dask_client_address=tcp://10.0.0.5:8786"]


# --------------------------------------------------------------------------------------------------
# lce-tf centers --beam-runner dask
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A small_cnn model directory (untrained, 8-d) and a synthetic folder of 6 classes x 8 images."""
    from lce_tf.export import export_model
    from lce_tf.synthetic import build_synthetic_dataset
    from lce_tf.model import build_compatible_model

    root = tmp_path_factory.mktemp("cli-dask")
    build_synthetic_dataset(str(root / "data"), num_train_classes=6, num_test_classes=2, images_per_class=8,
                            num_query_per_class=2, size=16, seed=0, progress=lambda *_: None)
    export_model(build_compatible_model("small_cnn", (16, 16, 1), 8, 6), str(root / "v1"), architecture="small_cnn",
                 input_shape=(16, 16, 1), version="v1")
    assert cli.main(["centers", "--model", str(root / "v1"), "--data", str(root / "data" / "train"),
                     "--boundary", "percentile:20", "--out", str(root / "in_process.npz")]) == 0
    return root, ClassCenters.load(str(root / "in_process.npz"))


def assert_bit_identical(got: ClassCenters, reference: ClassCenters) -> None:
    assert np.array_equal(got.centers, reference.centers)
    assert np.array_equal(got.boundary_cos, reference.boundary_cos)
    assert np.array_equal(got.counts, reference.counts)
    assert got == reference  # and names, rule, source model


@pytest.mark.e2e
def test_cli_centers_on_dask_equal_in_process(cluster, model_and_data, tmp_path, capsys):
    root, in_process = model_and_data
    assert cli.main(["centers", "--model", str(root / "v1"), "--data", str(root / "data" / "train"),
                     "--boundary", "percentile:20", "--out", str(tmp_path / "dask.npz"), "--beam-runner", "dask",
                     "--dask-address", cluster.scheduler_address]) == 0
    assert "(2 workers)" in capsys.readouterr().out
    assert_bit_identical(ClassCenters.load(str(tmp_path / "dask.npz")), in_process)
    assert os.listdir(tmp_path) == ["dask.npz"]  # the work directory (records, spill) is gone


@pytest.mark.e2e
def test_class_center_extractor_executor_on_dask(cluster, model_and_data, tmp_path):
    """The component's executor with the local runner's flags followed by the Dask ones (as create_pipeline
    orders them for beam_runner: dask) over Examples written by the ingest executor."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components import artifacts
    from components.class_center_extractor import executor as extractor
    from components.image_example_gen.executor import Executor as IngestExecutor

    root, in_process = model_and_data
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "examples")
    IngestExecutor().Do({}, {"examples": [examples]}, {
        "train_dir": str(root / "data/train"), "query_dir": str(root / "data/query"),
        "gallery_dir": str(root / "data/gallery"), "train_classes": "", "examples_per_shard": 12,
        "input_fingerprint": "x"})
    model = standard_artifacts.Model()
    model.uri = str(root / "v1")
    output = artifacts.ClassCenters()
    output.uri = str(tmp_path / "centers")
    context = BaseBeamExecutor.Context(beam_pipeline_args=options.direct_beam_args(2) + dask_args(cluster))
    extractor.Executor(context).Do(
        {extractor.EXAMPLES_KEY: [examples], extractor.OLD_MODEL_KEY: [model]},
        {extractor.CLASS_CENTERS_KEY: [output]},
        {extractor.SPLIT_KEY: "train", extractor.BOUNDARY_KEY: "percentile:20", extractor.FLIP_AVERAGE_KEY: False,
         extractor.BATCH_SIZE_KEY: 256})
    assert_bit_identical(ClassCenters.load(os.path.join(output.uri, artifacts.CENTERS_FILE)), in_process)
    assert not os.path.exists(os.path.join(output.uri, extractor.SPILL_DIR))


# --------------------------------------------------------------------------------------------------
# Configuration and bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"beam_runner": "spark"}, "beam_runner: unknown Beam runner 'spark'; expected one of direct, dask"),
    ({"beam_runner": "dask"}, "beam_dask_address: required with beam_runner 'dask'"),
    ({"beam_runner": "dask", "beam_dask_address": "127.0.0.1:8786"},
     "beam_dask_address: '127.0.0.1:8786' must be a dask scheduler address tcp://HOST:PORT"),
    ({"beam_runner": "dask", "beam_dask_address": "tcp://h:70000"}, "beam_dask_address: 'tcp://h:70000' must be"),
    ({"beam_runner": "dask", "beam_dask_address": "http://h:8786"}, "beam_dask_address: 'http://h:8786' must be"),
    ({"beam_dask_address": "tcp://h:8786"}, "beam_dask_address: set beam_runner to 'dask' to use it"),
])
def test_pipeline_config_validation(overrides, message):
    with pytest.raises(ValueError) as info:
        pipeline_config.PipelineConfig(**overrides).validate(check_paths=False)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_pipeline_config_dask_reaches_the_extractor_only(tmp_path):
    from pipeline.pipeline import CENTERS_ID, create_components

    old = tmp_path / "v1"
    old.mkdir()
    config = pipeline_config.PipelineConfig(old_model=str(old), beam_runner="dask",
                                            beam_dask_address="tcp://dask-scheduler:8786")
    config.validate(check_paths=False)
    config = pipeline_config.PipelineConfig.from_dict(config.to_dict())  # the fields round-trip
    nodes = {node.id: node for node in create_components(config.resolved())}
    extractor_args = nodes[CENTERS_ID].executor_spec.beam_pipeline_args
    assert extractor_args[-2:] == ["--runner=lce_tf.beam.dask_runner.DaskRunner",
                                   "--dask_client_address=tcp://dask-scheduler:8786"]
    others = [n for i, n in nodes.items() if i != CENTERS_ID and hasattr(n.executor_spec, "beam_pipeline_args")]
    assert all(not any("dask" in a for a in n.executor_spec.beam_pipeline_args) for n in others)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--beam-runner", "dask"], "--beam-runner dask needs --dask-address"),
    (["--dask-address", "tcp://127.0.0.1:8786"], "--dask-address needs --beam-runner dask"),
    (["--beam-runner", "dask", "--dask-address", "127.0.0.1:8786"],
     "--dask-address: '127.0.0.1:8786' must be a dask scheduler address"),
    (["--beam-runner", "dask", "--dask-address", "tcp://127.0.0.1:{free}"], "cannot connect within 2 s"),
    (["--beam-runner", "direct", "--beam-workers", "0"], "--beam-workers must be >= 1"),
])
def test_cli_bad_scheduler_is_one_line_exit_2(capsys, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT", 2.0)
    flags = [f.replace("{free}", str(_free_port())) for f in flags]
    out = tmp_path / "c.npz"
    assert_bad_input(capsys, *["centers", "--model", str(tmp_path / "v1"), "--data", str(tmp_path / "data"),
                              "--out", str(out)] + flags, match=message)
    assert not out.exists()
