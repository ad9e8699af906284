"""create_pipeline(config): the runner-agnostic lce-tf TFX pipeline.

    ImageFolderExampleGen ──> (StatisticsGen ──> SchemaGen)                        [config.statistics]
          │ examples (train / query / gallery)
          ├──────────────> ClassCenterExtractor (Beam) <── old model ─┐           [lce, lce-instance, lce-transform, bct]
          │                       │ class_centers                     │
          ├──────────────> LceTrainer (mode) <────────────────────────┤ old model: latest pushed Model
          │                       │ model                             │ (Resolver, LatestPushedModelStrategy)
          ├──────────────> GalleryTransformFitter <───────────────────┤ and its served index, an imported
          │                       │ transformation T12 (old -> new)   │ directory, or none
          ├──> IndependentTrainer (new*) ──┐                          │
          │                       │        │ independent_model        │
          ├──────────────> CompatibilityValidator <───────────────────┘
          │                       │ blessing (blessed 1/0, blessed_route backward|forward, BLESSED/NOT_BLESSED,
          │                       │ metrics.json, report.html with both routes)
          ├──────────────> IndexBuilder (blessed models only: backward -> the gallery embedded by the model;
          │                       │       forward -> the served index upgraded through T12, no image read;
          │                       │       ScaNN, or a Milvus collection: index_backend)
          │                       │
          └─ Pusher (stock, with components.atomic_pusher's executor: copies the model, and on a forward
             blessing its transformation, to SERVING_DIR/<unix time> all-or-nothing, only when blessed)

The old model: with `old_model = "latest"` a Resolver picks the Model of the latest push
(`pipeline.latest_pushed_model.LatestPushedModelStrategy`), i.e. the model serving holds. Not merely the
latest blessed one: a run killed between the validator's blessing and the push would otherwise make its
unpushed candidate the old model of the rerun. KFP v2 accepts only TFX's stock strategies: compiled for
it, the Resolver picks the latest Model whose ModelBlessing says blessed = 1 (`old_model_strategy`
"blessed"), which is the same model unless a push failed after its blessing. On the first run there is none: the old
model channel is empty at run time, the trainer then trains independently and the validator blesses on
the model's own accuracy (the floors). The same pipeline object compiles for Kubeflow.

tfx is imported inside `create_pipeline` (importing this module stays cheap).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lce_tf import modes
from lce_tf.beam.options import dask_beam_args
from pipeline.config import OLD_MODEL_LATEST, OLD_MODEL_NONE, PipelineConfig

# Node ids (stable: they name the nodes in the metadata store and the Kubeflow spec).
EXAMPLE_GEN_ID = "ImageFolderExampleGen"
STATISTICS_GEN_ID = "StatisticsGen"
SCHEMA_GEN_ID = "SchemaGen"
OLD_MODEL_RESOLVER_ID = "latest_blessed_model_resolver"  # historical name, kept (also resolves pushes)
OLD_MODEL_IMPORTER_ID = "old_model_importer"
SERVED_INDEX_RESOLVER_ID = "latest_index_resolver"  # KFP v2 only (the local runner resolves it with the old model)
CENTERS_ID = "ClassCenterExtractor"
TRAINER_ID = "LceTrainer"
TRANSFORM_FITTER_ID = "GalleryTransformFitter"
INDEPENDENT_TRAINER_ID = "IndependentTrainer"
VALIDATOR_ID = "CompatibilityValidator"
INDEX_BUILDER_ID = "IndexBuilder"
PUSHER_ID = "Pusher"


OLD_MODEL_STRATEGIES = ("pushed", "blessed")


def _old_model_nodes(config: PipelineConfig, strategy: str = "pushed") -> tuple[list, Any, Any]:
    """(nodes, old model channel, served index channel) of the old model; ([], None, None) when 'none'.

    "pushed": one Resolver (LatestPushedModelStrategy) gives the latest pushed Model and the index built
    for it. "blessed" (KFP v2, stock strategies only): LatestBlessedModelStrategy for the model and
    LatestArtifactStrategy for the index (the IndexBuilder checks that it is built and in T12's source
    space, else it embeds the gallery). An imported old model directory has no served index.
    """
    from tfx.dsl.components.common import importer, resolver
    from tfx.dsl.input_resolution.strategies.latest_artifact_strategy import LatestArtifactStrategy
    from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import LatestBlessedModelStrategy
    from tfx.types import channel, standard_artifacts

    from components.artifacts import RetrievalIndex
    from pipeline.latest_pushed_model import LatestPushedModelStrategy

    if strategy not in OLD_MODEL_STRATEGIES:
        raise ValueError(f"old_model_strategy: expected one of {', '.join(OLD_MODEL_STRATEGIES)}; received {strategy!r}")
    if config.old_model == OLD_MODEL_NONE:
        return [], None, None
    if config.old_model == OLD_MODEL_LATEST:
        if strategy == "pushed":
            node = resolver.Resolver(
                strategy_class=LatestPushedModelStrategy,
                model=channel.Channel(type=standard_artifacts.Model),
                pushed_model=channel.Channel(type=standard_artifacts.PushedModel),
                index=channel.Channel(type=RetrievalIndex),
            ).with_id(OLD_MODEL_RESOLVER_ID)
            return [node], node.outputs["model"], node.outputs["index"]
        node = resolver.Resolver(
            strategy_class=LatestBlessedModelStrategy,
            model=channel.Channel(type=standard_artifacts.Model),
            model_blessing=channel.Channel(type=standard_artifacts.ModelBlessing),
        ).with_id(OLD_MODEL_RESOLVER_ID)
        index_node = resolver.Resolver(strategy_class=LatestArtifactStrategy,
                                       index=channel.Channel(type=RetrievalIndex)).with_id(SERVED_INDEX_RESOLVER_ID)
        return [node, index_node], node.outputs["model"], index_node.outputs["index"]
    node = importer.Importer(source_uri=config.old_model, artifact_type=standard_artifacts.Model,
                             reimport=False).with_id(OLD_MODEL_IMPORTER_ID)
    return [node], node.outputs["result"], None


def _trainer(config: PipelineConfig, examples, centers, old_model, *, mode: str, version: str):
    """An LceTrainer with the config's training settings (every `lce_tf.train_config.parameter_types()` key)."""
    from components.lce_trainer.component import LceTrainer
    from lce_tf import train_config

    settings = {key: getattr(config, key) for key in train_config.parameter_types()}
    settings.update(mode=mode, version=version)
    return LceTrainer(examples=examples, class_centers=centers, old_model=old_model, **settings)


