"""Operations on an index of any backend: the exact reference search, the query model's signature for
an index (version safety), gradual backfill and the forward upgrade through a transformation.

They use only the calls of the backend contract (`lce_tf.index.base.Index`): `iter_batches`,
`version_counts`, `missing_ids`, `upsert`, `transform`, so they work on every backend.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from lce_tf.index import checks
from lce_tf.index.base import EMBEDDED, EntryBatch, IncompatibleModelError, Index

logger = logging.getLogger(__name__)


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, query_chunk: int = 256,
                gallery_chunk: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product, in blocks so memory stays bounded (the reference for ANN search).

    Scores s_qi = <q, g_i> (docs/design.md: similarity of L2-normalized embeddings is the dot product; this
    function does not normalize). Memory is O(query_chunk * gallery_chunk).

    Args:
      queries: float32 [Q, D].
      gallery: float32 [N, D].
      k: neighbours per query, 1 <= k <= N.
      query_chunk: queries per block.
      gallery_chunk: gallery rows per block.

    Returns:
      (indices int64 [Q, k], scores float32 [Q, k]), best first; equal scores ordered by lower index
      (except for exact ties cut at a block's k-th place).
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    k = checks.check_k(k, gallery.shape[0])
    out_i = np.empty((queries.shape[0], k), dtype=np.int64)
    out_s = np.empty((queries.shape[0], k), dtype=np.float32)
    for qs in range(0, queries.shape[0], query_chunk):
        qb = queries[qs:qs + query_chunk]
        best_s = np.empty((qb.shape[0], 0), dtype=np.float32)
        best_i = np.empty((qb.shape[0], 0), dtype=np.int64)
        for gs in range(0, gallery.shape[0], gallery_chunk):
            s = qb @ gallery[gs:gs + gallery_chunk].T  # [b, g]
            kk = min(k, s.shape[1])
            if kk < s.shape[1]:
                part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(s.shape[1]), s.shape)
            all_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            all_i = np.concatenate([best_i, part.astype(np.int64) + gs], axis=1)
            order = np.lexsort((all_i, -all_s), axis=-1)[:, :k]
            best_s = np.take_along_axis(all_s, order, axis=1)
            best_i = np.take_along_axis(all_i, order, axis=1)
        out_s[qs:qs + qb.shape[0]] = best_s
        out_i[qs:qs + qb.shape[0]] = best_i
    return out_i, out_s


# ----------------------------------------------------------------------------------------------------
# Version safety
# ----------------------------------------------------------------------------------------------------

def check_query_compatibility(index_metadata: Union[Mapping[str, Any], Index, Any],
                              query_model_metadata: Mapping[str, Any], force: bool = False) -> str:
    """Which signature of the query model produces vectors in the index's embedding space.

    Rule: the model's own `embedding_space` equals the index's -> "embed"; else the model's
    `compatible_with.embedding_space` equals it -> `compatible_with.signature` ("embed" for the direct
    modes lce/bct/l2, "embed_compat" = T21 for the transformation modes, docs/design.md "The method" 6-7);
    else the search is refused unless `force` (then the signature whose dimension matches the index
    is returned, preferring "embed", with a warning).

    Args:
      index_metadata: an index's `metadata` (or the index itself, of either backend).
      query_model_metadata: the query model's `lce_tf_model.json` dict.
      force: search anyway when the spaces are unrelated.

    Returns:
      "embed" or the compatibility signature (normally "embed_compat").

    Raises:
      IncompatibleModelError: unrelated spaces without force, a declared dimension that differs from
        the index's, or (even with force) no signature of the model has the index's dimension.
      ValueError: the model metadata lacks a required field or lists no such signature.
    """
    index_md = index_metadata if isinstance(index_metadata, Mapping) else index_metadata.metadata
    for key in ("embedding_space", "dim"):
        if key not in index_md:
            raise ValueError(f"index metadata lacks the field {key!r}")
    space, dim = index_md["embedding_space"], int(index_md["dim"])
    model = query_model_metadata
    for key in ("model_id", "embedding_space", "embedding_dim"):
        if key not in model:
            raise ValueError(f"query model metadata lacks the field {key!r}")
    model_name = f"query model {model['model_id']!r} (embedding space {model['embedding_space']!r})"
    compat = model.get("compatible_with") or None
    if compat is not None and not isinstance(compat, Mapping):
        raise ValueError(f"{model_name}: compatible_with must be an object or null; received {compat!r}")
    signatures = model.get("signatures")

    def checked(signature: str, sig_dim: Any) -> str:
        if signatures is not None and signature not in signatures:
            raise ValueError(f"{model_name} would need signature {signature!r} but lists only "
                             f"{', '.join(signatures)}")
        if sig_dim is not None and int(sig_dim) != dim:
            raise IncompatibleModelError(f"{model_name}: signature {signature!r} gives dimension {int(sig_dim)} but "
                                         f"index embedding space {space!r} has dimension {dim}")
        return signature

    if model["embedding_space"] == space:
        return checked("embed", model["embedding_dim"])
    if compat is not None and compat.get("embedding_space") == space:
        return checked(compat.get("signature", "embed"), compat.get("dim"))
    declared = (f"compatible with {compat.get('embedding_space')!r}" if compat
                else "not declared compatible with any space")
    if not force:
        raise IncompatibleModelError(f"{model_name} is not compatible with index embedding space {space!r} (it is "
                                     f"{declared}); pass force=True (--force) to search anyway")
    for signature, sig_dim in (("embed", model["embedding_dim"]),
                               ((compat or {}).get("signature", "embed_compat"), (compat or {}).get("dim"))):
        if sig_dim is not None and int(sig_dim) == dim and (signatures is None or signature in signatures):
            logger.warning("forced search: %s is not compatible with index embedding space %r; using signature %r",
                           model_name, space, signature)
            return signature
    raise IncompatibleModelError(f"cannot force {model_name} onto index embedding space {space!r}: no signature "
                                 f"produces its dimension {dim}")


# ----------------------------------------------------------------------------------------------------
# Gradual backfill
# ----------------------------------------------------------------------------------------------------

def _is_pending(version: str, index, new_version: Optional[str]) -> bool:
    return version == index.model_version if new_version is None else version != new_version


def _pending_count(index, new_version: Optional[str]) -> int:
    counts = index.version_counts()
    if new_version is None:
        return counts.get(index.model_version, 0)
    return len(index) - counts.get(new_version, 0)


def backfilled_fraction(index, new_version: Optional[str] = None) -> float:
    """Share of entries already backfilled (see `select_backfill_ids` for what "pending" means)."""
    return 1.0 - _pending_count(index, new_version) / len(index)


def select_backfill_ids(index, fraction: float, seed: int = 0, *,
                        new_version: Optional[str] = None) -> list[str]:
    """Deterministically picks not-yet-backfilled entries to re-embed next.

    Pending entries are those whose version differs from `new_version`, or, when `new_version` is
    None, those still at the version that built the index (`index.model_version`). Each id is ranked
    by blake2b(seed, id), independent of the index order, so successive calls with the same seed walk
    one fixed order over the gallery (backfilling 10% and then another 10% picks the same entries as
    picking 20% at once), and the choice is reproducible across runs and machines. The entries are
    read with `iter_batches` (ids and versions only), so memory is O(picked ids) on either backend.

    Args:
      index: the index (`EmbeddingIndex` or `MilvusIndex`).
      fraction: share of the WHOLE gallery to pick in this call, 0 <= fraction <= 1; the count is
        min(pending, round(fraction * len(index))). For a cumulative target t use
        `fraction = t - backfilled_fraction(index, new_version)`.
      seed: ordering seed.
      new_version: see above.

    Returns:
      ids, in the seeded order.

    Raises:
      ValueError: fraction outside [0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1]; received {fraction!r}")
    checks.check_int("seed", seed, minimum=0)
    count = min(_pending_count(index, new_version), int(round(fraction * len(index) + 1e-9)))
    if count == 0:
        return []
    prefix = f"{int(seed)}\x00".encode("utf-8")
    keyed = (
        (hashlib.blake2b(prefix + entry.encode("utf-8"), digest_size=8).digest(), entry)
        for batch in index.iter_batches(vectors=False)
        for entry, version in zip(batch.ids, batch.versions) if _is_pending(version, index, new_version))
    return [v for _, v in heapq.nsmallest(count, keyed)]


