"""The collapse guard: refuse a model whose embeddings all point one way (docs/design.md, "Known traps").

With BatchNormalization moving statistics that have not converged (too few training steps, or Keras'
default momentum 0.99, e.g. a keras.applications backbone after a short fine-tune), every image is
embedded into one narrow cone at inference: the mean pairwise cosine of any sample is 0.999-1.000,
retrieval is noise, and nothing else fails. The guard measures that cosine and refuses above
`lce_tf.defaults.COLLAPSE_MAX_COSINE` (0.99):

- `lce-tf train` / `lce_tf.training_run.run_training`: measured on up to `SAMPLE_SIZE` training images at the
  end of the run, recorded in the model's metadata (`training.collapse_check`); a collapsed model is not
  exported (the LceTrainer and `lce-tf train` fail with one line, nothing is written);
- `lce-tf evaluate` (`lce_tf.comparison.compare_models(refuse_collapsed=True)`): measured on each model's
  gallery embeddings, one line naming the model;
- the CompatibilityValidator: the candidate's gallery value goes into `lce_tf.gate.decide`, which fails the
  gate with the reason.

`lce-tf centers` warns at a lower bar on the class centers (`lce_tf.centers.COLLAPSE_COSINE_WARNING`, 0.9),
where one cone of embeddings makes the boundaries meaningless; `ClassCenters.mean_pairwise_cosine` is
`mean_pairwise_cosine` of its unit rows.

Pure Python at import (NumPy is imported by `mean_pairwise_cosine` when called), so `lce_tf.gate` can apply
the rule.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lce_tf import defaults

COLLAPSE_MAX_COSINE = defaults.COLLAPSE_MAX_COSINE
SAMPLE_SIZE = 256
"""Images `run_training` embeds for its check: the first ones its training pipeline yields after the fit."""
LIKELY_CAUSE = ("likely cause: BatchNorm moving statistics not converged (too few training steps, or "
                "momentum 0.99); train longer or use momentum 0.9 (docs/design.md, \"Known traps\")")


class CollapsedEmbeddingError(ValueError):
    """A model's embeddings collapsed into one cone; the one-line message names the model and the cosine."""


def mean_pairwise_cosine(vectors: Any, *, normalize: bool = True) -> float:
    """Mean of cos(e_i, e_j) over the ordered pairs i != j of the rows of `vectors`: exact, in O(N·D).

    With unit rows ê_i, Σ_{i≠j} ⟨ê_i, ê_j⟩ = ‖Σ_i ê_i‖² − Σ_i ‖ê_i‖², so the mean is
    (‖Σ_i ê_i‖² − Σ_i ‖ê_i‖²) / (N(N−1)); the second sum is N unless a row is zero (a zero row has
    cosine 0 with every other row here, as `tf.math.l2_normalize` leaves it zero). Computed in float64.

    Args:
      vectors: [N, D] embeddings (any norm when `normalize`).
      normalize: L2-normalize the rows first; False for rows that are unit already (class centers).

    Returns:
      The mean pairwise cosine in [-1/(N−1), 1]: 1 when every row points one way, about 0 for random
      directions in many dimensions; NaN when N < 2.

    Raises:
      ValueError: `vectors` is not a 2-D array.
      lce_tf.checks.NonFiniteError: it holds NaN/Inf.
    """
    import numpy as np

    from lce_tf.checks import check_finite

    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"mean_pairwise_cosine expects vectors of shape [N, D]; received shape {v.shape}")
    check_finite(v, "embeddings")
    n = v.shape[0]
    if n < 2:
        return math.nan
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    total = v.sum(axis=0)
    return float((total @ total - np.sum(v * v)) / (n * (n - 1)))


def is_collapsed(cosine: Optional[float]) -> bool:
    """True when a measured mean pairwise cosine is above `COLLAPSE_MAX_COSINE` (None or NaN: not measured)."""
    return cosine is not None and not math.isnan(cosine) and cosine > COLLAPSE_MAX_COSINE


def collapse_record(embeddings: Any) -> dict[str, Any]:
    """What a check records: {"mean_pairwise_cosine": float or None (fewer than 2 rows), "sample": N,
    "max_cosine": the threshold} of embeddings [N, D] (the exported metadata's `training.collapse_check`)."""
    cosine = mean_pairwise_cosine(embeddings)
    return {"mean_pairwise_cosine": None if math.isnan(cosine) else round(cosine, 6),
            "sample": int(len(embeddings)), "max_cosine": COLLAPSE_MAX_COSINE}


def collapse_message(what: str, cosine: float, sample: str) -> str:
    """The one line: '<what>: its embeddings collapsed: mean pairwise cosine 0.9995 of <sample> > 0.99;
    likely cause: ...'."""
    return (f"{what}: its embeddings collapsed: mean pairwise cosine {cosine:.4f} of {sample} > "
            f"{COLLAPSE_MAX_COSINE:g}; {LIKELY_CAUSE}")


def check_not_collapsed(cosine: Optional[float], what: str, sample: str) -> None:
    """Raises when a measured mean pairwise cosine is above the threshold (`is_collapsed`).

    Args:
      cosine: the measured mean pairwise cosine (None or NaN: fewer than 2 embeddings, nothing to judge).
      what: the model as the message names it, e.g. "model v2 (v2-1a2b3c4d)" or
        "model v2 not exported to models/v2".
      sample: what was embedded, e.g. "256 training images", "40 gallery images of data/gallery".

    Raises:
      CollapsedEmbeddingError: one line naming `what`, the value, the threshold and the likely cause.
    """
    if is_collapsed(cosine):
        raise CollapsedEmbeddingError(collapse_message(what, float(cosine), sample))