def create_components(config: PipelineConfig, *, old_model_strategy: str = "pushed") -> list:
    """The pipeline's nodes for a validated, resolved config (see the module docstring)."""
    from tfx.components.pusher.component import Pusher
    from tfx.dsl.components.base import executor_spec
    from tfx.proto import pusher_pb2

    from components.atomic_pusher import executor as atomic_pusher
    from components.class_center_extractor.component import ClassCenterExtractor
    from components.compatibility_validator.component import CompatibilityValidator
    from components.gallery_transform_fitter.component import GalleryTransformFitter
    from components.image_example_gen.component import ImageFolderExampleGen, folder_fingerprint
    from components.index_builder.component import IndexBuilder

    fingerprint = folder_fingerprint(config.train_dir, config.query_dir, config.gallery_dir)
    example_gen = ImageFolderExampleGen(
        train_dir=config.train_dir, query_dir=config.query_dir, gallery_dir=config.gallery_dir,
        train_classes=config.train_classes,
        input_fingerprint=f"{config.data_version}:{fingerprint}").with_id(EXAMPLE_GEN_ID)
    examples = example_gen.outputs["examples"]
    nodes: list[Any] = [example_gen]
    if config.statistics:
        from tfx.components.schema_gen.component import SchemaGen
        from tfx.components.statistics_gen.component import StatisticsGen

        statistics_gen = StatisticsGen(examples=examples).with_id(STATISTICS_GEN_ID)
        nodes += [statistics_gen, SchemaGen(statistics=statistics_gen.outputs["statistics"]).with_id(SCHEMA_GEN_ID)]

    old_nodes, old_model, served_index = _old_model_nodes(config, old_model_strategy)
    nodes += old_nodes
    centers = None
    if config.needs_centers and old_model is not None:
        extractor = ClassCenterExtractor(examples=examples, old_model=old_model, boundary=config.boundary,
                                         flip_average=config.flip_average).with_id(CENTERS_ID)
        if config.beam_runner == "dask":  # component-level flags come after the pipeline's: they win
            extractor = extractor.with_beam_pipeline_args(dask_beam_args(config.beam_dask_address))
        nodes.append(extractor)
        centers = extractor.outputs["class_centers"]
    trainer_old_model = old_model if config.compat_mode.compatible_with_old else None
    trainer = _trainer(config, examples, centers, trainer_old_model, mode=config.mode,
                       version=config.version).with_id(TRAINER_ID)
    nodes.append(trainer)
    transformation = None
    if old_model is not None:
        fitter = GalleryTransformFitter(
            model=trainer.outputs["model"], old_model=old_model, examples=examples,
            direction=config.transform_direction, width=config.transform_width, epochs=config.transform_epochs,
            batch_size=config.transform_batch_size, seed=config.seed).with_id(TRANSFORM_FITTER_ID)
        nodes.append(fitter)
        transformation = fitter.outputs["transformation"]
    independent_model = None
    if config.train_independent_reference:
        reference = _trainer(config, examples, None, None, mode=modes.INDEPENDENT.name,
                             version=f"{config.version}-independent").with_id(INDEPENDENT_TRAINER_ID)
        nodes.append(reference)
        independent_model = reference.outputs["model"]
    validator = CompatibilityValidator(
        model=trainer.outputs["model"], examples=examples, old_model=old_model,
        independent_model=independent_model, transformation=transformation, margin_top1=config.margin_top1,
        margin_map=config.margin_map, min_top1=config.min_top1, min_map=config.min_map,
        compatibility=config.compatibility).with_id(VALIDATOR_ID)
    index_builder = IndexBuilder(
        model=trainer.outputs["model"], examples=examples, blessing=validator.outputs["blessing"],
        transformation=transformation, base_index=served_index, algorithm=config.index_algorithm,
        num_neighbors=config.index_num_neighbors, backend=config.index_backend, milvus_uri=config.index_milvus_uri,
        milvus_index_type=config.index_milvus_index_type).with_id(INDEX_BUILDER_ID)
    pusher = Pusher(
        model=trainer.outputs["model"], model_blessing=validator.outputs["blessing"],
        push_destination=pusher_pb2.PushDestination(
            filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=config.serving_dir)),
        custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.Executor),
    ).with_id(PUSHER_ID)
    nodes += [validator, index_builder, pusher]
    return nodes


