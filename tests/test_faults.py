"""Faults of the local pipeline (issue 6, part 2): SIGKILL mid-run, and two runs on one pipeline root.

The e2e scenario runs the pipeline in subprocesses (`python -m pipeline.local_runner --config FILE`,
each in its own process group) on one pipeline root, on a tiny synthetic dataset (12 px, small CNN,
dimension 8, 2 epochs at batch 8: 72 steps, as 18 left the embeddings collapsed, which the LceTrainer refuses
to export (lce_tf.collapse); floors 0 so that the model is blessed and the index and the push happen):

  run A  SIGKILLed (the whole process group) while the LceTrainer trains;
  run B  the rerun: ImageFolderExampleGen comes from the cache, the trainer trains anew; SIGKILLed while
         the IndexBuilder runs (the Pusher runs after it: nothing is pushed yet);
  run C  the rerun completes: example gen, trainer and validator from the cache (run B's model: blessed
         but not pushed, so it is not C's old model), the index is built and the model pushed, once.
         While C holds the pipeline root, run D starts on the same root and refuses at once (exit
         code 2, one line naming the root and C's pid).

Each rerun marks the execution its killed predecessor left RUNNING as CANCELED. Executions are read
back with ml-metadata's API (node context `lce-tf.<node id>`), in id order, which is run order here.
Cheap tests of the lock itself (in-process holder, the CLI's refusal, a SIGKILLed holder) run without
TFX; the Pusher's rerun after a kill between its copy and TFX's record of it is simulated by running
its executor twice.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import PipelineConfig

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_NAME = "lce-tf"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("faults_data")
    build_synthetic_dataset(str(root / "data"), num_train_classes=48, num_test_classes=8, images_per_class=6,
                            num_query_per_class=2, size=12, seed=0, progress=None)
    return root / "data"


def _config_file(data, root, path, **overrides):
    """A JSON config of a first run (v1, independent) that is always blessed (floors 0)."""
    values = dict(train_dir=str(data / "train"), query_dir=str(data / "query"), gallery_dir=str(data / "gallery"),
                  pipeline_root=str(root), pipeline_name=PIPELINE_NAME, mode="independent", version="v1",
                  architecture="small_cnn", embedding_dim=8, epochs=2, batch_size=8, min_top1=0.0, min_map=0.0,
                  beam_workers=1)
    values.update(overrides)
    PipelineConfig.from_dict(values).resolved().validate()
    path.write_text(json.dumps(values))
    return str(path)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _start(config_file, log_path):
    """`python -m pipeline.local_runner --config FILE` in a new session (its own process group)."""
    log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.local_runner", "--config", config_file],
                            cwd=PROJECT_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def _tail(log_path, lines=25):
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _store(metadata_path):
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2

    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = metadata_path
    connection.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(connection)


def _executions(metadata_path):
    """{node id: [{"id", "state", "outputs": {key: [artifact id]}}]} in execution id order."""
    from ml_metadata.proto import metadata_store_pb2

    store = _store(metadata_path)
    out = {}
    for context in store.get_contexts_by_type("node"):
        if not context.name.startswith(f"{PIPELINE_NAME}."):
            continue
        rows = []
        for execution in sorted(store.get_executions_by_context(context.id), key=lambda e: e.id):
            outputs = {}
            for event in store.get_events_by_execution_ids([execution.id]):
                if event.type == metadata_store_pb2.Event.OUTPUT:
                    outputs.setdefault(event.path.steps[0].key, []).append(event.artifact_id)
            rows.append({"id": execution.id, "outputs": outputs,
                         "state": metadata_store_pb2.Execution.State.Name(execution.last_known_state)})
        out[context.name[len(PIPELINE_NAME) + 1:]] = rows
    return out


def _states(executions, node):
    return [row["state"] for row in executions.get(node, [])]


def _kill_when(proc, log_path, metadata_path, node, log_marker=None, timeout=300):
    """SIGKILLs proc's process group once `node` has a RUNNING execution (and log_marker is logged).

    Returns:
      The executions read back right after the kill.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {node} ran:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{node} did not start within {timeout} s:\n{_tail(log_path)}")
        marker_seen = log_marker is None or log_marker in open(log_path, encoding="utf-8", errors="replace").read()
        if marker_seen and os.path.isfile(metadata_path):
            try:
                running = "RUNNING" in _states(_executions(metadata_path), node)
            except Exception:  # pylint: disable=broad-except  (store being created, or busy: poll again)
                running = False
            if running:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return _executions(metadata_path)
        time.sleep(0.1)


