"""`import lce_tf` and every lce_tf module leave tfx, apache_beam, scann and pymilvus out of sys.modules;
the Beam modules of lce_tf.beam, imported only by code that runs Beam, never import tfx."""

import subprocess
import sys

# The lce_tf modules that import apache_beam at module level (docs/design.md, "Architecture").
BEAM_MODULES = ("lce_tf.beam.centers", "lce_tf.beam.dask_runner")

SCRIPT = """
import importlib, pkgutil, sys
import lce_tf
assert 'tensorflow' not in sys.modules, 'import lce_tf alone must not import tensorflow'
beam_modules = set(sys.argv[1:])
names = sorted(m.name for m in pkgutil.walk_packages(lce_tf.__path__, 'lce_tf.'))
for name in names:
    if name not in beam_modules:
        importlib.import_module(name)
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('tfx', 'apache_beam', 'scann', 'pymilvus', 'milvus_lite', 'dask', 'distributed'))
assert not heavy, heavy
for name in sorted(beam_modules):
    importlib.import_module(name)
assert 'apache_beam' in sys.modules, 'the Beam modules import apache_beam'
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tfx', 'scann', 'pymilvus', 'milvus_lite'))
assert not heavy, heavy
print(' '.join(names))
"""


def test_lce_tf_modules_never_import_tfx_beam_scann_or_pymilvus():
    out = subprocess.run([sys.executable, "-c", SCRIPT, *BEAM_MODULES], check=True, capture_output=True,
                         text=True).stdout
    imported = out.split()
    for expected in ("lce_tf.cli", "lce_tf.model", "lce_tf.losses", "lce_tf.centers", "lce_tf.evaluation",
                     "lce_tf.index.milvus_index", "lce_tf.index.scann_index", "lce_tf.index.registry",
                     "lce_tf.gate", "lce_tf.beam.options", "lce_tf.testing.milvus_server", *BEAM_MODULES):
        assert expected in imported
