"""The methods of the ANN benchmark, their labels and targets, and the search settings swept per method
(scaled with the dataset size).
"""

from __future__ import annotations

import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(REPO, "scripts", "bench_ann.py")  # the command line; children run it with --child

K = 10
TARGET_RECALL = 0.95
TARGET_BRUTE_SPEEDUP = 20.0
METHODS = ("brute", "exact-lib", "scann", "scann-immutable", "faiss-hnsw", "faiss-ivfpq", "milvus-lite",
           "milvus-server")
LABELS = {"brute": "exact brute force (NumPy)", "exact-lib": "exact_top_k (lce_tf exact_search)",
          "scann": "ScaNN tree-AH (lce_tf index)",
          "scann-immutable": "ScaNN tree-AH (immutable)", "faiss-hnsw": "FAISS HNSW32",
          "faiss-ivfpq": "FAISS IVF-PQ + refine", "milvus-lite": "Milvus Lite IVF_FLAT (lce_tf index)",
          "milvus-server": "Milvus server HNSW16 (standalone, same machine)"}
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
MILVUS_SERVER_HNSW = {"M": 16, "efConstruction": 200}  # lce_tf's MilvusConfig defaults for HNSW (Milvus' own)
MILVUS_SERVER_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_PINNING_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ----------------------------------------------------------------------------------------------------
# Search settings per method (scaled with the dataset size)
# ----------------------------------------------------------------------------------------------------

def num_leaves_for(n: int) -> int:
    """round(sqrt(n)): ScaNN's guidance and `IndexConfig.for_size` (also FAISS IVF's nlist here)."""
    return max(1, round(math.sqrt(n)))


def settings_for(method: str, n: int) -> list[dict]:
    """The swept search settings of a method for a dataset of n vectors."""
    if method in ("brute", "exact-lib"):
        return [{}]
    if method in ("scann", "scann-immutable"):
        leaves = num_leaves_for(n)
        fractions = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
        values = sorted({min(leaves, max(1, round(f * leaves))) for f in fractions})
        out = [{"leaves_to_search": v, "reorder_num_neighbors": 100} for v in values]
        for reorder in (40, 250):
            out += [{"leaves_to_search": v, "reorder_num_neighbors": reorder} for v in values[1::2]]
        return out
    if method == "faiss-hnsw":
        return [{"efSearch": ef} for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256)]
    if method == "milvus-lite":
        from lce_tf.index.milvus_config import MilvusConfig  # pylint: disable=import-outside-toplevel

        config = MilvusConfig.for_size(n, 128)  # nlist and nprobe depend on n only
        nlist, default = config.index_params["nlist"], config.search_params["nprobe"]
        return [{"nprobe": v} for v in sorted({1, min(nlist, 16), default})]
    if method == "milvus-server":
        return [{"ef": ef} for ef in MILVUS_SERVER_EF]
    if method == "faiss-ivfpq":
        nlist = num_leaves_for(n)
        values = sorted({min(nlist, v) for v in (1, 2, 4, 8, 16, 32, 64, 128)})
        return ([{"nprobe": v, "k_factor": 10} for v in values]
                + [{"nprobe": v, "k_factor": 25} for v in values[2:]])
    raise ValueError(f"unknown method {method!r}")
