"""PipelineConfig: the one typed configuration of the lce-tf pipeline, with real defaults.

The defaults run the pipeline on the glyph data that `lce-tf data glyphs --out build/demo/data` writes,
with the pipeline root (SQLite metadata, artifacts, pushed models) under build/pipeline. Every field
can be set from a JSON or YAML file (`PipelineConfig.from_file`) or `key=value` overrides
(`with_overrides`, what `lce-tf pipeline run --set` uses).

`validate()` runs before any component does (`create_pipeline` calls it) and raises ValueError with one
line that names the field: a missing data folder, an unknown mode, a mode that needs an old model with
`old_model = "none"`, a gallery without its eval (query) split, out-of-range numbers, unknown keys.

Importing this module imports neither tfx nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from typing import Any, Mapping, Optional, Sequence

from lce_tf import catalog, defaults, fileio, modes, train_config
from lce_tf.beam.options import BEAM_RUNNERS, check_dask_address
from lce_tf.gate import COMPATIBILITY_ROUTES
from lce_tf.index import registry as index_registry
from lce_tf.transform_fit import DIRECTIONS as TRANSFORM_DIRECTIONS, TransformFitSettings

# The modes the LceTrainer trains, from lce_tf.modes; the architectures and heads from lce_tf.catalog (pure
# Python, like this module: validating a configuration does not import TensorFlow).
MODES = modes.PIPELINE_MODE_NAMES
ARCHITECTURES = catalog.ARCHITECTURES
LOSSES = catalog.HEADS
INDEX_ALGORITHMS = ("", "brute_force", "ah", "tree_ah")
INDEX_BACKENDS = index_registry.backend_names()  # the backends lce_tf.index registers
MILVUS_INDEX_TYPES = ("", "FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "DISKANN", "SCANN", "AUTOINDEX")
MILVUS_LITE_INDEX_TYPES = ("", "FLAT", "IVF_FLAT", "AUTOINDEX")
_FIT = TransformFitSettings()  # the library's fit defaults (lce_tf.transform_fit imports no TensorFlow)
OLD_MODEL_LATEST = "latest"
OLD_MODEL_NONE = "none"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _is_uri(path: str) -> bool:
    """A remote URI ("gs://bucket/x"): not checked on the local file system."""
    return "://" in path


@dataclasses.dataclass
class PipelineConfig:
    """Everything one pipeline run needs (docs/design.md, "Architecture": pipeline/).

    Data (image folders DIR/<class>/<image>; query and gallery hold held-out classes):
      train_dir, query_dir, gallery_dir: the training images and the eval split's queries and gallery.
      train_classes: `lce_tf.data.select_classes` spec of the training classes ("0:50%", a names file);
        "" keeps all.
      data_version: enters the ingest cache key next to the folders' fingerprint; change it when data
        under a remote URI changes.

    Pipeline:
      pipeline_name: the name in the metadata store (letters, digits, "_", ".", "-").
      pipeline_root: artifacts, metadata.sqlite (local runner) and serving/ live here.
      metadata_path: SQLite file of the local runner; "" = PIPELINE_ROOT/metadata.sqlite.
      serving_dir: where the Pusher writes versioned models; "" = PIPELINE_ROOT/serving.
      enable_cache: reuse outputs of executions with identical inputs and parameters.
      statistics: also run StatisticsGen + SchemaGen on the Examples (label/class statistics to look at;
        locally its Beam workers import TFDV, about 1-2 more minutes per run on 2 cores).

    Old model:
      old_model: "latest" = the latest pushed model of this pipeline (blessed, then pushed), resolved from the
        metadata store at run time (none on the first run: the model is then trained independently and
        blessed on its own accuracy); "none" = start a new lineage (mode must be "independent"); or a
        model directory to import.

    Training: the fields of lce_tf.train_config.TrainConfig offered to the pipeline, declared there (with
      their help text and defaults) and added here by `declare_pipeline_fields`, under their LceTrainer
      parameter keys (the field name, e.g. architecture, embedding_dim, lambda_instance, version; `mode` for
      TrainConfig.compat: one of lce_tf.modes.PIPELINE_MODE_NAMES, default lce here).
      module_file: your own backbone, a local Python file defining build_backbone(input_shape, embedding_dim)
        (lce_tf.module_file); read when the pipeline is built, its text travels in the pipeline (the LceTrainer's
        `module_source`), so a Kubeflow run needs no path of the machine that compiled it.
      train_independent_reference: also train the independent new* model (same settings, mode
        independent) so the validator reports update gain and new-model sacrifice.

    Class centers: boundary ("min" or "percentile:P"), flip_average.

    Forward route (docs/design.md, "The forward path"; with an old model the GalleryTransformFitter fits T12 old ->
      new on the training split): transform_direction ("old-to-new" or "both"), transform_width,
      transform_epochs, transform_batch_size (lce_tf.transform_fit.TransformFitSettings).

    Validation: compatibility, the route that may bless the candidate: "backward" (M(new, old), the paper's
      criterion), "forward" (M(new, T12(old))) or "either" (the default); margin_top1, margin_map (required
      lead of the route's M over M(old, old)); min_top1, min_map (floors of the candidate's own M(new, new)).

    Index: index_backend ("scann": a ScaNN index in the IndexBuilder's artifact; "milvus": a Milvus
      collection), index_algorithm (ScaNN; "" = by gallery size), index_num_neighbors, index_milvus_uri
      (a Milvus server, e.g. "http://milvus:19530", token from LCE_TF_MILVUS_TOKEN in the component's
      environment; "" = Milvus Lite, whose database file lives in the artifact's index directory under
      pipeline_root: local runs only), index_milvus_index_type ("" = IVF_FLAT; Milvus Lite takes FLAT,
      IVF_FLAT, AUTOINDEX).

    Beam: beam_workers (DirectRunner multi-processing workers of the local runner);
      beam_pipeline_args (passed through to every Beam component, e.g. Dataflow/Flink/Spark flags);
      beam_runner ("direct": the ClassCenterExtractor runs with those flags; "dask": on the dask.distributed
      scheduler at beam_dask_address, e.g. "tcp://dask-scheduler:8786", through lce_tf/beam/dask_runner.py).

    Kubeflow: kubeflow_image (the component image built from pipeline/Dockerfile), kubeflow_setup_file
      (the project's setup.py inside that image, given to Beam so remote workers get lce_tf).
    """

    train_dir: str = "build/demo/data/train"
    query_dir: str = "build/demo/data/query"
    gallery_dir: str = "build/demo/data/gallery"
    train_classes: str = ""
    data_version: str = ""

    pipeline_name: str = "lce-tf"
    pipeline_root: str = "build/pipeline"
    metadata_path: str = ""
    serving_dir: str = ""
    enable_cache: bool = True
    statistics: bool = False

    old_model: str = OLD_MODEL_LATEST

    train_config.declare_pipeline_fields(locals(), {"mode": modes.LCE.name})  # the training settings
    train_independent_reference: bool = False

    boundary: str = defaults.BOUNDARY_RULE
    flip_average: bool = False

    transform_direction: str = _FIT.direction
    transform_width: int = _FIT.width
    transform_epochs: int = _FIT.epochs
    transform_batch_size: int = _FIT.batch_size

    compatibility: str = "either"
    margin_top1: float = 0.0
    margin_map: float = 0.0
    min_top1: float = 0.5
    min_map: float = 0.0

    index_algorithm: str = ""
    index_num_neighbors: int = 10
    index_backend: str = "scann"
    index_milvus_uri: str = ""
    index_milvus_index_type: str = ""

    beam_workers: int = 2
    beam_pipeline_args: list[str] = dataclasses.field(default_factory=list)
    beam_runner: str = "direct"
    beam_dask_address: str = ""

    kubeflow_image: str = "lce-tf-pipeline:latest"
    kubeflow_setup_file: str = "/lce-tf/setup.py"

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "PipelineConfig":
        """A config from a mapping; unknown keys and wrongly typed values fail naming the field."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of field names to values; received "
                             f"{type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(fields: {', '.join(cls.field_names())})")
        hints = typing.get_type_hints(cls)
        return cls(**{key: _coerce(key, value, hints[key], source) for key, value in values.items()})

    @classmethod
    def from_file(cls, path: str) -> "PipelineConfig":
        """Reads a JSON (.json) or YAML (.yaml/.yml) file of field values (missing fields keep defaults)."""
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml  # pylint: disable=import-outside-toplevel

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # pylint: disable=broad-except  (JSON and YAML raise different types)
            raise ValueError(f"config file {path} cannot be parsed: {' '.join(str(e).split())}") from None
        return cls.from_dict(values, source=f"config file {path}")

    def with_overrides(self, assignments: Sequence[str]) -> "PipelineConfig":
        """A copy with `key=value` assignments applied (values parsed by the field's type)."""
        values = self.to_dict()
        hints = typing.get_type_hints(type(self))
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set expects KEY=VALUE; received {item!r}")
            if key not in hints:
                raise ValueError(f"--set {key}: unknown field (fields: {', '.join(self.field_names())})")
            values[key] = _parse_text(key, raw, hints[key])
        return type(self).from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived values ----------------------------------------------------------------------------

    def resolved(self) -> "PipelineConfig":
        """A copy with local paths made absolute and metadata_path / serving_dir defaults filled in."""
        def absolute(path: str) -> str:
            return path if not path or _is_uri(path) else os.path.abspath(os.path.expanduser(path))

        root = absolute(self.pipeline_root)
        old_model = self.old_model
        if old_model not in (OLD_MODEL_LATEST, OLD_MODEL_NONE):
            old_model = absolute(old_model)
        return dataclasses.replace(
            self, train_dir=absolute(self.train_dir), query_dir=absolute(self.query_dir),
            gallery_dir=absolute(self.gallery_dir), module_file=absolute(self.module_file), pipeline_root=root,
            metadata_path=absolute(self.metadata_path) or os.path.join(root, "metadata.sqlite"),
            serving_dir=absolute(self.serving_dir) or os.path.join(root, "serving"), old_model=old_model,
            beam_pipeline_args=list(self.beam_pipeline_args))

    @property
    def compat_mode(self) -> modes.Mode:
        """The mode's declaration (`lce_tf.modes.Mode`) of the `mode` field."""
        return modes.get(self.mode)

    def training_settings(self) -> "train_config.TrainConfig":
        """The LceTrainer's settings as a TrainConfig (not validated)."""
        return train_config.from_parameters(self.to_dict())

    @property
    def needs_centers(self) -> bool:
        return self.compat_mode.needs_old_centers

    @property
    def uses_old_model(self) -> bool:
        return self.old_model != OLD_MODEL_NONE

    # -- validation --------------------------------------------------------------------------------

    def validate(self, *, check_paths: bool = True) -> "PipelineConfig":
        """Checks every field; raises ValueError with one line naming the first bad field.

        Args:
          check_paths: check that local data folders and an explicit old model directory exist (remote
            URIs are never checked).

        Returns:
          self, for chaining.
        """
        _choice("mode", self.mode, MODES, "compatibility mode")
        _choice("architecture", self.architecture, catalog.architecture_choices(), "architecture")
        _choice("loss", self.loss, LOSSES, "loss")
        _choice("index_algorithm", self.index_algorithm, INDEX_ALGORITHMS, "index algorithm")
        _choice("compatibility", self.compatibility, COMPATIBILITY_ROUTES, "upgrade route")
        _choice("transform_direction", self.transform_direction, TRANSFORM_DIRECTIONS, "transformation direction")
        _choice("index_backend", self.index_backend, INDEX_BACKENDS, "index backend")
        _choice("index_milvus_index_type", self.index_milvus_index_type, MILVUS_INDEX_TYPES, "Milvus index type")
        if self.index_backend != "milvus" and (self.index_milvus_uri or self.index_milvus_index_type):
            raise ValueError("index_milvus_uri / index_milvus_index_type: set index_backend to 'milvus' to use them")
        if self.index_backend == "milvus" and self.index_algorithm:
            raise ValueError(f"index_algorithm: {self.index_algorithm!r} is a ScaNN algorithm; with index_backend "
                             f"'milvus' choose index_milvus_index_type")
        if self.index_milvus_uri and not re.fullmatch(r"(https?|tcp|grpc)://[^@/\s]+(/[^@\s]*)?|unix:\S+",
                                                        self.index_milvus_uri):
            raise ValueError(f"index_milvus_uri: {self.index_milvus_uri!r} must be a Milvus server address "
                             f"(http(s)://HOST:PORT, tcp://, grpc://, unix:PATH) without credentials (the token comes "
                             f"from LCE_TF_MILVUS_TOKEN)")
        if (self.index_backend == "milvus" and not self.index_milvus_uri
                and self.index_milvus_index_type not in MILVUS_LITE_INDEX_TYPES):
            raise ValueError(f"index_milvus_index_type: {self.index_milvus_index_type} needs a Milvus server "
                             f"(index_milvus_uri); Milvus Lite takes FLAT, IVF_FLAT, AUTOINDEX")
        if not _NAME_RE.match(self.pipeline_name or ""):
            raise ValueError(f"pipeline_name: {self.pipeline_name!r} must be 1-63 letters, digits, '_', '.', '-'")
        if not self.version or any(c.isspace() or c == "/" for c in self.version):
            raise ValueError(f"version: {self.version!r} must be a non-empty label without spaces or '/'")
        for name in ("pipeline_root",):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("embedding_dim", "epochs", "batch_size", "index_num_neighbors", "beam_workers", "transform_width",
                     "transform_epochs", "transform_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer; received {value!r}")
        for name in ("shift_pixels", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be a non-negative integer; received {value!r}")
        for name in ("scale", "margin", "lambda_align", "lambda_boundary", "lambda_compat", "lambda_instance",
                     "instance_temperature", "learning_rate", "margin_top1", "margin_map", "min_top1", "min_map"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number; received {value!r}")
        for name in ("scale", "learning_rate", "instance_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0; received {getattr(self, name)!r}")
        for name in ("margin", "lambda_align", "lambda_boundary", "lambda_compat", "lambda_instance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0; received {getattr(self, name)!r}")
        for name in ("min_top1", "min_map"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1]; received {getattr(self, name)!r}")
        self.training_settings().validate()  # any setting not checked above, with TrainConfig's one-line message
        _check_boundary(self.boundary)
        _choice("beam_runner", self.beam_runner, BEAM_RUNNERS, "Beam runner")
        if self.beam_runner == "dask":
            if not self.beam_dask_address:
                raise ValueError("beam_dask_address: required with beam_runner 'dask' (the dask scheduler, e.g. "
                                 "tcp://dask-scheduler:8786)")
            check_dask_address(self.beam_dask_address, "beam_dask_address")
        elif self.beam_dask_address:
            raise ValueError("beam_dask_address: set beam_runner to 'dask' to use it")
        if not isinstance(self.beam_pipeline_args, list) or not all(
                isinstance(a, str) and a.startswith("--") for a in self.beam_pipeline_args):
            raise ValueError(f"beam_pipeline_args: must be a list of '--flag=value' strings; received "
                             f"{self.beam_pipeline_args!r}")

        # Data: the training folder and the eval split (queries + gallery).
        if not self.train_dir:
            raise ValueError("train_dir: required (the training image folder DIR/<class>/<image>)")
        if self.gallery_dir and not self.query_dir:
            raise ValueError(f"query_dir: required: the gallery {self.gallery_dir} needs the eval split's query "
                             f"images (held-out classes) to validate and search against")
        if self.query_dir and not self.gallery_dir:
            raise ValueError(f"gallery_dir: required: the eval split needs a gallery for the queries in "
                             f"{self.query_dir}")
        if not self.query_dir:
            raise ValueError("query_dir and gallery_dir: required (the eval split: query and gallery image "
                             "folders of held-out classes)")
        if check_paths:
            for name in ("train_dir", "query_dir", "gallery_dir"):
                _check_folder(name, getattr(self, name))
            if self.module_file:
                _check_module_file("module_file", self.module_file)

        # Old model.
        mode = self.compat_mode
        if self.old_model == OLD_MODEL_NONE and mode.compatible_with_old:
            raise ValueError(f"old_model: mode {self.mode!r} needs an old model but old_model is 'none'; set "
                             f"old_model to 'latest' (resolved from the metadata store) or a model directory, "
                             f"or use mode 'independent'")
        if not self.old_model:
            raise ValueError("old_model: required: 'latest', 'none' or a model directory")
        if self.old_model not in (OLD_MODEL_LATEST, OLD_MODEL_NONE) and check_paths and not _is_uri(self.old_model):
            metadata = _read_model_metadata("old_model", self.old_model)
            old_dim = int(metadata["embedding_dim"])
            if mode.direct and old_dim != self.embedding_dim:
                raise ValueError(f"embedding_dim: mode {self.mode!r} needs the old model's dimension {old_dim} "
                                 f"({self.old_model}); received {self.embedding_dim} (use mode 'lce-transform')")
        return self


def _choice(field: str, value: Any, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) if c == "" else c for c in choices)
        raise ValueError(f"{field}: unknown {what} {value!r}; expected one of {shown}")


def _check_boundary(rule: str) -> None:
    text = str(rule).strip()
    if text == "min":
        return
    if text.startswith("percentile:"):
        try:
            p = float(text[len("percentile:"):])
        except ValueError:
            p = math.nan
        if math.isfinite(p) and 0.0 <= p <= 100.0:
            return
    raise ValueError(f"boundary: must be 'min' or 'percentile:P' with 0 <= P <= 100; received {rule!r}")


def _check_folder(field: str, path: str) -> None:
    if _is_uri(path):
        return
    if not os.path.exists(path):
        raise ValueError(f"{field}: {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{field}: {path} is not a directory (expected DIR/<class>/<image>)")
    if not any(not e.startswith(".") and os.path.isdir(os.path.join(path, e)) for e in os.listdir(path)):
        raise ValueError(f"{field}: {path} has no class folders (expected {path}/<class>/<image>)")


def _check_module_file(field: str, path: str) -> None:
    """A module file is read when the pipeline is built (its text travels in the pipeline): a local file."""
    if _is_uri(path):
        raise ValueError(f"{field}: {path} must be a local file (its text is read when the pipeline is built)")
    if not os.path.isfile(path):
        raise ValueError(f"{field}: {path} does not exist" if not os.path.exists(path) else
                         f"{field}: {path} is not a file (expected a Python file defining build_backbone)")


def _read_model_metadata(field: str, path: str) -> dict[str, Any]:
    """The old model's lce_tf_model.json (only embedding_dim is needed here), or ValueError naming `field`."""
    metadata_file = os.path.join(path, "lce_tf_model.json")
    if not os.path.isdir(path):
        raise ValueError(f"{field}: model directory {path} does not exist")
    return fileio.read_json_metadata(
        metadata_file, f"{field}: {metadata_file}", required=("embedding_dim",),
        messages={"missing": f"{field}: {path} is not an lce_tf model directory (lce_tf_model.json is missing)",
                  "fields": "{name} lacks embedding_dim (not an lce_tf model)"})


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Checks (and mildly converts) a value from a file or dict against the field's type."""
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{source}: field {key} must be a list of strings; received {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: field {key} must be true or false; received {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: field {key} must be an integer; received {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: field {key} must be a number; received {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{source}: field {key} must be a string; received {value!r}")
        return value
    return value  # pragma: no cover  (every field has one of the types above)


def _parse_text(key: str, raw: str, hint: Any) -> Any:
    """A command-line value for a field of type `hint`."""
    text = raw.strip()
    if typing.get_origin(hint) is list:
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--set {key}: not a JSON list ({e})") from None
        return [part for part in (p.strip() for p in text.split(",")) if part]
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {key}: expected true or false; received {raw!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--set {key}: expected an integer; received {raw!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--set {key}: expected a number; received {raw!r}") from None
    return raw


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The defaults, updated from a JSON/YAML file and `key=value` overrides (not yet validated)."""
    config = PipelineConfig.from_file(path) if path else PipelineConfig()
    return config.with_overrides(overrides) if overrides else config
