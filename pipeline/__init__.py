"""The lce-tf TFX pipeline: one runner-agnostic `create_pipeline(config)` plus local and Kubeflow runners.

    config.py           PipelineConfig: the one typed configuration (real defaults, validated up front)
    pipeline.py         create_pipeline(config) -> tfx Pipeline
    local_runner.py     LocalDagRunner, SQLite metadata under the pipeline root, Beam multi-processing
    kubeflow_runner.py  compile for Kubeflow Pipelines (KFP v2 JSON; v1 Argo YAML)

Importing this package does not import tfx.
"""
