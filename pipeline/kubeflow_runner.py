"""Compiles the lce-tf pipeline for Kubeflow Pipelines.

    python -m pipeline.kubeflow_runner --config cluster.json --out build/kubeflow
    lce-tf pipeline compile --config cluster.json --out build/kubeflow      (the same)

writes
    OUT/<pipeline_name>.json   KFP v2 PipelineJob (KubeflowV2DagRunner; Vertex AI Pipelines / KFP 2)
    OUT/<pipeline_name>.yaml   KFP v1 Argo workflow (KubeflowDagRunner, still supported by TFX 1.15)

Every component runs in `config.kubeflow_image` (build it from pipeline/Dockerfile). The data folders,
the pipeline root and the serving directory are paths the containers see; they are not checked here.
lce_tf reads and writes through the local file system API (image folders, model directories, indexes),
so give mounted paths: on Vertex AI Pipelines Cloud Storage is mounted at /gcs/<bucket>/ (Cloud Storage
FUSE), on Kubeflow use a shared volume. Beam
components get `config.beam_pipeline_args` (e.g. --runner=DataflowRunner --project=... --region=...
--temp_location=gs://...) plus `--setup_file=<kubeflow_setup_file>` so remote Beam workers install
lce_tf and the components from the image's copy of the project. The old model is resolved from the
cluster's metadata store: the Model of the latest push, as in the local runner (KFP v1); the latest
blessed Model for KFP v2, whose compiler accepts only TFX's stock resolver strategies (the same model
unless a run ended between its blessing and its push).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from pipeline.config import PipelineConfig, load_config

_DEPENDENCY_FLAGS = ("--setup_file", "--extra_package", "--requirements_file", "--sdk_container_image",
                     "--worker_harness_container_image")


def kubeflow_beam_args(config: PipelineConfig) -> list[str]:
    """The user's beam_pipeline_args, plus --setup_file of the image's project copy when none is given."""
    args = list(config.beam_pipeline_args)
    if config.kubeflow_setup_file and not any(a.startswith(_DEPENDENCY_FLAGS) for a in args):
        args.append(f"--setup_file={config.kubeflow_setup_file}")
    return args


def compile_v2(config: PipelineConfig, output_dir: str, *, check_paths: bool = False) -> str:
    """Writes the KFP v2 PipelineJob JSON; returns its path."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner  # pylint: disable=import-outside-toplevel

    from pipeline.pipeline import create_pipeline  # pylint: disable=import-outside-toplevel

    # The KFP v2 compiler translates only TFX's stock resolver strategies into its own queries.
    tfx_pipeline = create_pipeline(config, beam_pipeline_args=kubeflow_beam_args(config), check_paths=check_paths,
                                   old_model_strategy="blessed")
    filename = f"{config.pipeline_name}.json"
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image=config.kubeflow_image),
        output_dir=output_dir, output_filename=filename)
    runner.run(tfx_pipeline, write_out=True)
    return os.path.join(output_dir, filename)


def compile_v1(config: PipelineConfig, output_dir: str, *, check_paths: bool = False) -> str:
    """Writes the KFP v1 (Argo) workflow YAML; returns its path."""
    from tfx.orchestration.kubeflow import kubeflow_dag_runner  # pylint: disable=import-outside-toplevel

    from pipeline.pipeline import create_pipeline  # pylint: disable=import-outside-toplevel

    tfx_pipeline = create_pipeline(config, beam_pipeline_args=kubeflow_beam_args(config), check_paths=check_paths)
    filename = f"{config.pipeline_name}.yaml"
    runner = kubeflow_dag_runner.KubeflowDagRunner(
        config=kubeflow_dag_runner.KubeflowDagRunnerConfig(tfx_image=config.kubeflow_image),
        output_dir=output_dir, output_filename=filename)
    runner.run(tfx_pipeline)
    return os.path.join(output_dir, filename)


def compile_kubeflow(config: PipelineConfig, output_dir: str, *, formats: Sequence[str] = ("v2", "v1"),
                     check_paths: bool = False) -> dict[str, str]:
    """Validates the config and compiles it; returns {format: path written}.

    Args:
      config: the PipelineConfig (validated before anything is compiled; data paths are not checked
        unless `check_paths`, since they usually live on the cluster's storage).
      output_dir: where the files go (created).
      formats: "v2" (PipelineJob JSON) and/or "v1" (Argo YAML).

    Raises:
      ValueError: a bad config field or an unknown format.
    """
    unknown = sorted(set(formats) - {"v1", "v2"})
    if unknown or not formats:
        raise ValueError(f"formats: expected 'v1' and/or 'v2'; received {list(formats)!r}")
    config = config.resolved()
    config.validate(check_paths=check_paths)
    os.makedirs(output_dir, exist_ok=True)
    written = {}
    if "v2" in formats:
        written["v2"] = compile_v2(config, output_dir, check_paths=check_paths)
    if "v1" in formats:
        written["v1"] = compile_v1(config, output_dir, check_paths=check_paths)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the lce-tf pipeline for Kubeflow Pipelines.")
    parser.add_argument("--config", help="JSON or YAML file of PipelineConfig fields (defaults otherwise)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--out", default="build/kubeflow", help="output directory")
    parser.add_argument("--format", action="append", choices=("v1", "v2"), help="v2 (JSON) and/or v1 (YAML)")
    args = parser.parse_args(argv)
    try:
        written = compile_kubeflow(load_config(args.config, args.set), args.out, formats=args.format or ("v2", "v1"))
    except ValueError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    for fmt, path in written.items():
        print(f"wrote the KFP {fmt} pipeline to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
