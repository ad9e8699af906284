"""Serving glue: image folders -> embeddings -> an `EmbeddingIndex`; query images -> top-k results; backfill.

This is what `lce-tf index build|search|backfill` and `scripts/backfill_curve.py` run. It joins three
parts of the library without re-implementing any of them: exported models (`lce_tf.serving`), image
folders (`lce_tf.data`) and the versioned index (`lce_tf.index`: any registered backend, e.g. ScaNN in the
index directory or a Milvus collection, chosen at build time by name through `lce_tf.index.registry` and
read back from the directory). Nothing here names a backend: what differs between backends is asked of
the backend class (`lce_tf.index.base.Index`'s hooks).

Conventions:

- Entry id = the gallery image's path relative to the gallery folder root, with "/" separators
  (e.g. "U+4E00/ukai-0.png"), so the class of an entry is the first path component (`class_of_id`) and
  a backfill finds the image of an entry again as GALLERY_DIR/<id>.
- Entry version = the `model_id` of the model that embedded it (unique per trained model, e.g.
  "v1-8dcd1b53"); the index's `model_version` is the building model's id. `select_backfill_ids`
  therefore walks the entries that a given new model has not embedded yet.
- Query models are mapped into the index's embedding space with `operations.check_query_compatibility`
  (docs/design.md "The method" 6-7): `embed` for the index's own model and direct-mode successors,
  `embed_compat` (T21) for transformation-mode successors; unrelated models are refused unless forced.

Importing this module imports neither TensorFlow nor ScaNN: models and indexes are passed in (or
loaded inside functions).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lce_tf.index import operations, registry
from lce_tf.index.base import IncompatibleModelError, Index
from lce_tf.data import IMAGE_EXTENSIONS, DataError, read_image_folder
from lce_tf.datasets import load_images

Progress = Optional[Callable[[str], None]]

_IMAGE_CHUNK = 2048  # images decoded and embedded at a time by the path-based helpers


# ----------------------------------------------------------------------------------------------------
# Ids, classes, configuration
# ----------------------------------------------------------------------------------------------------

def gallery_ids(folder) -> list[str]:
    """Entry ids of an `lce_tf.data.ImageFolder`: each image path relative to the root, "/"-separated.

    Args:
      folder: the gallery ImageFolder (paths [N]).

    Returns:
      [N] ids in folder order; the first component of each is the image's class folder.
    """
    root = os.path.abspath(folder.root)
    return [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/") for p in folder.paths]


def class_of_id(entry_id: str) -> str:
    """The class of an entry id made by `gallery_ids`: its first path component ("" when it has none)."""
    head, sep, _ = entry_id.partition("/")
    return head if sep else ""


def parse_config_overrides(specs: Sequence[str]) -> dict[str, Any]:
    """Parses `--config` values into IndexConfig overrides.

    Each spec is a JSON object ('{"algorithm": "tree_ah", "num_leaves": 50}') or comma-separated
    key=value pairs ("algorithm=tree_ah,num_leaves=50"); a value is read as JSON when it parses
    (50 -> int, false -> bool, 0.2 -> float), else kept as a string. Later specs win.

    Raises:
      ValueError: a spec that is neither (names the spec), or a JSON value that is not an object.
    """
    overrides: dict[str, Any] = {}
    for spec in specs:
        text = spec.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--config {spec!r} is not valid JSON ({e})") from None
            overrides.update(value)
            continue
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--config expects a JSON object or key=value pairs; received {spec!r}")
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw.strip()
            overrides[key.strip()] = parsed
    return overrides


def signature_for_index(index: Index, model, force: bool = False) -> str:
    """The signature of `model` whose embeddings live in the index's space (`check_query_compatibility`).

    Raises:
      IncompatibleModelError: the model is unrelated to the index's space (and not `force`),
        or its compatible signature has another dimension.
    """
    return operations.check_query_compatibility(index.metadata, model.metadata, force=force)


# ----------------------------------------------------------------------------------------------------
# Embedding images
# ----------------------------------------------------------------------------------------------------

def embed_paths(model, paths: Sequence[str], signature: str = "embed", batch_size: int = 256) -> np.ndarray:
    """Embeds image files with one signature of a model, decoding at most 2,048 images at a time.

    Args:
      model: an `lce_tf.serving.EmbeddingModel`.
      paths: N image files (decoded as `lce_tf.datasets.load_images` does, resized to the model's input).
      signature: "embed", "embed_compat", ...
      batch_size: images per model call.

    Returns:
      float32 [N, D] unit embeddings, in the order of `paths`.

    Raises:
      ValueError: an unreadable image (named), a missing signature, NaN/Inf embeddings.
    """
    parts = []
    for start in range(0, len(paths), _IMAGE_CHUNK):
        images = load_images(paths[start:start + _IMAGE_CHUNK], model.input_shape)
        parts.append(model.embed(images, signature=signature, batch_size=batch_size))
    if not parts:
        return np.zeros((0, int(model.embedding_dim)), np.float32)
    return np.concatenate(parts, axis=0).astype(np.float32, copy=False)


def config_for(backend: str, n: int, dim: int, overrides: Optional[Mapping[str, Any]] = None, like: Any = None):
    """The size-based index configuration of a backend for n vectors of dimension dim, with overrides
    (`Index.config_for` of the backend's class).

    Args:
      backend: a registered backend name ("scann": `scann_config.IndexConfig`; "milvus":
        `milvus_config.MilvusConfig`).
      overrides: `--config` fields (ScaNN: IndexConfig fields; Milvus: index_type, num_neighbors,
        insert_batch_size and the index type's build/search parameters).
      like: an existing index's configuration whose num_neighbors (ScaNN: threads and mutability;
        Milvus: index type) the new one keeps unless overridden.

    Raises:
      ValueError: an unknown backend, field or value.
    """
    return registry.backend_class(backend).config_for(n, dim, overrides, like=like)


def build_index(model, gallery, *, overrides: Optional[Mapping[str, Any]] = None,
                config: Optional[Any] = None, batch_size: int = 256, progress: Progress = None,
                backend: str = registry.DEFAULT_BACKEND, index_dir: Optional[str] = None,
                milvus_uri: Optional[str] = None, milvus_alias: Optional[str] = None):
    """Embeds a gallery image folder with a model's `embed` signature and builds an index over it.

    The index lives in the model's own embedding space (`metadata["embedding_space"]`); every entry
    has version `model_id`; ids are `gallery_ids(folder)`.

    Args:
      model: an `lce_tf.serving.EmbeddingModel`.
      gallery: image folder GALLERY_DIR/<class>/<image> (a path, or an `lce_tf.data.ImageFolder`).
      overrides: configuration fields of the backend that replace its size-based defaults
        (`Index.config_for`; ScaNN: `IndexConfig` fields).
      config: a complete configuration instead (not together with `overrides`).
      batch_size: images per model call.
      progress: called with one line per stage (None = silent).
      backend: a name of `registry.BACKENDS`: "scann" (an in-memory index; save it) or "milvus"
        (written into a Milvus collection as it is built, served from `index_dir`).
      index_dir: Milvus only (required): the index directory.
      milvus_uri: Milvus only: a server URI; None -> Milvus Lite in INDEX_DIR/milvus.db.
      milvus_alias: Milvus server only: the collection alias (default "lce_<lineage>").

    Returns:
      The built index of N entries, dimension D = model.embedding_dim (ScaNN: not yet saved).

    Raises:
      ValueError: missing or empty gallery folder, unreadable images, bad overrides, a Milvus index
        type that Milvus Lite does not accept.
    """
    if config is not None and overrides:
        raise ValueError("pass either config or overrides, not both")
    cls = registry.backend_class(backend)
    if not cls.SERVER and (milvus_uri or milvus_alias):
        servers = [name for name in registry.backend_names() if registry.backend_class(name).SERVER]
        raise ValueError(f"a Milvus URI or alias needs backend {' or '.join(map(repr, servers))}")
    if cls.WRITES_AS_BUILT and index_dir is None:
        raise ValueError(f"a {cls.TITLE} index is written as it is built: pass index_dir")
    folder = gallery if hasattr(gallery, "paths") else read_image_folder(gallery)
    ids = gallery_ids(folder)
    dim = int(model.embedding_dim)
    # checked before the (slow) embedding
    config = cls.prepare_config(config or cls.config_for(len(ids), dim, overrides), len(ids), dim, uri=milvus_uri)
    if progress:
        progress(f"embedding {len(ids)} gallery images of {folder.num_classes} classes with {model.model_id}")
    embeddings, _ = model.embed_folder(folder, signature="embed", batch_size=batch_size)
    if progress:
        progress(f"building a {config.algorithm} index of {len(ids)} x {embeddings.shape[1]}"
                 f"{cls.location_text(milvus_uri)}")
    return cls.build_in(index_dir, ids, embeddings, model.model_id, uri=milvus_uri, alias=milvus_alias,
                        embedding_space=model.metadata["embedding_space"], model_id=model.model_id,
                        model_version=model.model_id, config=config)


# ----------------------------------------------------------------------------------------------------
# Queries and search
# ----------------------------------------------------------------------------------------------------

def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def collect_queries(sources: Sequence[str]) -> tuple[list[str], list[Optional[str]]]:
    """Query images from folders and files.

    Each source is an image file (class unknown), an image folder DIR/<class>/<image> (class = the
    folder name), or a folder holding images directly (class unknown).

    Args:
      sources: paths, at least one.

    Returns:
      (paths [Q], classes [Q], None where unknown), in the order given (folders in folder order).

    Raises:
      ValueError: no source, a missing path, a file that is not an image, a folder without images.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no query images given (pass a query folder or image files)")
    paths: list[str] = []
    classes: list[Optional[str]] = []
    for source in map(os.fspath, sources):
        if not os.path.exists(source):
            raise ValueError(f"query path {source} does not exist")
        if os.path.isfile(source):
            if not _is_image(source):
                raise ValueError(f"query file {source} is not an image ({'/'.join(IMAGE_EXTENSIONS)})")
            paths.append(source)
            classes.append(None)
            continue
        loose = sorted(os.path.join(source, e) for e in os.listdir(source)
                       if _is_image(e) and os.path.isfile(os.path.join(source, e)))
        has_class_dirs = any(not e.startswith(".") and os.path.isdir(os.path.join(source, e))
                             for e in os.listdir(source))
        if has_class_dirs:
            folder = read_image_folder(source)
            paths.extend(folder.paths)
            classes.extend(folder.class_names[int(label)] for label in folder.labels)
        if loose:
            paths.extend(loose)
            classes.extend([None] * len(loose))
        if not has_class_dirs and not loose:
            raise DataError(f"query folder {source} is empty: expected images or {source}/<class>/<image>.png")
    return paths, classes


@dataclasses.dataclass
class SearchResults:
    """Top-k results of query images against an index.

    Attributes:
      queries: [Q] query image paths.
      query_classes: [Q] class of each query (its class folder) or None.
      ids: object [Q, k] entry ids, best first.
      scores: float32 [Q, k] dot products of unit vectors (cosine similarity).
      signature: the query model signature used ("embed" / "embed_compat").
      forced: the query model was not compatible with the index and the search was forced.
      query_model_id: model id of the query model.
      index_info: index embedding space, model id, entry count, algorithm (and its directory, if known).
    """

    queries: list[str]
    query_classes: list[Optional[str]]
    ids: np.ndarray
    scores: np.ndarray
    signature: str
    forced: bool
    query_model_id: str
    index_info: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def classes(self) -> np.ndarray:
        """object [Q, k]: the class of every result (`class_of_id`)."""
        return np.vectorize(class_of_id, otypes=[object])(self.ids) if self.ids.size else self.ids.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: index, query model, signature, k, and per query its path, class and results."""
        classes = self.classes
        return {
            "index": self.index_info,
            "query_model": self.query_model_id,
            "signature": self.signature,
            "forced": self.forced,
            "k": self.k,
            "queries": [
                {"query": q, "class": c,
                 "results": [{"rank": r + 1, "id": str(self.ids[i, r]), "class": str(classes[i, r]),
                              "score": round(float(self.scores[i, r]), 6)} for r in range(self.k)]}
                for i, (q, c) in enumerate(zip(self.queries, self.query_classes))],
        }

    def format_table(self) -> str:
        """A readable table: one block per query, one line per result (rank, score, class, id)."""
        classes = self.classes
        info = self.index_info
        lines = [f"index {info.get('dir', '')} (embedding space {info['embedding_space']}, {info['count']} entries, "
                 f"{info['algorithm']}); query model {self.query_model_id} via {self.signature!r}"
                 + (" (FORCED: not declared compatible)" if self.forced else "")]
        id_width = max([len("id")] + [len(str(v)) for v in self.ids.ravel()])
        class_width = max([len("class")] + [len(str(v)) for v in classes.ravel()])
        for i, (query, query_class) in enumerate(zip(self.queries, self.query_classes)):
            label = f" (class {query_class})" if query_class is not None else ""
            lines.append(f"query {i + 1}/{len(self.queries)}: {query}{label}")
            lines.append(f"  {'rank':>4}  {'score':>7}  {'class':<{class_width}}  id")
            for r in range(self.k):
                mark = "*" if query_class is not None and classes[i, r] == query_class else " "
                lines.append(f"  {r + 1:>4}  {self.scores[i, r]:7.4f}  {classes[i, r]:<{class_width}}{mark} "
                             f"{self.ids[i, r]}")
        return "\n".join(lines)


def index_info(index: Index, index_dir: Optional[str] = None) -> dict[str, Any]:
    """Summary of an index for reports: dir, backend, embedding space, model id, count, dim, algorithm
    (the Milvus index type for Milvus), versions; Milvus: the collection and the server URI
    ("milvus-lite" for Milvus Lite)."""
    info = {"backend": index.backend, "embedding_space": index.embedding_space, "model_id": index.model_id,
            "count": len(index), "dim": index.dim, "algorithm": index.config.algorithm,
            "version_counts": index.version_counts()}
    info.update(index.describe())
    if index_dir is not None:
        info = {"dir": os.path.abspath(index_dir), **info}
    return info


def check_k(k: Optional[int], index: Index) -> int:
    """k for a search of `index`: None -> the index's num_neighbors (capped at its size); else 1 <= k <= N.

    Raises:
      ValueError: k <= 0, or k larger than the number of entries.
    """
    if k is None:
        return min(index.config.num_neighbors, len(index))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer; received {k!r}")
    if k > len(index):
        raise ValueError(f"k={k} exceeds the number of index entries ({len(index)})")
    return int(k)


def check_search_params(index, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Search parameters of one search (`--param`) checked against the index's backend: ScaNN takes
    leaves_to_search / reorder_num_neighbors, Milvus its index type's (nprobe, ef, ...).

    Raises:
      ValueError: a parameter the index does not take.
    """
    return index.check_search_params(params)


def search_images(index: Index, model, sources: Sequence[str], *, k: Optional[int] = None,
                  force: bool = False, batch_size: int = 256, index_dir: Optional[str] = None,
                  progress: Progress = None, search_params: Optional[Mapping[str, Any]] = None) -> SearchResults:
    """Embeds query images with the signature that maps `model` into the index's space, then searches.

    Args:
      index: the index (e.g. `EmbeddingIndex.load(dir)`).
      model: the query model (`lce_tf.serving.EmbeddingModel`).
      sources: query folders and/or image files (see `collect_queries`).
      k: results per query; None -> the index's num_neighbors.
      force: search even when the model is not declared compatible with the index's space.
      batch_size: images per model call.
      index_dir: recorded in the results.
      progress: called with one line per stage.
      search_params: search parameters of this search (`check_search_params`).

    Returns:
      SearchResults with ids/scores [Q, k].

    Raises:
      IncompatibleModelError: unrelated model without `force` (a ValueError).
      ValueError: bad k, missing/unreadable query images.
    """
    k = check_k(k, index)
    search_params = check_search_params(index, search_params)
    signature = signature_for_index(index, model, force=force)
    forced = model.signature_for_space(index.embedding_space) is None
    paths, classes = collect_queries(sources)
    if progress:
        progress(f"embedding {len(paths)} query images with {model.model_id} ({signature})")
    queries = embed_paths(model, paths, signature=signature, batch_size=batch_size)
    ids, scores = index.search(queries, k, embedding_space=None if forced else index.embedding_space,
                               **search_params)
    return SearchResults(queries=paths, query_classes=classes, ids=ids, scores=scores, signature=signature,
                         forced=forced, query_model_id=model.model_id, index_info=index_info(index, index_dir))


# ----------------------------------------------------------------------------------------------------
# Gradual backfill with models
# ----------------------------------------------------------------------------------------------------

def backfill_from_images(index: Index, model, gallery_dir: str, target_fraction: float, *,
                         seed: int = 0, batch_size: int = 256, progress: Progress = None) -> dict[str, Any]:
    """Re-embeds gallery images with a new model until `target_fraction` of the index is backfilled.

    The entries to re-embed are the next ones of `operations.select_backfill_ids` (a fixed seeded order,
    so successive calls extend one another); their images are GALLERY_DIR/<id>; they are embedded with
    the new model's signature for the index's space (`embed` in the direct modes, `embed_compat` = T21
    in the transformation modes; docs/design.md "The method" 6-7) and written with `operations.backfill`
    (ScaNN upsert in place) at version `model.model_id`. Save the index to persist.

    Upserts keep the tree partitions and AH codebooks trained on the vectors the index was built from.
    When the new vectors are distributed differently, recall drops as the backfill proceeds; call
    `index.rebuild()` after large steps. Measured on glyphs (3,420 entries, tree-AH, 8 of 58 leaves;
    benchmarks/results/backfill_curve_transform.json): T12-mapped gallery re-embedded with the new
    model's `embed`: recall@10 0.71-0.90 upserted vs 0.88-0.99 rebuilt.

    Args:
      index: the index, updated in place.
      model: the new model; must be declared compatible with the index's space (or be its model).
      gallery_dir: the gallery folder the index was built from.
      target_fraction: cumulative share of the gallery embedded by this model after the call, in [0, 1].
      seed: ordering seed of `select_backfill_ids` (use the same seed for every step).
      batch_size: images per model call.
      progress: called with one line per stage.

    Returns:
      {"backfilled": entries re-embedded now, "fraction": share now embedded by the model,
       "signature": the signature used, "version": model.model_id}.

    Raises:
      IncompatibleModelError: the model's embeddings do not live in the index's space.
      ValueError: target_fraction outside [0, 1], an entry whose image is missing under gallery_dir.
    """
    if (isinstance(target_fraction, bool) or not isinstance(target_fraction, (int, float))
            or not 0.0 <= target_fraction <= 1.0):
        raise ValueError(f"target fraction must be a number in [0, 1]; received {target_fraction!r}")
    if not os.path.isdir(gallery_dir):
        raise ValueError(f"gallery folder {gallery_dir} does not exist")
    signature = signature_for_index(index, model)
    version = model.model_id
    done = operations.backfilled_fraction(index, version)
    step = max(0.0, float(target_fraction) - done)
    ids = operations.select_backfill_ids(index, min(1.0, step), seed=seed, new_version=version) if step > 0 else []
    if ids:
        paths = [os.path.join(gallery_dir, *entry.split("/")) for entry in ids]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"gallery folder {gallery_dir}: {len(missing)} entries have no image (first: "
                             f"{missing[0]}); pass the folder the index was built from")
        if progress:
            progress(f"re-embedding {len(ids)} gallery images with {version} ({signature})")
        embeddings = embed_paths(model, paths, signature=signature, batch_size=batch_size)
        operations.backfill(index, ids, embeddings, version, embedding_space=index.embedding_space)
    return {"backfilled": len(ids), "fraction": operations.backfilled_fraction(index, version),
            "signature": signature, "version": version}


def upgrade_with_t12(index: Index, model, *, new_version: Optional[str] = None,
                     config: Optional[Any] = None, out_dir: Optional[str] = None) -> Index:
    """Forward-compatible upgrade: maps every gallery vector through the new model's T12 (no images).

    Returns a NEW index in the new model's own space (`operations.transform_gallery`, docs/design.md "The
    method" 7: forward compatible training), whose entries have version `new_version` (default
    "<model_id>-t12"), so `backfill_from_images(new_index, model, ...)` can then replace them with the
    model's own `embed` vectors gradually. The input index is untouched.

    A model's own T12 starts from one space, the index's, so entries an earlier upgrade transformed go
    through it from their stored vectors (the composed route; `upgrade_with_transformation` moves them
    from their originals when given a transformation from their source space).

    Raises:
      ValueError: the model has no `transform_old_to_new` signature, or its T12 starts from another space
        than the index's.
    """
    if not model.has_signature("transform_old_to_new"):
        raise ValueError(f"model {model.model_id} has no T12 (transform_old_to_new signature); re-embed the gallery "
                         "from images instead")
    compat = model.compatible_with or {}
    if compat.get("embedding_space") != index.embedding_space:
        raise IncompatibleModelError(
            f"model {model.model_id}'s T12 maps from embedding space {compat.get('embedding_space')!r}, but the index "
            f"holds embedding space {index.embedding_space!r}")
    return operations.transform_gallery(index, model.transform_old_to_new, model.metadata["embedding_space"],
                                       new_version or f"{model.model_id}-t12", model_id=model.model_id, config=config,
                                       transformed_by=f"{model.model_id} (transform_old_to_new)", index_dir=out_dir,
                                       compose=True)


def upgrade_with_transformation(index: Index, transformation, *,
                                overrides: Optional[Mapping[str, Any]] = None,
                                index_dir: Optional[str] = None, out_dir: Optional[str] = None,
                                compose: bool = False) -> Index:
    """The forward route's index upgrade (`lce-tf index upgrade`): every entry moved through fitted
    transformations' `old_to_new` into a NEW index in their (common) target space; no image is read.

    Native entries move through the transformation from the index's space; entries an earlier upgrade
    transformed move their kept ORIGINAL vectors through the transformation from their source space
    (docs/design.md, "The forward path": chains), unless `compose` (then every stored vector goes through
    the transformation from the index's space). Ids and per-entry model versions are kept; each entry's
    provenance becomes "transformed from <original space> by <transformation id>"
    (`operations.transform_gallery`). The new index lives in the new model's space, so
    `check_query_compatibility` accepts that model's queries (signature `embed`) and refuses the old
    model's; `backfill_from_images(new_index, new_model, ...)` later replaces transformed entries with
    re-encoded ones. The input index is untouched.

    Args:
      index: the index to upgrade.
      transformation: an `lce_tf.transformation.Transformation`, or several with one target space and
        distinct source spaces (one per source space present among the entries).
      overrides: configuration fields of the new index (`config_for`; default: by size, keeping
        num_neighbors, and ScaNN's threads and mutability or Milvus' index type).
      index_dir: the index's directory, for messages.
      out_dir: where a Milvus index's new collection is served from (required for Milvus: the
        collection is filled as it is made and switched to only when complete; it may be `index_dir`
        itself, an in-place upgrade). A ScaNN index is returned unsaved.
      compose: the composed route (see above).

    Raises:
      lce_tf.transformation.TransformationError: the index is already in the target space ("wrong
        direction", both spaces named), the transformation from the index's space takes another
        dimension, transformations with different targets or two from one source space.
      ValueError: a source space present among the entries without a transformation (one line naming
        both spaces; nothing is written).
    """
    from lce_tf.transformation import TransformationError

    where = f"index {index_dir or ''}".rstrip()
    given = list(transformation) if isinstance(transformation, (list, tuple)) else [transformation]
    target = given[0].target
    for t in given:
        if t.target["embedding_space"] != target["embedding_space"]:
            raise TransformationError(f"transformations {given[0].transform_id} and {t.transform_id} map into "
                                      f"different spaces ({target['embedding_space']} and "
                                      f"{t.target['embedding_space']}); an upgrade moves every entry into one")
    if index.embedding_space == target["embedding_space"]:
        given[0].check_source_space(index.embedding_space, where)  # "wrong direction", naming both spaces
    transforms: dict[str, operations.SourceTransform] = {}
    for t in given:
        if t.side_info is not None:  # indexes store no side vectors yet (lce_tf.side_info)
            raise TransformationError(f"transformation {t.transform_id} reads side information "
                                      f"({t.side_info['dim']}-d vectors of side model {t.side_info['model_id']}), "
                                      f"which {where} does not store; "
                                      "side information is library/benchmark-only for now")
        source = t.source["embedding_space"]
        if source in transforms:
            raise TransformationError(f"two transformations from space {source}: {transforms[source].transform_id} "
                                      f"and {t.transform_id}; pass one per source space")
        if source == index.embedding_space and index.dim != int(t.source["dim"]):
            raise TransformationError(f"{where} has dimension {index.dim} but transformation {t.transform_id} "
                                      f"maps from dimension {t.source['dim']}")
        transforms[source] = operations.SourceTransform(t.old_to_new, t.transform_id)
    config = None
    if overrides:
        config = config_for(index.backend, len(index), int(target["dim"]), overrides, like=index.config)
    return operations.transform_gallery(index, None, target["embedding_space"], model_id=target["model_id"],
                                        config=config, index_dir=out_dir, transforms=transforms, compose=compose)


# ----------------------------------------------------------------------------------------------------
# Metrics through the index (ANN) against exact search
# ----------------------------------------------------------------------------------------------------

def ranked_metrics(result_classes: np.ndarray, query_classes: Sequence[Any],
                   class_counts: Mapping[Any, int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k (CMC) and mAP@K of ranked result lists [Q, K] (K = the number of results per query).

    AP@K = (1 / min(R, K)) * sum over relevant ranks r <= K of precision@r, R = gallery items of the
    query's class (`class_counts`); equal to the full AP of docs/design.md "How compatibility is measured"
    when all R relevant items are within the top K. Queries whose class has no gallery item are left
    out (as `evaluation.retrieval_metrics` does).

    Example (hand-worked): results [[a, b, a]] for a query of class a with R = 2:
      relevant at ranks 1 and 3 -> AP@3 = (1/1 + 2/3) / 2 = 0.8333; top1 = 1.

    Args:
      result_classes: [Q, K] class of each result, best first.
      query_classes: [Q] class of each query.
      class_counts: {class: number of gallery items}.
      ks: CMC ranks (each <= K).

    Returns:
      {"top<k>": ..., "mAP@K": ..., "num_queries": evaluated queries}.
    """
    result_classes = np.asarray(result_classes, dtype=object)
    num_results = result_classes.shape[1]
    hits = {k: [] for k in ks}
    aps = []
    for row, query_class in zip(result_classes, query_classes):
        total = int(class_counts.get(query_class, 0))
        if total == 0:
            continue
        relevant = np.array([c == query_class for c in row], dtype=bool)
        for k in ks:
            hits[k].append(bool(relevant[:k].any()))
        ranks = np.flatnonzero(relevant) + 1
        aps.append(float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / min(total, num_results)))
    out = {f"top{k}": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out[f"mAP@{num_results}"] = float(np.mean(aps)) if aps else float("nan")
    out["num_queries"] = len(aps)
    return out


def tie_robust_recall(ann_scores: np.ndarray, exact_scores: np.ndarray, tolerance: float = 1e-5) -> float:
    """recall@k relative to exact search, robust to ties: share of ANN results [Q, k] scoring at least
    the exact k-th score minus `tolerance` (equal to id recall when there are no ties)."""
    kth = np.asarray(exact_scores, dtype=np.float64)[:, -1:] - tolerance
    return float((np.asarray(ann_scores, dtype=np.float64) >= kth).mean())


def compare_ann_to_exact(index: Index, query_embeddings: np.ndarray,
                         query_classes: Sequence[Any], *, k: int = 10, metric_k: int = 100,
                         class_of: Callable[[str], Any] = class_of_id, **search_kwargs: Any) -> dict[str, Any]:
    """The cross-version check of issue 4: ANN search against exact search over the same index.

    1. recall@k of `index.search(queries, k)` (ScaNN) against `index.exact_search` (blocked matrix
       product), by scores (`tie_robust_recall`).
    2. Retrieval metrics through the index: top-1 and top-5 from that ANN search against the exact
       full-ranking top-1/top-5 of `evaluation.retrieval_metrics` (the same definition), and mAP@K
       (K = metric_k) from an ANN search of K results against mAP@K of the exact top-K ranking.
       "max_abs_diff" is the largest of the three |ANN - exact| differences. The full exact mAP is
       reported too ("exact_full"): mAP@K equals it when every relevant item ranks within K.

    Note: `EmbeddingIndex.search` answers a query exactly when ScaNN finds fewer than the requested
    candidates (too few leaves searched for K); keep K within what the searched leaves hold.

    Args:
      index: an index (for a cross-version check: built by the old model).
      query_embeddings: float [Q, D] queries already mapped into the index's space.
      query_classes: [Q] class of each query.
      k: k of the recall (and the search that gives top-1/top-5; at least 5).
      metric_k: K of mAP@K (capped at the index size).
      class_of: entry id -> class.
      **search_kwargs: passed to `index.search` (e.g. leaves_to_search).

    Returns:
      {"k", "recall_at_k", "metric_k", "ann": {top1, top5, mAP@K}, "exact_topk": same from the exact
       ranking, "exact_full": {top1, top5, mAP}, "max_abs_diff"}.
    """
    from lce_tf import evaluation  # pylint: disable=import-outside-toplevel

    k = check_k(k, index)
    if k < 5 and len(index) >= 5:
        raise ValueError(f"k must be at least 5 (top-5 is reported); received {k}")
    metric_k = min(max(metric_k, k), len(index))
    ann_ids, ann_scores = index.search(query_embeddings, k, **search_kwargs)
    deep_ids, _ = index.search(query_embeddings, metric_k, **search_kwargs)
    ex_ids, ex_scores = index.exact_search(query_embeddings, metric_k)
    recall = tie_robust_recall(ann_scores, ex_scores[:, :k])
    gallery_classes = [class_of(v) for v in index.ids]
    counts: dict[Any, int] = {}
    for c in gallery_classes:
        counts[c] = counts.get(c, 0) + 1
    to_class = np.vectorize(class_of, otypes=[object])
    m = f"mAP@{metric_k}"
    ann = {**ranked_metrics(to_class(ann_ids), query_classes, counts),
           m: ranked_metrics(to_class(deep_ids), query_classes, counts)[m]}
    exact_topk = ranked_metrics(to_class(ex_ids), query_classes, counts)
    full = evaluation.retrieval_metrics(np.asarray(query_embeddings), np.array([str(c) for c in query_classes]),
                                        np.asarray(index.embeddings), np.array([str(c) for c in gallery_classes]))
    exact_full = {"top1": full.top1, "top5": full.top5, "mAP": full.mAP}
    diff = max(abs(ann["top1"] - exact_full["top1"]), abs(ann["top5"] - exact_full["top5"]),
               abs(ann[m] - exact_topk[m]))
    return {"k": k, "recall_at_k": recall, "metric_k": metric_k, "ann": ann, "exact_topk": exact_topk,
            "exact_full": exact_full, "max_abs_diff": float(diff)}


def load_index(index_dir: str) -> Index:
    """`registry.open_index`: the index of any backend (kept here so callers of this module need one import)."""
    return registry.open_index(index_dir)


def index_for_update(index_dir: str, out_dir: Optional[str] = None) -> Index:
    """The index that a backfill of `index_dir` writes into, to be saved at `out_dir` (None: in place):
    the backend's `Index.for_update`.

    ScaNN indexes are loaded into memory and saved wherever asked. A Milvus index is updated where its
    collection lives: for another `out_dir` it is first copied into a new collection served from there
    (`MilvusIndex.clone`), so the original keeps serving unchanged.
    """
    return load_index(index_dir).for_update(out_dir)