def backfill(index, ids: Sequence[str], new_embeddings: np.ndarray, new_version: str, *,
             embedding_space: Optional[str] = None) -> int:
    """Replaces the embeddings of existing entries with re-embedded ones (an `upsert` of a chosen subset).

    The new embeddings must live in the index's space: the new model's `embed` for direct modes, or
    whatever `check_query_compatibility` says for the index (docs/design.md "The method" 7).

    Args:
      index: updated in place (ScaNN upsert, or a Milvus upsert); save it to persist (index.json).
      ids: M existing ids (e.g. from `select_backfill_ids`).
      new_embeddings: float [M, D].
      new_version: the version of the model that re-embedded them.
      embedding_space: when given, must equal the index's space.

    Returns:
      M, the number of entries backfilled.

    Raises:
      ValueError: an id not in the index (backfill never adds entries; use `upsert`), or any `upsert` error.
    """
    ids = checks.check_ids(ids)
    unknown = index.missing_ids(ids)
    if unknown:
        raise ValueError(f"backfill id {unknown[0]!r} is not in the index ({len(unknown)} unknown ids); "
                         "use upsert to add entries")
    index.upsert(ids, new_embeddings, new_version, embedding_space=embedding_space)
    return len(ids)


def transform_batch(transform_fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """transform_fn applied to one batch [B, D_old], checked ([B, D_new], finite, non-zero rows) and
    L2-normalized: float32 [B, D_new]."""
    out = np.asarray(transform_fn(batch))
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"transform_fn returned shape {out.shape} for input shape {batch.shape}; expected "
                         f"[{batch.shape[0]}, D_new]")
    return checks.unit_rows(out, "transformed embeddings")