def create_pipeline(config: PipelineConfig, *, metadata_connection_config: Optional[Any] = None,
                    beam_pipeline_args: Optional[Sequence[str]] = None, check_paths: bool = True,
                    old_model_strategy: str = "pushed"):
    """Validates the config and builds the TFX pipeline (runner-agnostic).

    Args:
      config: the PipelineConfig (validated here: a bad field raises before any component runs).
      metadata_connection_config: the metadata store (the local runner passes SQLite; None for Kubeflow,
        whose metadata store belongs to the cluster).
      beam_pipeline_args: Beam flags of every Beam component; None = config.beam_pipeline_args. Runners
        prepend their own (the local runner's DirectRunner multi-processing flags).
      check_paths: check that local data folders exist (off when compiling for a cluster whose paths the
        compiling machine cannot see).
      old_model_strategy: how `old_model = "latest"` is resolved: "pushed" (the Model of the latest push)
        or "blessed" (TFX's LatestBlessedModelStrategy, the only one of the two that KFP v2 compiles).

    Returns:
      tfx.orchestration.pipeline.Pipeline.

    Raises:
      ValueError: one line naming the bad config field.
    """
    config = config.resolved()
    config.validate(check_paths=check_paths)
    from tfx.orchestration import pipeline as tfx_pipeline

    return tfx_pipeline.Pipeline(
        pipeline_name=config.pipeline_name, pipeline_root=config.pipeline_root,
        components=create_components(config, old_model_strategy=old_model_strategy), enable_cache=config.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(config.beam_pipeline_args if beam_pipeline_args is None else beam_pipeline_args))
