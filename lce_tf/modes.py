"""The compatibility modes, each declared once (docs/design.md, the method, items 5-8).

A mode says which loss terms a new model trains with and what it needs from the old model. Everything
that branches on a mode (the CLI's `--compat` choices, `lce_tf.training.TrainConfig`,
`lce_tf.model.CompatibleEmbeddingModel`, the LceTrainer component, the pipeline config, the
benchmarks) reads the `Mode` objects here instead of spelling the names, so a mode is added or changed
in this one file (docs/design.md, "How to add a loss or a compatibility mode").

Pure Python: no TensorFlow import, so `lce-tf --help` and the pipeline config stay light.

Example:
  from lce_tf import modes
  mode = modes.get("lce-transform")      # ValueError naming the known modes if unknown
  mode.uses_transforms, mode.direct      # True, False
  [m.name for m in modes.PIPELINE_MODES]  # the modes the LceTrainer component trains
"""

from __future__ import annotations

import dataclasses

# Loss-term names as they appear in the fit history (docs/design.md item 5).
CLS_LOSS, ALIGN_LOSS, BOUNDARY_LOSS, BCT_LOSS, L2_LOSS, INSTANCE_LOSS = (
    "cls_loss", "align_loss", "boundary_loss", "bct_loss", "l2_loss", "instance_loss")

EMBED_SIGNATURE = "embed"
EMBED_COMPAT_SIGNATURE = "embed_compat"


@dataclasses.dataclass(frozen=True)
class Mode:
    """One compatibility mode.

    Attributes:
      name: the name on the command line (`--compat`), in configs and in the model metadata.
      summary: one line for help texts and docs.
      needs_old_centers: trains against the old model's class centers c_j and boundaries b_j.
      needs_old_embedder: runs the frozen old model on every training batch (l2's regression target,
        lce-instance's per-image positives).
      needs_new_model: trains no backbone: the new model is an already trained, frozen model (cross-model).
      uses_transforms: learns T12 (old -> new) and T21 (new -> old); the new model answers old-space
        queries through T21 (signature `embed_compat`).
      direct: compares the new embedding with the old one directly, so D_new must equal D_old.
      loss_terms: the loss terms logged in the fit history, in order.
      in_pipeline: the TFX LceTrainer component (and so the pipeline config) can train it; a mode that
        trains no backbone (cross-model) is library/CLI only.
    """

    name: str
    summary: str
    needs_old_centers: bool = False
    needs_old_embedder: bool = False
    needs_new_model: bool = False
    uses_transforms: bool = False
    direct: bool = False
    loss_terms: tuple[str, ...] = (CLS_LOSS,)
    in_pipeline: bool = True

    @property
    def compatible_with_old(self) -> bool:
        """The model is trained to be compatible with an old model (every mode but independent): it needs
        an old model to train against and records it in its metadata (`compatible_with`)."""
        return self.needs_old_centers or self.needs_old_embedder

    @property
    def direct_lce(self) -> bool:
        """Direct LCE terms (docs/design.md items 3-4): classifier rows aligned to the old centers, which
        also start there (`CompatibilityConfig.init_from_old_centers`), and the boundary loss on the raw
        new embeddings (lce, lce-instance)."""
        return self.direct and ALIGN_LOSS in self.loss_terms

    @property
    def trains_backbone(self) -> bool:
        return not self.needs_new_model

    @property
    def export_signature(self) -> str:
        """The signature that embeds into the old model's space (recorded in `compatible_with`)."""
        return EMBED_COMPAT_SIGNATURE if self.uses_transforms else EMBED_SIGNATURE

    def __str__(self) -> str:
        return self.name


INDEPENDENT = Mode("independent", "L_cls only: the new* reference model, not compatible with the old one")
LCE = Mode("lce", "direct LCE: classifier rows aligned to the old centers, boundary loss (equal dimensions)",
           needs_old_centers=True, direct=True, loss_terms=(CLS_LOSS, ALIGN_LOSS, BOUNDARY_LOSS))
LCE_TRANSFORM = Mode("lce-transform", "LCE through learned T12/T21 (any dimensions)", needs_old_centers=True,
                     uses_transforms=True, loss_terms=(CLS_LOSS, ALIGN_LOSS, BOUNDARY_LOSS))
LCE_INSTANCE = Mode("lce-instance", "direct LCE plus a per-image InfoNCE term pulling each new embedding to the "
                    "frozen old model's embedding of the same image (equal dimensions)",
                    needs_old_centers=True, needs_old_embedder=True, direct=True,
                    loss_terms=(CLS_LOSS, ALIGN_LOSS, BOUNDARY_LOSS, INSTANCE_LOSS))
BCT = Mode("bct", "BCT influence loss: new features classified by the old centers (equal dimensions)",
           needs_old_centers=True, direct=True, loss_terms=(CLS_LOSS, BCT_LOSS))
L2 = Mode("l2", "L2 regression onto the frozen old model's embedding (equal dimensions)", needs_old_embedder=True,
          direct=True, loss_terms=(CLS_LOSS, L2_LOSS))
CROSS_MODEL = Mode("cross-model", "both backbones frozen: only T12/T21 trained between two existing models",
                   needs_old_centers=True, needs_new_model=True, uses_transforms=True,
                   loss_terms=(ALIGN_LOSS, BOUNDARY_LOSS), in_pipeline=False)

ALL: tuple[Mode, ...] = (INDEPENDENT, LCE, LCE_INSTANCE, LCE_TRANSFORM, BCT, L2, CROSS_MODEL)
MODE_NAMES: tuple[str, ...] = tuple(m.name for m in ALL)
PIPELINE_MODES: tuple[Mode, ...] = tuple(m for m in ALL if m.in_pipeline)
PIPELINE_MODE_NAMES: tuple[str, ...] = tuple(m.name for m in PIPELINE_MODES)

_BY_NAME = {m.name: m for m in ALL}


def get(name: "str | Mode") -> Mode:
    """The mode of a name (a `Mode` is returned as is).

    Raises:
      ValueError: unknown name; the message lists the known modes.
    """
    if isinstance(name, Mode):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown compatibility mode {name!r}; expected one of {', '.join(MODE_NAMES)}.") from None


def names(selected: "tuple[Mode, ...] | list[Mode]") -> tuple[str, ...]:
    """The names of some modes, in the order given."""
    return tuple(m.name for m in selected)
