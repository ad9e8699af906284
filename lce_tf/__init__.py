"""lce_tf: Learning Compatible Embeddings for TensorFlow/Keras.

Importing this package is cheap: TensorFlow is imported by the submodules that need it, and tfx,
apache_beam and scann are never imported at module import time.
"""

__version__ = "0.1.0"
