"""Runs the lce-tf pipeline locally: LocalDagRunner, SQLite metadata under the pipeline root, Beam
DirectRunner in multi-processing mode.

    python -m pipeline.local_runner --config my_config.json --set mode=lce --set version=v2
    lce-tf pipeline run --config my_config.json            (the same, from the installed command)

Components run one after the other in this process; Beam components (the ClassCenterExtractor, and
StatisticsGen when enabled) fan their work out to `config.beam_workers` worker processes. The worker
processes import `components.*` to unpickle the DoFns, so the project root is put on their PYTHONPATH.

One run at a time per pipeline root: a run holds an exclusive lock on PIPELINE_ROOT/.lock
(`pipeline_lock`), and a second run on the same root refuses at once (`PipelineBusyError`, exit code 2,
one line naming the root and the holder's pid) instead of writing the same SQLite store and serving
directory beside the first. The kernel drops the lock when the holder exits however it ends, SIGKILL
included, so a killed run leaves no stale lock. Holding the lock, a run marks the executions that a
killed earlier run left RUNNING as CANCELED (`cancel_abandoned_executions`); the rerun then reuses the
cached outputs of the components that had finished and runs the others anew (new execution, new output
directories: a half-written output of the killed run is never read).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import time
from typing import Iterator, Optional, Sequence

from lce_tf.beam.options import direct_beam_args
from pipeline.config import PipelineConfig, _is_uri, load_config

_LOG = logging.getLogger(__name__)


def local_beam_args(config: PipelineConfig) -> list[str]:
    """DirectRunner multi-processing flags (+ the project's setup.py), then the user's beam_pipeline_args.

    `--runner=FnApiRunner` names the engine of Beam's Python DirectRunner directly: Beam 2.74's
    DirectRunner first tries the Prism runner, which downloads a binary from GitHub (no network here:
    it fails after building two sdists, then falls back to the FnApiRunner anyway).
    `--direct_running_mode=multi_processing --direct_num_workers=N` are the DirectRunner's own options (N = 1:
    `in_memory`, in this process).
    A dependency flag (--setup_file) keeps TFX from re-packaging its own installation as an sdist before
    every Beam component (tfx.utils.dependency_utils does that when no such flag is given); the
    FnApiRunner stages nothing.
    """
    args = direct_beam_args(config.beam_workers)
    setup_file = os.path.join(_project_root(), "setup.py")
    dependency_flags = ("--setup_file", "--extra_package", "--requirements_file", "--sdk_container_image",
                        "--worker_harness_container_image")
    if os.path.isfile(setup_file) and not any(a.startswith(dependency_flags) for a in config.beam_pipeline_args):
        args.append(f"--setup_file={setup_file}")
    return args + list(config.beam_pipeline_args)


def _project_root() -> str:
    import components  # pylint: disable=import-outside-toplevel

    return os.path.dirname(os.path.dirname(os.path.abspath(components.__file__)))


def _export_project_path() -> None:
    """Makes `components` and `pipeline` importable by Beam's worker subprocesses."""
    root = _project_root()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def build_local_pipeline(config: PipelineConfig):
    """The pipeline with SQLite metadata at config.metadata_path and the local Beam flags."""
    from tfx.orchestration import metadata  # pylint: disable=import-outside-toplevel

    from pipeline.pipeline import create_pipeline  # pylint: disable=import-outside-toplevel

    resolved = config.resolved()
    resolved.validate()
    os.makedirs(os.path.dirname(resolved.metadata_path), exist_ok=True)
    return create_pipeline(resolved,
                           metadata_connection_config=metadata.sqlite_metadata_connection_config(
                               resolved.metadata_path),
                           beam_pipeline_args=local_beam_args(resolved))


LOCK_FILE = ".lock"  # PIPELINE_ROOT/.lock: held (flock) by the run in progress, holds its pid


class PipelineBusyError(OSError):
    """Another run holds the pipeline root's lock: this run refuses to start (nothing was written)."""


