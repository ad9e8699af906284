"""Chains of forward upgrades without compounding (docs/design.md, "The forward path": chains).

Tiny synthetic spaces with known linear maps: s1 (4-d) -> s2 (3-d, so T12 is lossy) -> s3 (4-d). A
transformation is T(x) = normalize(x @ A). The direct route applies T13 to each entry's kept s1
original; the composed route applies T23 to the stored s2 vector, i.e. T23 . T12. The references are
NumPy products of the same matrices.
"""

import errno
import json
import os

import numpy as np
import pytest

from lce_tf.index import milvus_client as M, operations as ops, registry
from lce_tf.index import scann_index as S
from lce_tf.index.milvus_index import MilvusIndex
from lce_tf.index.scann_index import EmbeddingIndex

from cli_helpers import assert_bad_input, run_cli, write_linear_transformation

N = 12
A12 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], np.float32)  # 4 -> 3
A13 = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.5]],
               np.float32)  # 4 -> 4, invertible
A23 = np.array([[0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], np.float32)  # 3 -> 4


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _t(matrix, transform_id):
    return ops.SourceTransform(lambda x: np.asarray(x) @ matrix, transform_id)


@pytest.fixture(scope="module")
def spaces():
    rng = np.random.default_rng(7)
    ids = [f"c{i % 3}/g{i:02d}.png" for i in range(N)]
    g1 = _unit(rng.normal(size=(N, 4))).astype(np.float32)  # v1's embeddings (space s1)
    g2 = _unit(rng.normal(size=(N, 3))).astype(np.float32)  # v2's own embeddings of the same images (s2)
    return ids, g1, g2


def _v2_index(spaces):
    """The v1 index (s1) upgraded through T12 into s2: every entry transformed, originals kept."""
    ids, g1, _ = spaces
    v1 = EmbeddingIndex.build(ids, g1, "v1", embedding_space="s1")
    return ops.transform_gallery(v1, lambda x: x @ A12, "s2", transformed_by="T12")


# ---------------------------------------------------------------------------------------------------
# The library, ScaNN backend
# ---------------------------------------------------------------------------------------------------

def test_direct_chain_applies_t13_to_the_originals_and_differs_from_the_composed_chain(spaces, tmp_path):
    ids, g1, _ = spaces
    v2 = _v2_index(spaces)
    np.testing.assert_allclose(v2.embeddings, _unit(g1 @ A12), atol=1e-6)
    v2.save(str(tmp_path / "v2"))
    v2 = EmbeddingIndex.load(str(tmp_path / "v2"))  # the originals survive save and load
    batch = next(v2.iter_batches(originals=True))
    assert batch.sources == ["s1"] * N
    np.testing.assert_array_equal(np.stack(batch.originals), g1)

    direct = ops.transform_gallery(v2, None, "s3", transforms={"s1": _t(A13, "T13")})
    composed = ops.transform_gallery(v2, lambda x: x @ A23, "s3", transformed_by="T23", compose=True)
    np.testing.assert_allclose(direct.embeddings, _unit(g1 @ A13), atol=1e-6)  # T13 of the ORIGINALS
    np.testing.assert_allclose(composed.embeddings, _unit(_unit(g1 @ A12) @ A23), atol=1e-6)  # T23 . T12
    assert np.abs(direct.embeddings - composed.embeddings).max() > 0.1  # T12 is lossy: the routes differ
    assert set(direct.provenance) == {"transformed from s1 by T13"}
    assert set(composed.provenance) == {"transformed from s1 by T12; then from s2 by T23"}
    assert direct.ids == ids and direct.versions == ["v1"] * N
    assert direct.metadata["transformed_from"]["route"] == "direct"
    assert direct.metadata["transformed_from"]["transformations"] == {"s1": "T13"}
    assert composed.metadata["transformed_from"]["route"] == "composed"
    for index in (direct, composed):  # both keep the s1 originals for the next upgrade
        batch = next(index.iter_batches(originals=True))
        assert batch.sources == ["s1"] * N
        np.testing.assert_array_equal(np.stack(batch.originals), g1)


def test_direct_chain_of_one_dimension_moves_the_originals_not_the_stored_vectors(spaces):
    """s1, s2 and s3 all 4-d, T12 a rank-3 projection (lossy): only the values tell the routes apart."""
    ids, g1, _ = spaces
    a12 = np.diag([1.0, 1.0, 1.0, 0.0]).astype(np.float32)
    v1 = EmbeddingIndex.build(ids, g1, "v1", embedding_space="s1")
    v2 = ops.transform_gallery(v1, lambda x: x @ a12, "s2", transformed_by="T12")
    v3 = ops.transform_gallery(v2, None, "s3", transforms={"s1": _t(A13, "T13")})
    np.testing.assert_allclose(v3.embeddings, _unit(g1 @ A13), atol=1e-6)
    assert np.abs(v3.embeddings - _unit(_unit(g1 @ a12) @ A13)).max() > 0.1


def test_mixed_index_moves_each_entry_from_its_source_space_and_backfill_drops_originals(spaces, tmp_path):
    ids, g1, g2 = spaces
    v2 = _v2_index(spaces)
    native = ids[:4]  # re-encoded by v2 itself: native in s2
    ops.backfill(v2, native, g2[:4], "v2")
    v2.save(str(tmp_path / "mixed"))
    meta = json.loads((tmp_path / "mixed" / "index.json").read_text())
    assert meta["originals"] == {"s1": {"file": "originals/0.npy", "count": N - 4, "dim": 4}}
    np.testing.assert_array_equal(np.load(tmp_path / "mixed" / "originals" / "0.npy"), g1[4:])
    v2 = EmbeddingIndex.load(str(tmp_path / "mixed"))
    assert json.loads((tmp_path / "mixed" / S.SOURCES_FILE).read_text()) == [None] * 4 + ["s1"] * (N - 4)
    assert ops.source_counts(v2) == {None: (4, ids[0]), "s1": (N - 4, ids[4])}

    v3 = ops.transform_gallery(v2, lambda x: x @ A23, "s3", transformed_by="T23", transforms={"s1": _t(A13, "T13")})
    expected = np.concatenate([_unit(g2[:4] @ A23), _unit(g1[4:] @ A13)])
    np.testing.assert_allclose(v3.embeddings, expected, atol=1e-6)
    assert v3.provenance_counts() == {"transformed from s1 by T13": N - 4, "transformed from s2 by T23": 4}
    assert v3.versions == ["v2"] * 4 + ["v1"] * (N - 4)
    batch = next(v3.iter_batches(originals=True))  # the backfilled entries now keep their s2 originals
    assert batch.sources == ["s2"] * 4 + ["s1"] * (N - 4)
    np.testing.assert_allclose(np.stack(batch.originals[:4]), g2[:4], atol=1e-7)
    np.testing.assert_array_equal(np.stack(batch.originals[4:]), g1[4:])


def test_a_source_space_without_a_transformation_is_refused_before_anything_is_built(spaces):
    ids, _, g2 = spaces
    v2 = _v2_index(spaces)
    ops.backfill(v2, ids[:2], g2[:2], "v2")
    calls = []

    def t23(x):
        calls.append(len(x))
        return x @ A23

    with pytest.raises(ValueError) as info:
        ops.transform_gallery(v2, t23, "s3", transformed_by="T23")
    message = str(info.value)
    assert message == (f"no transformation from space 's1' to 's3': {N - 2} entries (first {ids[2]!r}) were "
                       "transformed from 's1'; pass --transform with a transformation from 's1' (or --compose to "
                       "move their stored 's2' vectors instead)")
    with pytest.raises(ValueError, match=f"^no transformation from space 's2' to 's3': 2 entries \\(first "
                                         f"{ids[0]!r}\\) live natively in the index's space 's2'"):
        ops.transform_gallery(v2, None, "s3", transforms={"s1": _t(A13, "T13")})
    with pytest.raises(ValueError, match="composed route moves every stored vector through the transformation"):
        ops.transform_gallery(v2, t23, "s3", transformed_by="T23", transforms={"s1": _t(A13, "T13")}, compose=True)
    assert calls == []  # refused before any vector moved


def test_index_without_originals_loads_as_native_and_upgrades_as_before(spaces, tmp_path):
    """An index written before originals were kept: no sources.json, no originals/ (and no "originals")."""
    from lce_tf import fileio

    ids, g1, _ = spaces
    path = tmp_path / "old-format"
    _v2_index(spaces).save(str(path))
    meta = json.loads((path / "index.json").read_text())
    os.remove(path / S.SOURCES_FILE)
    os.remove(path / "originals" / "0.npy")
    os.rmdir(path / "originals")
    for rel in (S.SOURCES_FILE, "originals/0.npy"):
        del meta["files"][rel]
    del meta["originals"]
    meta.pop("checksum")
    meta["checksum"] = fileio.json_checksum(meta)
    (path / "index.json").write_text(json.dumps(meta))
    old = EmbeddingIndex.load(str(path))
    assert ops.source_counts(old) == {None: (N, ids[0])}
    v3 = ops.transform_gallery(old, lambda x: x @ A23, "s3", transformed_by="T23")  # no --compose needed
    np.testing.assert_allclose(v3.embeddings, _unit(_unit(g1 @ A12) @ A23), atol=1e-6)
    assert set(v3.provenance) == {"transformed from s1 by T12; then from s2 by T23"}
    batch = next(v3.iter_batches(originals=True))  # from here on the s2 vectors are kept as originals
    assert batch.sources == ["s2"] * N
    np.testing.assert_allclose(np.stack(batch.originals), _unit(g1 @ A12), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The command line: repeated --transform, --compose, the refusal, atomicity
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_ws(spaces, tmp_path_factory):
    """A mixed s2 index (4 entries backfilled natively, 8 transformed from s1) and T12, T13, T23, T14
    (into another space) as transformation directories."""
    ids, _, g2 = spaces
    root = tmp_path_factory.mktemp("chain_cli")
    v2 = _v2_index(spaces)
    v2.save(str(root / "v2-all"))
    ops.backfill(v2, ids[:4], g2[:4], "v2")
    v2.save(str(root / "v2-mixed"))
    for name, matrix, source, target in (("t13", A13, "s1", "s3"), ("t23", A23, "s2", "s3"),
                                         ("t14", A13, "s1", "s4")):
        write_linear_transformation(root / name, matrix, source, target, name.upper())
    return root


def _dir_state(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_cli_upgrade_direct_mixed_and_composed(cli_ws, spaces, capsys, tmp_path):
    ids, g1, g2 = spaces
    code, _, err = run_cli(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t13",
                           "--transform", cli_ws / "t23", "--out", tmp_path / "v3")
    assert code == 0, err
    v3 = EmbeddingIndex.load(str(tmp_path / "v3"))
    np.testing.assert_allclose(v3.embeddings, np.concatenate([_unit(g2[:4] @ A23), _unit(g1[4:] @ A13)]), atol=1e-5)
    assert v3.provenance_counts() == {"transformed from s1 by T13": N - 4, "transformed from s2 by T23": 4}
    assert v3.embedding_space == "s3" and v3.ids == ids
    # every entry transformed from s1: T13 alone is enough
    code, _, err = run_cli(capsys, "index", "upgrade", "--index", cli_ws / "v2-all", "--transform", cli_ws / "t13",
                           "--out", tmp_path / "v3-direct")
    assert code == 0, err
    np.testing.assert_allclose(EmbeddingIndex.load(str(tmp_path / "v3-direct")).embeddings, _unit(g1 @ A13),
                               atol=1e-5)
    # --compose: the stored s2 vectors through T23 (errors compound)
    code, _, err = run_cli(capsys, "index", "upgrade", "--index", cli_ws / "v2-all", "--transform", cli_ws / "t23",
                           "--compose", "--out", tmp_path / "v3-composed")
    assert code == 0, err
    composed = EmbeddingIndex.load(str(tmp_path / "v3-composed"))
    np.testing.assert_allclose(composed.embeddings, _unit(_unit(g1 @ A12) @ A23), atol=1e-5)
    assert set(composed.provenance) == {"transformed from s1 by T12; then from s2 by T23"}


@pytest.mark.e2e
def test_cli_upgrade_refusals_are_one_line_and_write_nothing(cli_ws, capsys, tmp_path):
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t23",
                     "--out", tmp_path / "x1",
                     match=f"no transformation from space 's1' to 's3': {N - 4} entries (first 'c1/g04.png') were "
                     "transformed from 's1'; pass --transform with a transformation from 's1'")
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t13",
                     "--out", tmp_path / "x2", match="no transformation from space 's2' to 's3': 4 entries")
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t13",
                     "--transform", cli_ws / "t14", "--out", tmp_path / "x3", match="map into different spaces")
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t13",
                     "--transform", cli_ws / "t13", "--out", tmp_path / "x4", match="two transformations from space s1")
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-mixed", "--transform", cli_ws / "t13",
                     "--compose", "--out", tmp_path / "x5", match="no transformation from space 's2' to 's3'")
    assert not list(tmp_path.iterdir())  # nothing written, no hidden temporary directory


