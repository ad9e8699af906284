"""The ANN benchmark (`python scripts/bench_ann.py`, `make bench-ann`), one job per module:

    settings    methods, labels, targets, the search settings swept per method and size
    engines     the child's memory measures and the in-process engines (brute force, exact_top_k, ScaNN,
                FAISS HNSW / IVF-PQ, Milvus Lite)
    server      the Milvus standalone server row (server process from lce_tf/testing/milvus_server.py, accounting)
    child       one method built and swept in a child process (`bench_ann.py --child METHOD`)
    data        synthetic and real datasets, tie-robust recall@10, the machine description
    runs        every method on one dataset in child processes, scored; carry-over of earlier rows
    report      targets, NAME.md and NAME.png

scripts/bench_ann.py is the command line (and re-exports the names its tests use).
"""
