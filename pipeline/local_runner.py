"""Runs the lce-tf pipeline locally: LocalDagRunner, SQLite metadata under the pipeline root, Beam
DirectRunner in multi-processing mode.

    python -m pipeline.local_runner --config my_config.json --set mode=lce --set version=v2
    lce-tf pipeline run --config my_config.json            (the same, from the installed command)

Components run one after the other in this process; Beam components (the ClassCenterExtractor, and
StatisticsGen when enabled) fan their work out to `config.beam_workers` worker processes. The worker
processes import `components.*` to unpickle the DoFns, so the project root is put on their PYTHONPATH.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

from pipeline.config import PipelineConfig, load_config

_LOG = logging.getLogger(__name__)


def local_beam_args(config: PipelineConfig) -> list[str]:
    """DirectRunner multi-processing flags (+ the project's setup.py), then the user's beam_pipeline_args.

    A dependency flag (--setup_file) keeps TFX from re-packaging its own installation as an sdist before
    every Beam component (tfx.utils.dependency_utils does that when no such flag is given).
    """
    args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
            f"--direct_num_workers={int(config.beam_workers)}"]
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


def run_local(config: PipelineConfig) -> float:
    """Validates the config and runs the pipeline once with the LocalDagRunner.

    Returns:
      The run's wall time in seconds.

    Raises:
      ValueError: a bad config field (before any component runs).
      RuntimeError: a component failed (TFX's own error, re-raised by the runner).
    """
    _export_project_path()
    tfx_pipeline = build_local_pipeline(config)  # validates first
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    LocalDagRunner().run(tfx_pipeline)
    return time.perf_counter() - start


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
    seconds = run_local(config)
    print(f"pipeline {config.pipeline_name} ({config.version}, mode {config.mode}) finished in {seconds:.0f} s; "
          f"metadata {config.metadata_path}, pushed models under {config.serving_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