@pytest.mark.e2e
def test_cli_upgrade_failing_while_writing_the_originals_leaves_the_previous_index(cli_ws, capsys, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "v3"
    code, _, err = run_cli(capsys, "index", "upgrade", "--index", cli_ws / "v2-all", "--transform", cli_ws / "t23",
                           "--compose", "--out", out)
    assert code == 0, err
    before = _dir_state(out)
    real_write_npy = S._write_npy

    def disk_full_on_originals(path, array):
        if f"{os.sep}{S.ORIGINALS_DIR}{os.sep}" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_npy(path, array)

    monkeypatch.setattr(S, "_write_npy", disk_full_on_originals)
    assert_bad_input(capsys, "index", "upgrade", "--index", cli_ws / "v2-all", "--transform", cli_ws / "t13",
                     "--out", out, "--overwrite", match="No space left on device; the previous version is unchanged")
    monkeypatch.undo()
    assert _dir_state(out) == before and [p.name for p in tmp_path.iterdir()] == ["v3"]
    assert set(EmbeddingIndex.load(str(out)).provenance) == {"transformed from s1 by T12; then from s2 by T23"}


# ---------------------------------------------------------------------------------------------------
# The Milvus backend (Milvus Lite): originals are fields of each entry's row
# ---------------------------------------------------------------------------------------------------

def _milvus_vectors(index):
    """{id: (stored vector, source, original)} of a Milvus index."""
    return {i: (e, s, o) for b in index.iter_batches(5, originals=True)
            for i, e, s, o in zip(b.ids, b.embeddings, b.sources, b.originals)}


def test_milvus_keeps_originals_and_upgrades_a_mixed_index_directly(spaces, tmp_path):
    ids, g1, g2 = spaces
    with MilvusIndex.build(ids, g1, "v1", embedding_space="s1", index_dir=str(tmp_path / "m1")) as v1:
        v2 = ops.transform_gallery(v1, lambda x: x @ A12, "s2", transformed_by="T12", index_dir=str(tmp_path / "m2"),
                                   batch_size=5)
    with v2:
        assert v2.metadata["milvus"]["schema"][M.SOURCE_FIELD] == "VARCHAR(512)"
        ops.backfill(v2, ids[:4], g2[:4], "v2")  # an upsert replaces the whole row: the original goes
        v2.save()
    with registry.open_index(str(tmp_path / "m2")) as v2:
        stored = _milvus_vectors(v2)
        assert [stored[i][1] for i in ids] == [None] * 4 + ["s1"] * (N - 4)
        np.testing.assert_array_equal(np.stack([stored[i][2] for i in ids[4:]]), g1[4:])  # exact bits
        assert {s: count for s, (count, _) in ops.source_counts(v2).items()} == {None: 4, "s1": N - 4}
        with pytest.raises(ValueError, match="no transformation from space 's1' to 's3'"):
            ops.transform_gallery(v2, lambda x: x @ A23, "s3", transformed_by="T23", index_dir=str(tmp_path / "m3"))
        assert not (tmp_path / "m3").exists()
        v3 = ops.transform_gallery(v2, lambda x: x @ A23, "s3", transformed_by="T23",
                                   transforms={"s1": _t(A13, "T13")}, index_dir=str(tmp_path / "m3"), batch_size=5)
    with v3:
        moved = _milvus_vectors(v3)
        expected = np.concatenate([_unit(g2[:4] @ A23), _unit(g1[4:] @ A13)])
        np.testing.assert_allclose(np.stack([moved[i][0] for i in ids]), expected, atol=1e-5)
        assert v3.provenance_counts() == {"transformed from s1 by T13": N - 4, "transformed from s2 by T23": 4}
        assert [moved[i][1] for i in ids] == ["s2"] * 4 + ["s1"] * (N - 4)
        np.testing.assert_allclose(np.stack([moved[i][2] for i in ids[:4]]), g2[:4], atol=1e-7)
        copy = v3.clone(str(tmp_path / "m3-copy"))  # a copy keeps the originals too
    with copy:
        assert {i: v[1] for i, v in _milvus_vectors(copy).items()} == {i: v[1] for i, v in moved.items()}


def test_milvus_collection_without_origin_fields_loads_as_native_and_upgrades(spaces, tmp_path, monkeypatch):
    """A collection made before the source and original fields existed (four fields in index.json's schema)."""
    ids, g1, g2 = spaces
    real_rows, real_record = M.entity_rows, M.schema_record
    monkeypatch.setattr(M, "ORIGIN_FIELDS", ())
    monkeypatch.setattr(M, "entity_rows", lambda batch, originals=True: real_rows(batch, False))
    monkeypatch.setattr(M, "schema_record", lambda dim: {k: v for k, v in real_record(dim).items()
                                                          if k not in (M.SOURCE_FIELD, M.ORIGINAL_FIELD)})
    MilvusIndex.build(ids, g1, "v1", embedding_space="s1", index_dir=str(tmp_path / "old")).close()
    monkeypatch.undo()
    with registry.open_index(str(tmp_path / "old")) as old:
        assert M.SOURCE_FIELD not in old.metadata["milvus"]["schema"]
        ops.backfill(old, ids[:2], g1[:2], "v1b")  # an upsert into the four fields
        assert [count for count, _ in ops.source_counts(old).values()] == [N] and None in ops.source_counts(old)
        new = ops.transform_gallery(old, lambda x: x @ A12, "s2", transformed_by="T12", index_dir=str(tmp_path / "new"))
    with new:
        moved = _milvus_vectors(new)
        np.testing.assert_allclose(np.stack([moved[i][0] for i in ids]), _unit(g1 @ A12), atol=1e-5)
        assert {moved[i][1] for i in ids} == {"s1"}
        np.testing.assert_allclose(np.stack([moved[i][2] for i in ids]), g1, atol=1e-7)
