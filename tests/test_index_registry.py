"""lce_tf.index.registry: backend names -> classes (lazily imported), dispatch by index.json, and the
package's layering (no module imports a backend module directly; backends never import each other)."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from lce_tf import fileio
from lce_tf.index import base, registry

INDEX_DIR = pathlib.Path(__file__).resolve().parent.parent / "lce_tf" / "index"
BACKEND_MODULES = {spec.partition(":")[0].rsplit(".", 1)[-1] for spec in registry.BACKENDS.values()}


def test_registry_maps_each_name_to_its_index_subclass():
    assert registry.backend_names()[:2] == ("scann", "milvus") and registry.DEFAULT_BACKEND == "scann"
    for name in registry.backend_names():
        cls = registry.backend_class(name)
        assert issubclass(cls, base.Index) and cls is not base.Index
        assert cls.NAME == name and cls.TITLE
    assert registry.backend_class("scann").__name__ == "EmbeddingIndex"
    assert registry.backend_class("milvus").__name__ == "MilvusIndex"


@pytest.mark.parametrize("name", ["faiss", "", "SCANN", None, 3])
def test_unknown_backend_names_the_known_ones(name):
    with pytest.raises(ValueError, match=r"^index backend must be one of scann, milvus(, \w+)*; received "):
        registry.backend_class(name)


def test_the_registry_imports_no_backend_library_until_asked():
    code = ("import sys\nfrom lce_tf.index import registry, images, operations\n"
            "heavy = lambda: sorted(m for m in sys.modules if m.split('.')[0] in "
            "('scann', 'pymilvus', 'milvus_lite', 'tensorflow'))\n"
            "assert not heavy(), heavy()\n"
            "assert 'lce_tf.index.milvus_index' not in sys.modules and 'lce_tf.index.scann_index' not in sys.modules\n"
            "registry.backend_class('milvus'); registry.backend_class('scann')\n"
            "assert not heavy(), heavy()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n.rsplit(".", 1)[-1] for n in names if n.startswith("lce_tf.index")}


def test_no_module_of_the_package_imports_a_backend_module():
    for path in sorted(INDEX_DIR.glob("*.py")):
        imported = _imports(path) & BACKEND_MODULES
        assert not imported, f"{path.name} imports {sorted(imported)}: go through lce_tf.index.registry"
    assert {"scann_index", "milvus_index"} <= BACKEND_MODULES


class FakeIndex(base.Index):
    """A backend defined outside lce_tf: registering it is one line (its abstract methods are stubs)."""

    NAME = "fake"
    TITLE = "Fake"

    def __init__(self, root, metadata):
        self._root, self._metadata, self._config = root, metadata, None

    @classmethod
    def load(cls, index_dir):
        root = registry.resolve_index_dir(index_dir)
        return cls(root, registry.read_index_metadata(root))

    def __len__(self):
        return int(self._metadata["count"])


for _name in sorted(FakeIndex.__abstractmethods__ - {"load", "__len__"}):
    setattr(FakeIndex, _name, lambda *a, **k: NotImplemented)
FakeIndex.__abstractmethods__ = frozenset()


def _write_index_json(root: pathlib.Path, backend: str) -> None:
    root.mkdir()
    metadata = {"format": base.INDEX_FORMAT, "embedding_space": "s", "dim": 4, "model_id": "m", "model_version": "v",
                "config": {}, "count": 2, "files": {}, "backend": backend}
    metadata["checksum"] = fileio.json_checksum(metadata)
    (root / base.METADATA_FILE).write_text(json.dumps(metadata))


def test_open_index_dispatches_through_the_registry(tmp_path, monkeypatch):
    _write_index_json(tmp_path / "idx", "fake")
    with pytest.raises(ValueError, match=r"names backend 'fake'; this lce_tf reads scann, milvus"):
        registry.open_index(str(tmp_path / "idx"))
    monkeypatch.setitem(registry.BACKENDS, "fake", f"{__name__}:FakeIndex")
    index = registry.open_index(str(tmp_path / "idx"))
    assert type(index).__name__ == "FakeIndex" and len(index) == 2 and index.backend == "fake"
    assert "fake" in registry.backend_names()
