"""The datasets of the ANN benchmark (synthetic Gaussian clusters on the sphere, or real embeddings of an
exported model), the tie-robust recall@10 and the machine description.
"""

from __future__ import annotations

import os
import platform

import numpy as np


def synthetic_data(n: int, num_queries: int, dim: int, clusters: int, sigma: float, seed: int):
    """Seeded Gaussian clusters on the unit sphere: (base [n, dim], queries [Q, dim]) float32 unit rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            x = centers[rng.integers(0, clusters, m)] + sigma * rng.standard_normal((m, dim), dtype=np.float32)
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(num_queries)


def real_data(model_dir: str, gallery_dir: str, query_dir: str, query_model_dir: str | None):
    """Gallery embeddings of `model_dir` and query embeddings mapped into its space."""
    from lce_tf.index import images  # pylint: disable=import-outside-toplevel
    from lce_tf.data import read_image_folder  # pylint: disable=import-outside-toplevel
    from lce_tf.index.operations import check_query_compatibility  # pylint: disable=import-outside-toplevel
    from lce_tf.serving import load_embedding_model  # pylint: disable=import-outside-toplevel

    model = load_embedding_model(model_dir)
    query_model = load_embedding_model(query_model_dir) if query_model_dir else model
    gallery, _ = model.embed_folder(read_image_folder(gallery_dir))
    signature = check_query_compatibility({"embedding_space": model.metadata["embedding_space"],
                                           "dim": model.embedding_dim}, query_model.metadata)
    paths, _ = images.collect_queries([query_dir])
    queries = images.embed_paths(query_model, paths, signature=signature)
    info = {"model": model.model_id, "query_model": query_model.model_id, "signature": signature,
            "gallery": os.path.abspath(gallery_dir), "query": os.path.abspath(query_dir)}
    return gallery.astype(np.float32), queries.astype(np.float32), info


def tie_robust_recall(base: np.ndarray, queries: np.ndarray, ann_ids: np.ndarray, gt_ids: np.ndarray) -> float:
    """Mean over queries of (#distinct returned ids whose float64 score >= the 10th exact score) / k."""
    q = queries.astype(np.float64)
    kth = np.min(np.einsum("qd,qkd->qk", q, base[gt_ids].astype(np.float64)), axis=1)
    total = 0
    for i in range(ann_ids.shape[0]):
        ids = np.unique(ann_ids[i][ann_ids[i] >= 0])
        if ids.size:
            total += int(np.sum(base[ids].astype(np.float64) @ q[i] >= kth[i] - 1e-9))
    return min(1.0, total / (ann_ids.shape[0] * gt_ids.shape[1]))


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import psutil  # pylint: disable=import-outside-toplevel

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except (ImportError, OSError):
        pass
    versions = {}
    for package in ("numpy", "scann", "faiss-cpu", "tensorflow", "pymilvus", "milvus-lite", "milvus"):
        try:
            from importlib import metadata  # pylint: disable=import-outside-toplevel

            versions[package] = metadata.version(package)
        except Exception:  # pylint: disable=broad-except
            versions[package] = None
    info["versions"] = versions
    return info
