"""`import lce_tf` and every lce_tf module leave tfx, apache_beam, scann and pymilvus out of sys.modules."""

import subprocess
import sys

SCRIPT = """
import importlib, pkgutil, sys
import lce_tf
assert 'tensorflow' not in sys.modules, 'import lce_tf alone must not import tensorflow'
names = sorted(m.name for m in pkgutil.walk_packages(lce_tf.__path__, 'lce_tf.'))
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('tfx', 'apache_beam', 'scann', 'pymilvus', 'milvus_lite'))
assert not heavy, heavy
print(' '.join(names))
"""


def test_lce_tf_modules_never_import_tfx_beam_scann_or_pymilvus():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True).stdout
    imported = out.split()
    for expected in ("lce_tf.cli", "lce_tf.model", "lce_tf.losses", "lce_tf.centers", "lce_tf.evaluation",
                     "lce_tf.index.milvus_index", "lce_tf.index.scann_index", "lce_tf.index.registry"):
        assert expected in imported
