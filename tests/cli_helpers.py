"""The lce-tf CLI called in-process by the tests, and the bad-input contract they check."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Optional

from lce_tf import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Runs `lce-tf ARGV...` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(capsys, *argv, match: Optional[str] = None, pattern: Optional[str] = None) -> None:
    """The command exits 2 with one `lce-tf: error: ` line and no traceback, containing `match` (a
    substring) or matching `pattern` (a regular expression)."""
    code, _, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lce-tf: error: ") and "Traceback" not in err, err
    if match is not None:
        assert match in lines[0], lines[0]
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]


def write_linear_transformation(path, matrix, source: str, target: str, transform_id: str,
                                source_dim: Optional[int] = None) -> None:
    """A transformation directory whose old_to_new is normalize(x @ matrix), from space `source` (of
    dimension `source_dim`, default the matrix's rows) into `target`: an exactly known T for the CLI."""
    import numpy as np
    import tensorflow as tf

    from lce_tf import transformation as TR

    matrix = np.asarray(matrix, np.float32)
    module = tf.Module()
    module.w = tf.Variable(matrix)
    fn = tf.function(lambda embeddings: {"embedding": tf.math.l2_normalize(embeddings @ module.w, axis=-1)},
                     input_signature=[tf.TensorSpec([None, matrix.shape[0]], tf.float32, name="embeddings")])
    TR.write_transformation_dir(str(path), module, {"old_to_new": fn},
                                source={"embedding_space": source, "model_id": source,
                                        "dim": source_dim or matrix.shape[0]},
                                target={"embedding_space": target, "model_id": target, "dim": matrix.shape[1]},
                                transform_id=transform_id, fitted_on={}, settings={}, fit_loss={"old_to_new": 0.0})


def settle_batch_norm(model, images) -> None:
    """Sets the BatchNorm moving statistics of `model`'s backbone (a `CompatibleEmbeddingModel`) to those of
    `images` [N, H, W, C]: one forward pass in training mode with momentum 0, no gradient step; what a trained
    model's statistics converge to. An untrained test model is otherwise collapsed (mean pairwise cosine
    0.97-1.00 with the initial statistics), which `lce-tf evaluate` refuses (lce_tf.collapse; docs/design.md,
    "Known traps")."""
    import tensorflow as tf

    layers = [layer for layer in model.backbone.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model.backbone(images, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


def export_collapsed_model(path, input_shape, dim: int = 8, version: str = "vc") -> dict:
    """Exports an 8-d small_cnn whose embedding BatchNorm holds moving statistics that do not describe its
    features (variance 1e6, offset 1 in every dimension): every image lands within a hair of one direction,
    the collapse unconverged statistics cause (docs/design.md, "Known traps"). Returns the metadata."""
    import numpy as np

    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    model = build_compatible_model("small_cnn", tuple(input_shape), dim, None)
    head = model.backbone.get_layer("embedding_bn")
    head.moving_variance.assign(np.full(dim, 1e6, np.float32))
    head.beta.assign(np.ones(dim, np.float32))
    return export_model(model, str(path), architecture="small_cnn", input_shape=input_shape, version=version)


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py imported as the module `name` (registered in sys.modules: dataclasses resolve string
    annotations through it)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