def transformed_provenance(provenance: Sequence[str], from_space: str, transformed_by: str) -> list[str]:
    """The provenance of entries moved from `from_space` by the transformation `transformed_by`."""
    step = f"from {from_space} by {transformed_by}"
    return [f"transformed {step}" if p == EMBEDDED else f"{p}; then {step}" for p in provenance]


class SourceTransform(NamedTuple):
    """A transformation from one embedding space (the key it is filed under) into the upgrade's new space.

    Attributes:
      fn: numpy [B, D_source] -> numpy [B, D_new] (a fitted transformation's `old_to_new`).
      transform_id: its id, recorded in the provenance and the metadata.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    transform_id: str


def source_counts(index: Index) -> dict[Optional[str], tuple[int, str]]:
    """{source space (None: native entries): (entries, the first entry's id)} of an index, by one scan
    without vectors (`iter_batches`), so an upgrade can refuse before it writes anything."""
    found: dict[Optional[str], tuple[int, str]] = {}
    for batch in index.iter_batches(vectors=False):
        for entry, source in zip(batch.ids, batch.sources or [None] * len(batch.ids)):
            count, first = found.get(source, (0, entry))
            found[source] = (count + 1, first)
    return found


class UpgradeRoute:
    """How each entry of an index moves into a new space (docs/design.md, "The forward path": chains).

    Direct (the default): a native entry (embedded in the index's own space, or from an index written
    before originals were kept) moves its stored vector through the transformation from the index's
    space; a transformed entry moves its kept ORIGINAL vector through the transformation from its
    source space, so errors do not compound along a chain v1 -> v2 -> v3. Composed (`compose`): every
    stored vector goes through the transformation from the index's space (T23 . T12 for entries that came
    from v1). Either way the new index keeps each entry's original and source space: a native entry's
    original is its stored vector, in the index's space; a transformed entry keeps the one it had.

    Build it with `upgrade_route`, which checks that every source space present has a transformation.
    """

    def __init__(self, index_space: str, new_space: str, transforms: Mapping[str, SourceTransform], compose: bool,
                 new_version: Optional[str]):
        self.index_space, self.new_space = index_space, new_space
        self.transforms, self.compose, self.new_version = dict(transforms), bool(compose), new_version

    def move(self, batch: EntryBatch) -> EntryBatch:
        """One batch read with `iter_batches(originals=True)` moved into the new space: ids kept, versions
        kept (or `new_version`), provenance "transformed from <space> by <id>" (the entry's ORIGINAL
        space on the direct route; appended "...; then from <space> by <id>" when composed or when a
        native entry was already transformed without a kept original), sources and originals kept."""
        n = len(batch.ids)
        sources = batch.sources or [None] * n
        originals = batch.originals or [None] * n
        groups: dict[str, list[int]] = {}
        for i, source in enumerate(sources):
            direct = source is not None and not self.compose
            groups.setdefault(source if direct else self.index_space, []).append(i)
        moved = np.empty((n, 0), np.float32)
        provenance = list(batch.provenance)
        for space, rows in groups.items():
            step = self.transforms[space]
            direct = space != self.index_space
            inputs = np.stack([originals[i] for i in rows]) if direct else batch.embeddings[rows]
            out = transform_batch(step.fn, inputs)
            if not moved.shape[1]:
                moved, first = np.empty((n, out.shape[1]), np.float32), step.transform_id
            elif moved.shape[1] != out.shape[1]:
                raise ValueError(f"transformations {first} and {step.transform_id} map into {self.new_space!r} "
                                 f"with different dimensions ({moved.shape[1]} and {out.shape[1]})")
            moved[rows] = out
            before = [EMBEDDED if direct else batch.provenance[i] for i in rows]
            for i, p in zip(rows, transformed_provenance(before, space, step.transform_id)):
                provenance[i] = p
        kept_sources = [s if s is not None else self.index_space for s in sources]
        kept = [o if s is not None else batch.embeddings[i] for i, (s, o) in enumerate(zip(sources, originals))]
        versions = [self.new_version] * n if self.new_version else list(batch.versions)
        return EntryBatch(list(batch.ids), versions, provenance, moved, kept_sources, kept)

    def record(self, index: Index) -> dict[str, Any]:
        """The "transformed_from" metadata of the new index."""
        own = self.transforms.get(self.index_space)
        return {"embedding_space": index.embedding_space, "model_id": index.model_id,
                "transformation": own.transform_id if own else ", ".join(t.transform_id for t in
                                                                       self.transforms.values()),
                "transformations": {space: t.transform_id for space, t in sorted(self.transforms.items())},
                "route": "composed" if self.compose else "direct",
                "model_version": index.model_version, "dim": index.dim, "version_counts": index.version_counts()}


def upgrade_route(index: Index, transform_fn: Optional[Callable[[np.ndarray], np.ndarray]], new_space: str,
                  new_version: Optional[str] = None, *, transformed_by: Optional[str] = None,
                  transforms: Optional[Mapping[str, SourceTransform]] = None, compose: bool = False,
                  batch_size: int = 65_536) -> UpgradeRoute:
    """The checked route of an upgrade of `index` into `new_space` (see `UpgradeRoute`).

    `transform_fn` / `transformed_by` are the transformation from the index's own space (None when only
    `transforms` are given); `transforms` maps further source spaces to theirs.

    Raises:
      ValueError: bad arguments, two transformations from the index's space, or (one line naming both
        spaces) a source space present among the entries with no transformation from it (with `compose`:
        no transformation from the index's space). Raised before anything is written.
    """
    checks.check_int("batch_size", batch_size, minimum=1)
    if new_version is not None and (not isinstance(new_version, str) or not new_version):
        raise ValueError(f"new_version must be None or a non-empty string; received {new_version!r}")
    steps = {}
    for space, step in dict(transforms or {}).items():
        if not isinstance(step, SourceTransform) or not callable(step.fn):
            raise ValueError(f"transforms[{space!r}] must be a SourceTransform(fn, transform_id); received {step!r}")
        checks.check_transform_args(batch_size, new_version, step.transform_id)
        steps[space] = step
    if transform_fn is not None:
        checks.check_transform_args(batch_size, new_version, transformed_by)
        if index.embedding_space in steps:
            raise ValueError(f"two transformations from the index's space {index.embedding_space!r}: transform_fn "
                             f"and transforms[{index.embedding_space!r}]")
        steps[index.embedding_space] = SourceTransform(transform_fn, transformed_by)
    if not steps:
        raise ValueError("an upgrade needs a transformation (transform_fn or transforms)")
    found = source_counts(index)
    if compose:
        if index.embedding_space not in steps:
            raise ValueError(f"no transformation from space {index.embedding_space!r} to {new_space!r}: the composed "
                             f"route moves every stored vector of the index (space {index.embedding_space!r}) "
                             f"through one; pass a transformation from {index.embedding_space!r}")
        if len(steps) > 1:
            raise ValueError(f"the composed route moves every stored vector through the transformation from the "
                             f"index's space {index.embedding_space!r} only; received transformations from "
                             f"{', '.join(repr(x) for x in sorted(steps))}")
        needed = {index.embedding_space}
    else:
        needed = {index.embedding_space if s is None else s for s in found}
    for source in sorted(found, key=lambda s: (s is not None, s or "")):
        space = index.embedding_space if source is None or compose else source
        if space in steps:
            continue
        count, first = found[source]
        if source is None:
            what = f"live natively in the index's space {space!r}"
        else:
            what = f"were transformed from {space!r}"
        raise ValueError(f"no transformation from space {space!r} to {new_space!r}: {count} entries (first "
                         f"{first!r}) {what}; pass --transform with a transformation from {space!r}"
                         + ("" if source is None else f" (or --compose to move their stored {index.embedding_space!r} "
                                                      "vectors instead)"))
    unused = sorted(set(steps) - needed)
    if unused:
        logger.warning("no entry of the index comes from space(s) %s: their transformation is not used",
                       ", ".join(unused))
    return UpgradeRoute(index.embedding_space, new_space, steps, compose, new_version)


def transform_gallery(index: Index, transform_fn: Optional[Callable[[np.ndarray], np.ndarray]], new_space: str,
                      new_version: Optional[str] = None, *, transformed_by: Optional[str] = None,
                      model_id: Optional[str] = None, config: Any = None, batch_size: int = 65_536,
                      index_dir: Optional[str] = None, transforms: Optional[Mapping[str, SourceTransform]] = None,
                      compose: bool = False) -> Index:
    """Forward-compatible upgrade: moves every entry into the new space through fitted transformations
    (no images).

    Builds a NEW index (the input is untouched) whose embedding_space is `new_space` (docs/design.md,
    "The forward path"; "The method" 7: forward compatible training). A native entry becomes
    normalize(T(e_i)) with T = `transform_fn`, the transformation from the index's space; an entry that
    an earlier upgrade transformed becomes normalize(T_s(o_i)) with o_i its kept ORIGINAL vector and T_s
    = `transforms[s]` for its source space s (a chain v1 -> v2 -> v3 then applies T13 to v1's vectors,
    not T23 . T12; `compose=True` asks for the latter: every stored vector through `transform_fn`). Ids
    are kept; each entry's provenance records the move ("transformed from <original space> by <id>"; a
    composed move, or a native entry already transformed before originals were kept, appends "...; then
    from <space> by <id>"), so a later backfill with re-encoded images (provenance "embedded") can be told
    apart. The new index keeps every entry's original vector and source space (`UpgradeRoute`).

    The work is the backend's `Index.transform`. A Milvus index (`MilvusIndex.transform`) streams: the old
    collection is read in batches, moved and written into a NEW collection, and only a complete
    collection is committed (`index_dir`).

    Args:
      index: the old-space index (`EmbeddingIndex` or `MilvusIndex`).
      transform_fn: numpy [B, D_old] -> numpy [B, D_new] (a fitted transformation's `old_to_new`, or a
        model's `transform_old_to_new` signature), called in batches of at most `batch_size`; None when
        no entry is native (then `transforms` cover every source space).
      new_space: the embedding space the transformations map into.
      new_version: None keeps each entry's model version (the model that embedded its image); a string
        sets every entry's version to it.
      transformed_by: id of `transform_fn` (recorded in the provenance and the metadata).
      model_id: model id recorded in the metadata (the new space's model); defaults to `new_space`.
      config: the new index's configuration (an `IndexConfig`, or a `MilvusConfig` for Milvus); None ->
        the size-based default for D_new keeping the old index's num_neighbors (ScaNN: also threads
        and mutability; Milvus: the index type).
      batch_size: rows per read and transform call.
      index_dir: Milvus only (required there): where the new index is served from (its collection is
        filled as it is made; the directory may be the old index's own, to upgrade it in place). A
        ScaNN index is returned unsaved, whatever `index_dir` says.
      transforms: {source space: SourceTransform} for the entries transformed from earlier spaces.
      compose: move the stored vectors of transformed entries through `transform_fn` too.

    Returns:
      The new index, with metadata "transformed_from" naming the old space, model, version counts, the
      transformations and the route ("direct" or "composed").

    Raises:
      ValueError: a source space without a transformation (`upgrade_route`: one line, nothing written);
        the transform returns the wrong number of rows, a non-2-D array, NaN/Inf or zero rows.
    """
    return index.transform(transform_fn, new_space, new_version, transformed_by=transformed_by, model_id=model_id,
                           config=config, batch_size=batch_size, index_dir=index_dir, transforms=transforms,
                           compose=compose)
