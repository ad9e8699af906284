"""lce-tf: Learning Compatible Embeddings (Meng et al., ICCV 2021) on TensorFlow/Keras and TFX."""

import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"', (_HERE / "lce_tf" / "__init__.py").read_text()).group(1)

setup(
    name="lce-tf",
    version=_VERSION,
    description="Train new embedding models whose queries search old-model galleries (LCE, ICCV 2021).",
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.11",
    packages=find_packages(include=["lce_tf", "lce_tf.*", "components", "components.*", "pipeline", "pipeline.*"]),
    install_requires=[
        "tensorflow==2.15.1",
        "tensorflow-addons==0.23.0",
        "numpy>=1.26,<2",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "retrieval": ["scann==1.3.0"],
        # The Milvus backend of the index (lce_tf.index.milvus_index): the client and the embedded Milvus Lite,
        # which imports pkg_resources (removed in setuptools 81).
        "milvus": ["pymilvus==2.5.18", "milvus-lite==2.5.1", "setuptools<81"],
        "pipeline": ["tfx[kfp]==1.15.1", "kfp==1.8.22", "apache-beam[gcp]", "dill", "scann==1.3.0"],
        # Beam on a dask.distributed cluster (lce_tf/beam/dask_runner.py): the ClassCenterExtractor and `lce-tf centers
        # --beam-runner dask`; dask 2024.8 is the last to accept kfp 1.8's cloudpickle < 3. Never imported by `import lce_tf`.
        "dask": ["apache-beam[gcp]", "dask[distributed]==2024.8.0"],
        "bench": ["faiss-cpu", "psutil"],
        # The Milvus standalone server that lce_tf.testing.milvus_server starts for tests/test_milvus_server.py and
        # scripts/bench_ann.py (tests and benchmarks only; no lce-tf command starts one).
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "milvus==2.3.5"],
    },
    entry_points={"console_scripts": ["lce-tf=lce_tf.cli:main"]},
)