@contextlib.contextmanager
def pipeline_lock(pipeline_root: str) -> Iterator[Optional[str]]:
    """Holds the exclusive run lock of a local pipeline root for the duration of the block.

    flock(LOCK_EX | LOCK_NB) on PIPELINE_ROOT/.lock, which then records the holder's pid. The lock
    belongs to the open file, so the kernel releases it when the holder exits in any way (SIGKILL
    included): there is no stale lock to clean up. The file itself stays (removing a lock file races
    with the next run opening it). A remote root (gs://...) is not locked.

    Args:
      pipeline_root: the resolved (absolute) pipeline root.

    Yields:
      The lock file's path, or None for a remote root.

    Raises:
      PipelineBusyError: one line naming the root, the lock file and the holder's pid, when another
        run holds the lock.
    """
    if _is_uri(pipeline_root):
        _LOG.warning("pipeline_root %s is remote: runs on it are not locked against each other", pipeline_root)
        yield None
        return
    os.makedirs(pipeline_root, exist_ok=True)
    path = os.path.join(pipeline_root, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise PipelineBusyError(f"pipeline_root: {pipeline_root} is in use by another run (pid {holder} holds "
                                    f"{path}); wait for it to finish or use another pipeline_root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still holding the lock: nobody reads a pid of a finished run
    finally:
        os.close(fd)  # releases the lock


def cancel_abandoned_executions(config: PipelineConfig) -> list[int]:
    """Marks the executions of this pipeline left NEW or RUNNING by an earlier run as CANCELED.

    Call it only while holding `pipeline_lock`: no other run is then in progress on this pipeline root,
    so an execution still NEW or RUNNING belongs to a run whose process ended without finishing it
    (killed, power loss). Left as they are they would claim forever that they are running. TFX never
    reuses them (a new run has its own pipeline_run context, and the cache only serves COMPLETE
    executions); their output directories are left on disk, unreferenced.

    Returns:
      The ids of the executions marked CANCELED.
    """
    import ml_metadata as mlmd  # pylint: disable=import-outside-toplevel
    from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

    config = config.resolved()
    if not os.path.isfile(config.metadata_path):
        return []
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = config.metadata_path
    connection.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE
    store = mlmd.MetadataStore(connection)
    pipeline_context = store.get_context_by_type_and_name("pipeline", config.pipeline_name)
    if pipeline_context is None:
        return []
    active = (metadata_store_pb2.Execution.NEW, metadata_store_pb2.Execution.RUNNING)
    abandoned = [e for e in store.get_executions_by_context(pipeline_context.id) if e.last_known_state in active]
    if not abandoned:
        return []
    types = {t.id: t.name for t in store.get_execution_types()}
    for execution in abandoned:
        _LOG.warning("execution %d (%s) was left %s by a run that ended without finishing it: marked CANCELED",
                     execution.id, types.get(execution.type_id, "?"),
                     metadata_store_pb2.Execution.State.Name(execution.last_known_state))
        execution.last_known_state = metadata_store_pb2.Execution.CANCELED
    store.put_executions(abandoned)
    return [e.id for e in abandoned]


def run_local(config: PipelineConfig) -> float:
    """Validates the config and runs the pipeline once with the LocalDagRunner, holding `pipeline_lock`.

    Returns:
      The run's wall time in seconds.

    Raises:
      ValueError: a bad config field (before any component runs).
      PipelineBusyError: another run holds the pipeline root (before any component runs; an OSError).
      RuntimeError: a component failed (TFX's own error, re-raised by the runner).
    """
    _export_project_path()
    resolved = config.resolved()
    resolved.validate()  # a bad field fails before the lock file (or anything else) is written
    with pipeline_lock(resolved.pipeline_root):  # before importing tfx: a second run refuses at once
        tfx_pipeline = build_local_pipeline(resolved)
        from tfx.orchestration.local.local_dag_runner import LocalDagRunner  # pylint: disable=import-outside-toplevel

        cancel_abandoned_executions(resolved)
        start = time.perf_counter()
        LocalDagRunner().run(tfx_pipeline)
        return time.perf_counter() - start


def _store(metadata_path: str):
    import ml_metadata as mlmd  # pylint: disable=import-outside-toplevel
    from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(metadata_path):
        raise ValueError(f"metadata_path: {metadata_path} does not exist (the pipeline has not run yet)")
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = metadata_path
    connection.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(connection)


def run_summary(config: PipelineConfig, run_id: Optional[str] = None) -> dict:
    """What one run of the pipeline did and produced, read back from its metadata store (ml-metadata API).

    Args:
      config: the pipeline's config (pipeline_name, metadata_path).
      run_id: the pipeline_run context name; None = the latest run.

    Returns:
      {"run_id", "nodes": {node id: {"state": "COMPLETE" | "CACHED" | ..., "execution_id",
      "outputs": {key: [{"id", "uri", "properties"}]}}}, "verdict", "route" (the route that blessed:
      "backward", "forward", "first-model"; "" when refused), "blessing_dir", "report", "metrics", "pushed",
      "pushed_destination", "gallery_transform" (shipped with the push on a forward blessing), "model_dir",
      "model_id", "transformation_dir", "index_dir", "index_built_from"}.
    """
    from ml_metadata.proto import metadata_store_pb2  # pylint: disable=import-outside-toplevel

    config = config.resolved()
    store = _store(config.metadata_path)
    pipeline_context = store.get_context_by_type_and_name("pipeline", config.pipeline_name)
    if pipeline_context is None:
        raise ValueError(f"pipeline_name: no pipeline {config.pipeline_name!r} in {config.metadata_path}")
    executions = store.get_executions_by_context(pipeline_context.id)
    contexts_of = {e.id: store.get_contexts_by_execution(e.id) for e in executions}
    types = {t.id: t.name for t in store.get_context_types()}
    run_of = {e.id: next((c.name for c in contexts_of[e.id] if types[c.type_id] == "pipeline_run"), None)
              for e in executions}
    if run_id is None:
        latest = max((e for e in executions if run_of[e.id]), key=lambda e: e.id, default=None)
        if latest is None:
            raise ValueError(f"pipeline {config.pipeline_name!r} has no run in {config.metadata_path}")
        run_id = run_of[latest.id]
    state_names = metadata_store_pb2.Execution.State.Name
    nodes: dict = {}
    prefix = f"{config.pipeline_name}."
    for execution in sorted((e for e in executions if run_of[e.id] == run_id), key=lambda e: e.id):
        node = next((c.name[len(prefix):] for c in contexts_of[execution.id]
                     if types[c.type_id] == "node" and c.name.startswith(prefix)), str(execution.id))
        outputs: dict = {}
        events = [ev for ev in store.get_events_by_execution_ids([execution.id])
                  if ev.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([ev.artifact_id for ev in events])}
        for ev in events:
            key = ev.path.steps[0].key if ev.path.steps else ""
            artifact = artifacts[ev.artifact_id]
            properties = {k: getattr(v, v.WhichOneof("value")) for k, v in artifact.custom_properties.items()
                          if v.WhichOneof("value") in ("int_value", "double_value", "string_value")}
            outputs.setdefault(key, []).append({"id": artifact.id, "uri": artifact.uri, "properties": properties})
        nodes[node] = {"state": state_names(execution.last_known_state), "execution_id": execution.id,
                       "outputs": outputs}

    def first_output(node_id: str, key: str) -> Optional[dict]:
        items = nodes.get(node_id, {}).get("outputs", {}).get(key) or []
        return items[0] if items else None

    from components import artifacts as layout  # pylint: disable=import-outside-toplevel
    from pipeline import pipeline as ids  # pylint: disable=import-outside-toplevel

    summary: dict = {"run_id": run_id, "nodes": nodes, "verdict": None, "route": None, "blessing_dir": None,
                     "report": None, "metrics": None, "pushed": False, "pushed_destination": None,
                     "gallery_transform": None, "model_dir": None, "model_id": None, "transformation_dir": None,
                     "index_dir": None, "index_built_from": None}
    blessing = first_output(ids.VALIDATOR_ID, "blessing")
    if blessing:
        summary["blessing_dir"] = blessing["uri"]
        summary["verdict"] = "BLESSED" if blessing["properties"].get(layout.BLESSED_PROPERTY) == 1 else "NOT_BLESSED"
        summary["route"] = blessing["properties"].get(layout.BLESSED_ROUTE_PROPERTY)
        summary["report"] = os.path.join(blessing["uri"], "report.html")
        summary["metrics"] = os.path.join(blessing["uri"], "metrics.json")
    model = first_output(ids.TRAINER_ID, "model")
    if model:
        summary["model_dir"] = os.path.join(model["uri"], "Format-Serving")
        summary["model_id"] = model["properties"].get("lce_model_id")
    pushed = first_output(ids.PUSHER_ID, "pushed_model")
    if pushed:
        summary["pushed"] = pushed["properties"].get("pushed") == 1
        summary["pushed_destination"] = pushed["properties"].get("pushed_destination")
        summary["gallery_transform"] = pushed["properties"].get("gallery_transform")
    transformation = first_output(ids.TRANSFORM_FITTER_ID, "transformation")
    if transformation:
        summary["transformation_dir"] = transformation["properties"].get(layout.TRANSFORMATION_DIR_PROPERTY)
    index = first_output(ids.INDEX_BUILDER_ID, "index")
    if index and index["properties"].get(layout.BUILT_PROPERTY) == 1:
        summary["index_dir"] = index["properties"].get("index_dir")
        summary["index_built_from"] = index["properties"].get("built_from")
    return summary


def format_run_summary(summary: dict) -> str:
    """A few lines for people: node states, verdict, where the model, report, index and push went."""
    lines = [f"run {summary['run_id']}:"]
    lines += [f"  {node:<32} {info['state']}" for node, info in summary["nodes"].items()]
    if summary["metrics"] and os.path.isfile(summary["metrics"]):
        import json  # pylint: disable=import-outside-toplevel

        with open(summary["metrics"], encoding="utf-8") as f:
            metrics = json.load(f)
        lines += ["", metrics.get("table", ""), ""] + [f"  {r}" for r in metrics.get("reasons", [])]
    route = f" through the {summary['route']} route" if summary.get("route") not in (None, "", "first-model") else ""
    lines.append(f"verdict: {summary['verdict']}{route}")
    lines.append(f"model {summary['model_id']}: {summary['model_dir']}")
    if summary.get("transformation_dir"):
        lines.append(f"fitted transformation T12 (old -> new): {summary['transformation_dir']}")
    lines.append(f"report: {summary['report']}")
    pushed = summary["pushed_destination"] if summary["pushed"] else "no (not blessed)"
    if summary.get("gallery_transform"):
        pushed += f" (with its gallery transformation {summary['gallery_transform']})"
    lines.append(f"pushed: {pushed}")
    built = f" ({summary['index_built_from']})" if summary.get("index_built_from") else ""
    lines.append(f"gallery index: {summary['index_dir'] or 'not built (model not blessed)'}{built}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the lce-tf pipeline locally (LocalDagRunner).")
    parser.add_argument("--config", help="JSON or YAML file of PipelineConfig fields (defaults otherwise)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        config = load_config(args.config, args.set).resolved().validate()
    except ValueError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    try:
        seconds = run_local(config)
    except PipelineBusyError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    print(format_run_summary(run_summary(config)))
    print(f"pipeline {config.pipeline_name} ({config.version}, mode {config.mode}) finished in {seconds:.0f} s; "
          f"metadata {config.metadata_path}, pushed models under {config.serving_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
