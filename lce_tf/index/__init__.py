"""Versioned embedding indexes: the backend contract, the backends, and the glue that feeds them.

    base.py         `Index`, the abstract backend contract (build, load, search, exact_search, upsert,
                    iter_batches, transform, rebuild, save, metadata, the space guard) and the hooks
                    the glue calls; `EntryBatch`, `IncompatibleModelError`, `closing_opened`
    checks.py       the checks every backend shares (ids, versions, unit rows, k, integers, galleries)
    store.py        index.json: the common fields, the atomic metadata write, the replace guard
    registry.py     backend name -> class ("scann", "milvus"), imported lazily; `read_index_metadata`,
                    `open_index`
    operations.py   on any backend: exact top-k, the query model's signature for an index (version
                    safety), backfill selection and backfill, `transform_gallery` (the forward upgrade:
                    `UpgradeRoute` moves each entry from its kept original, one transformation per
                    source space, or composed on request)
    scann_index.py  the ScaNN / brute-force backend (`EmbeddingIndex`); its configuration (`IndexConfig`)
                    in scann_config.py
    milvus_index.py the Milvus backend (`MilvusIndex`), Milvus Lite or a server; its configuration
                    (`MilvusConfig`) in milvus_config.py, its pymilvus calls in milvus_client.py
    images.py       image folders -> embeddings -> an index; query images -> top-k; backfill and upgrade

No module here imports a backend module except through the registry, and no backend imports another,
so importing this package (or any module of it) loads neither scann nor pymilvus nor tensorflow.
Adding a backend: docs/design.md, "How to add an index backend".
"""