def _serving_entries(serving_dir):
    return sorted(os.listdir(serving_dir)) if os.path.isdir(serving_dir) else []


@pytest.fixture(scope="module")
def killed_runs(tiny_data, tmp_path_factory):
    """Runs A (killed in training), B (killed in the index build), C (completes) and D (refused)."""
    work = tmp_path_factory.mktemp("faults")
    root = work / "root"
    config_file = _config_file(tiny_data, root, work / "config.json")
    config = PipelineConfig.from_file(config_file).resolved()
    out = {"config": config, "logs": {}, "seconds": {}}

    def start(name):
        out["logs"][name] = str(work / f"run_{name}.log")
        return _start(config_file, out["logs"][name])

    start_time = time.monotonic()
    proc = start("A")
    out["after_A"] = _kill_when(proc, out["logs"]["A"], config.metadata_path, "LceTrainer",
                                log_marker="LceTrainer: v1 small_cnn D=8")
    out["serving_after_A"] = _serving_entries(config.serving_dir)
    out["seconds"]["A"] = time.monotonic() - start_time

    start_time = time.monotonic()
    proc = start("B")
    out["after_B"] = _kill_when(proc, out["logs"]["B"], config.metadata_path, "IndexBuilder")
    out["serving_after_B"] = _serving_entries(config.serving_dir)
    out["seconds"]["B"] = time.monotonic() - start_time

    start_time = time.monotonic()
    proc = start("C")
    lock_file = os.path.join(config.pipeline_root, ".lock")
    deadline = time.monotonic() + 120
    while not (os.path.isfile(lock_file) and open(lock_file, encoding="ascii").read().strip() == str(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, _tail(out["logs"]["C"])
        time.sleep(0.05)
    refused_start = time.monotonic()
    refused = subprocess.run([sys.executable, "-m", "pipeline.local_runner", "--config", config_file],
                             cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    out["refused"] = {"returncode": refused.returncode, "stderr": refused.stderr, "stdout": refused.stdout,
                      "seconds": time.monotonic() - refused_start, "holder_pid": proc.pid,
                      "holder_running": proc.poll() is None}
    out["returncode_C"] = proc.wait(timeout=600)
    out["seconds"]["C"] = time.monotonic() - start_time
    out["after_C"] = _executions(config.metadata_path)
    out["serving_after_C"] = _serving_entries(config.serving_dir)
    print("fault scenario seconds:", {k: round(v, 1) for k, v in out["seconds"].items()})
    return out


@pytest.mark.e2e
def test_kill_during_training_leaves_the_trainer_unfinished_and_nothing_pushed(killed_runs):
    after = killed_runs["after_A"]
    assert _states(after, "ImageFolderExampleGen") == ["COMPLETE"]
    assert _states(after, "LceTrainer") == ["RUNNING"], after  # killed inside the trainer
    assert after["LceTrainer"][0]["outputs"] == {}  # nothing was published for it
    for node in ("CompatibilityValidator", "IndexBuilder", "Pusher"):
        assert _states(after, node) == [], node
    assert killed_runs["serving_after_A"] == []


@pytest.mark.e2e
def test_rerun_after_kill_in_training_reuses_finished_components_and_retrains(killed_runs):
    after = killed_runs["after_B"]
    assert _states(after, "ImageFolderExampleGen") == ["COMPLETE", "CACHED"]
    # Run B marked run A's orphan CANCELED (it was RUNNING above) and trained a model of its own.
    assert _states(after, "LceTrainer") == ["CANCELED", "COMPLETE"]
    assert after["ImageFolderExampleGen"][1]["outputs"] == after["ImageFolderExampleGen"][0]["outputs"]
    assert _states(after, "CompatibilityValidator") == ["COMPLETE"]
    assert _states(after, "IndexBuilder") == ["RUNNING"], after  # killed inside the index build
    assert after["IndexBuilder"][0]["outputs"] == {}
    assert _states(after, "Pusher") == []
    assert killed_runs["serving_after_B"] == []


@pytest.mark.e2e
def test_rerun_after_kill_in_index_build_completes_from_the_cache_and_pushes_once(killed_runs):
    from pipeline.local_runner import run_summary

    assert killed_runs["returncode_C"] == 0, _tail(killed_runs["logs"]["C"])
    after_b, after = killed_runs["after_B"], killed_runs["after_C"]
    assert _states(after, "ImageFolderExampleGen") == ["COMPLETE", "CACHED", "CACHED"]
    assert _states(after, "LceTrainer") == ["CANCELED", "COMPLETE", "CACHED"]
    assert _states(after, "CompatibilityValidator") == ["COMPLETE", "CACHED"]
    assert _states(after, "IndexBuilder") == ["CANCELED", "COMPLETE"]
    assert _states(after, "Pusher") == ["COMPLETE"]
    # The cached executions point at run B's artifacts: the model trained by B is the one indexed and pushed.
    for node in ("LceTrainer", "CompatibilityValidator"):
        assert after[node][-1]["outputs"] == after_b[node][-1]["outputs"], node
    summary = run_summary(killed_runs["config"])
    [model_id] = after_b["LceTrainer"][-1]["outputs"]["model"]
    assert summary["nodes"]["LceTrainer"]["outputs"]["model"][0]["id"] == model_id
    assert summary["verdict"] == "BLESSED" and summary["pushed"]
    # Run B's candidate was blessed but never pushed: it is not run C's old model (the validator's verdict
    # above came from the cache; had the resolver picked the candidate, it would be judged against itself).
    assert summary["nodes"]["latest_blessed_model_resolver"]["outputs"].get("model", []) == []
    with open(summary["metrics"], encoding="utf-8") as f:
        assert json.load(f)["old"] is None
    assert summary["index_dir"] and os.path.isfile(os.path.join(summary["index_dir"], "index.json"))

    # Exactly one pushed version, complete, of that model (no hidden temporary left by the kills).
    serving_dir = killed_runs["config"].serving_dir
    [version] = killed_runs["serving_after_C"]
    assert summary["pushed_destination"] == os.path.join(serving_dir, version)
    with open(os.path.join(serving_dir, version, "lce_tf_model.json"), encoding="utf-8") as f:
        assert json.load(f)["model_id"] == summary["model_id"]


@pytest.mark.e2e
def test_store_has_one_pushed_model_and_no_running_execution(killed_runs):
    from ml_metadata.proto import metadata_store_pb2

    store = _store(killed_runs["config"].metadata_path)
    pushed = store.get_artifacts_by_type("PushedModel")
    assert [a.custom_properties["pushed"].int_value for a in pushed] == [1]
    states = [e.last_known_state for e in store.get_executions()]
    assert metadata_store_pb2.Execution.RUNNING not in states and metadata_store_pb2.Execution.NEW not in states
    assert states.count(metadata_store_pb2.Execution.CANCELED) == 2  # the two killed executions
    runs = store.get_contexts_by_type("pipeline_run")
    assert len(runs) == 3  # A, B, C; the refused run D left no trace


@pytest.mark.e2e
def test_second_run_on_the_same_root_refuses_at_once(killed_runs):
    refused = killed_runs["refused"]
    root = killed_runs["config"].pipeline_root
    assert refused["holder_running"]  # run C was still running when D gave up
    assert refused["returncode"] == 2, refused
    lines = refused["stderr"].strip().splitlines()
    assert lines == [f"pipeline: error: pipeline_root: {root} is in use by another run (pid {refused['holder_pid']} "
                     f"holds {root}/.lock); wait for it to finish or use another pipeline_root"], refused["stderr"]
    assert refused["seconds"] < 20  # before importing TFX
    assert killed_runs["returncode_C"] == 0


# --------------------------------------------------------------------------------------------------
# The lock itself (no TFX)
# --------------------------------------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    from pipeline.local_runner import PipelineBusyError, pipeline_lock

    root = str(tmp_path / "root")
    with pipeline_lock(root) as path:
        assert path == os.path.join(root, ".lock")
        assert open(path, encoding="ascii").read() == f"{os.getpid()}\n"
        with pytest.raises(PipelineBusyError) as info:
            with pipeline_lock(root):
                pass
        assert str(info.value) == (f"pipeline_root: {root} is in use by another run (pid {os.getpid()} holds "
                                   f"{path}); wait for it to finish or use another pipeline_root")
    assert open(path, encoding="ascii").read() == ""  # released: no pid left behind
    with pipeline_lock(root):
        pass


def test_cli_and_runner_refuse_while_the_root_is_locked(tiny_data, tmp_path, capsys):
    from lce_tf import cli
    from pipeline import local_runner

    root = tmp_path / "root"
    config_file = _config_file(tiny_data, root, tmp_path / "config.json")
    with local_runner.pipeline_lock(str(root)):
        code = cli.main(["pipeline", "run", "--config", config_file])
        err = capsys.readouterr().err.strip()
        assert code == cli.EXIT_BAD_INPUT == 2
        assert err == (f"lce-tf: error: pipeline_root: {root} is in use by another run (pid {os.getpid()} holds "
                       f"{root}/.lock); wait for it to finish or use another pipeline_root")
        assert local_runner.main(["--config", config_file]) == 2
        assert capsys.readouterr().err.startswith(f"pipeline: error: pipeline_root: {root} is in use")
    assert sorted(os.listdir(root)) == [".lock"]  # the refused runs wrote nothing


def test_sigkilled_holder_releases_the_lock(tmp_path):
    from pipeline.local_runner import pipeline_lock

    root = str(tmp_path / "root")
    code = ("import sys, time; from pipeline.local_runner import pipeline_lock\n"
            f"with pipeline_lock({root!r}):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from pipeline.local_runner import PipelineBusyError

        with pytest.raises(PipelineBusyError, match=f"pid {holder.pid} holds"):
            with pipeline_lock(root):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with pipeline_lock(root):  # the kernel released the killed holder's lock
        pass


# --------------------------------------------------------------------------------------------------
# The Pusher's rerun after a kill between its copy and TFX's record of it
# --------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_pusher_rerun_records_the_version_it_already_pushed(tmp_path):
    from google.protobuf import json_format
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts

    from components.atomic_pusher.executor import Executor

    def model(name, model_id):
        artifact = standard_artifacts.Model()
        artifact.uri = str(tmp_path / name)
        serving = tmp_path / name / "Format-Serving"
        serving.mkdir(parents=True)
        (serving / "lce_tf_model.json").write_text(json.dumps({"model_id": model_id}))
        (serving / "saved_model.pb").write_bytes(b"graph")
        return artifact

    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", 1)
    serving_dir = tmp_path / "serving"
    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=str(serving_dir)))
    properties = {"push_destination": json_format.MessageToJson(destination)}
    pushes = []

    def push(artifact):
        pushed = standard_artifacts.PushedModel()
        pushed.uri = str(tmp_path / f"pushed_{len(pushes)}")
        Executor().Do({"model": [artifact], "model_blessing": [blessing]}, {"pushed_model": [pushed]}, properties)
        assert pushed.get_int_custom_property("pushed") == 1
        pushes.append(pushed.get_string_custom_property("pushed_destination"))
        return sorted(os.listdir(serving_dir))

    v1, v2 = model("v1", "v1-aaaa"), model("v2", "v2-bbbb")
    # No sleeps: pushes within one second get increasing versions (components.atomic_pusher.next_version).
    [first] = push(v1)
    assert push(v1) == [first] and pushes[1] == pushes[0]  # the rerun records the copy the killed run made
    assert len(push(v2)) == 2
    versions = push(v1)  # v1 again after v2 (a rollback): a new version, the latest
    assert len(versions) == 3 and pushes[-1] == str(serving_dir / max(versions, key=int))
    assert len(set(pushes[1:])) == 3  # three distinct versions
    with open(serving_dir / max(versions, key=int) / "lce_tf_model.json", encoding="utf-8") as f:
        assert json.load(f)["model_id"] == "v1-aaaa"
