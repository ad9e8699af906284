"""Side information for the forward route: a small label-free embedding ψ stored beside each old vector.

FCT (Ramanujan et al., "Forward Compatible Training for Large-Scale Embedding Retrieval Systems", CVPR
2022) stores, when the gallery is indexed, a small extra vector ψ(x) per image next to φ1(x); the
forward transformation later reads both, T12([φ1(x); ψ(x)]) ≈ φ2(x), so it can recover what φ1 dropped
but φ2 needs (docs/design.md, "The forward path", side information). ψ must exist BEFORE v2 (it is
stored with v1's gallery), so it is trained on v1's training images without their labels: FCT uses a
self-supervised model, here SimCLR's (Chen et al., ICML 2020) NT-Xent between two augmented views.

For a batch of B images, two views each (random shift, small crop, stroke thickening/thinning, pixel
noise: `augment`), z_k = normalize(g(h_k)) with h the backbone's D_s-d output and g a small projection
head (SimCLR §2.1; h, not z, is the stored ψ), and 2B rows in all,

    ℓ_i = −log [ exp(⟨z_i, z_{p(i)}⟩/τ) / Σ_{k ≠ i} exp(⟨z_i, z_k⟩/τ) ],   L = mean_i ℓ_i        (1)

p(i) the other view of image i (`info_nce_loss`, SimCLR eq. 1). The side model is exported as an
ordinary model directory (`lce_tf.export.export_model`, `lce_tf.serving.EmbeddingModel`; its metadata's
`training.side_info` marks it) whose `embed` gives unit ψ̂(x) [N, D_s].

T12 with side information reads the concatenation of the unit parts,

    x_i = [ f̂1_i ; ψ̂_i ]  ∈ R^(D_old + D_s),    T12(x_i) = f̂1_i + Σ_p path_p(x_i)               (2)

(`append_side`; the skip stays the identity on f̂1 when D_old = D_new: `CompatibilityTransform(
skip_input_dim=D_old)`), fitted with the objective of `lce_tf.transform_fit` (`TransformFitSettings.
side_dim` = D_s). The exported transformation records the side model (`side_info` in its metadata) and
refuses old vectors without their side vectors. Storing ψ costs D_s numbers per gallery entry
(`bytes_per_entry`). Library and benchmark only for now: the indexes (ScaNN, Milvus) do not store side
vectors yet.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

SIDE_INFO_KEY = "side_info"  # the key of the side model's record in model metadata["training"]
OBJECTIVE = "simclr-infonce"
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1}


def bytes_per_entry(side_dim: int, dtype: str = "float32") -> int:
    """Bytes one gallery entry's side vector takes: D_s · size(dtype) (int8: plus nothing if the scale is
    shared by the index; a per-vector scale would add 4)."""
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype: expected one of {', '.join(BYTES_PER_VALUE)}; received {dtype!r}")
    return int(side_dim) * BYTES_PER_VALUE[dtype]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def append_side(old: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The input of a side-information T12, eq. (2): [normalize(old) ; normalize(side)] [N, D_old + D_s].

    Raises:
      ValueError: the two do not have the same number of rows, or are not 2-d.
    """
    old, side = np.asarray(old), np.asarray(side)
    if old.ndim != 2 or side.ndim != 2 or len(old) != len(side):
        raise ValueError(f"old vectors {old.shape} and side vectors {side.shape} must be [N, D_old] and [N, D_s] "
                         "with the same N")
    return np.concatenate([_unit(old), _unit(side)], axis=1)


@dataclasses.dataclass
class SideModelSettings:
    """How the side model ψ is trained (validated by `validate`).

    Attributes:
      dim: D_s, the size of the stored side vector.
      architecture: the backbone (`lce_tf.backbones.ARCHITECTURES`).
      projection_dim: width of the projection head g of eq. (1) (SimCLR); 0: no head, the loss reads ψ.
      epochs, batch_size, learning_rate: optimisation (Adam); batch_size images give 2·batch_size views.
      temperature: τ of eq. (1).
      shift_pixels: views are shifted by up to this many pixels (background fill) ...
      min_scale: ... and cropped to a random square of min_scale-1 of the image side, resized back.
      morph_probability: chance of a 3x3 min- and of a max-filter (stroke weight), each.
      noise_std: Gaussian pixel noise of the views (then clipped to [0, 1]).
      seed: seeds the weights, the order and the augmentations (op determinism on).
    """

    dim: int = 16
    architecture: str = "small_cnn"
    projection_dim: int = 64
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    temperature: float = 0.2
    shift_pixels: int = 2
    min_scale: float = 0.8
    morph_probability: float = 0.2
    noise_std: float = 0.05
    seed: int = 0

    def validate(self) -> "SideModelSettings":
        from lce_tf.backbones import ARCHITECTURES

        for name in ("dim", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer; received {value!r}")
        for name in ("projection_dim", "shift_pixels", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer; received {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {', '.join(ARCHITECTURES)}; received {self.architecture!r}")
        for name, low, high in (("learning_rate", 0.0, math.inf), ("temperature", 0.0, math.inf),
                                ("min_scale", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"{name}: expected a number in ({low:g}, {high:g}]; received {value!r}")
        for name in ("morph_probability", "noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1]; received {value!r}")
        return self


def info_nce_loss(z1, z2, temperature: float):
    """SimCLR's NT-Xent, eq. (1): z1, z2 [B, D] the two views' projections (normalized here); returns the
    per-row losses [2B] (row i < B: view 1 of image i, row B + i: view 2).

    Example (B = 1, D = 2): z1 = [[1, 0]], z2 = [[1, 0]]: the only other row is the positive, so each row's
    loss is −log(e^(1/τ) / e^(1/τ)) = 0.
    """
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=-1)
    n = tf.shape(z)[0]
    half = n // 2
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = logits - tf.eye(n, dtype=logits.dtype) * 1e9  # k ≠ i
    positives = tf.concat([tf.range(half, n), tf.range(0, half)], axis=0)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)


def augment(images, settings: SideModelSettings, generator):
    """One random view of every image [B, H, W, C] in [0, 1] (same shape): a shift of up to `shift_pixels`
    and a crop of `min_scale`-1 of the side (one `crop_and_resize` from the background-padded image), a
    3x3 min- or max-filter with `morph_probability` each (thicker or thinner strokes), Gaussian noise."""
    import tensorflow as tf

    from lce_tf.datasets import _pad_with_background  # pylint: disable=protected-access

    images = tf.convert_to_tensor(images, tf.float32)
    batch = tf.shape(images)[0]
    height, width = int(images.shape[1]), int(images.shape[2])
    s = settings.shift_pixels
    padded = _pad_with_background(images, s) if s else images
    scale = generator.uniform([batch], settings.min_scale, 1.0)
    centre = tf.stack([generator.uniform([batch], -s, s + 1e-6) for _ in range(2)], axis=1)  # pixels
    sides = tf.constant([height + 2 * s, width + 2 * s], tf.float32)
    half = tf.stack([scale * height, scale * width], axis=1) / 2.0
    middle = sides / 2.0 + centre
    boxes = tf.concat([(middle - half) / sides, (middle + half) / sides], axis=1)  # [y1, x1, y2, x2]
    views = tf.image.crop_and_resize(padded, boxes, tf.range(batch), [height, width])
    if settings.morph_probability:
        pick = generator.uniform([batch, 1, 1, 1])
        low = -tf.nn.max_pool2d(-views, 3, 1, "SAME")
        high = tf.nn.max_pool2d(views, 3, 1, "SAME")
        p = settings.morph_probability
        views = tf.where(pick < p, low, tf.where(pick < 2 * p, high, views))
    if settings.noise_std:
        views = views + generator.normal(tf.shape(views), stddev=settings.noise_std)
    return tf.clip_by_value(views, 0.0, 1.0)


def build_side_model(input_shape: Sequence[int], settings: SideModelSettings):
    """(embedder, head): embedder images [B, H, W, C] -> unit ψ̂ [B, D_s] (a `SideEmbedder`, what is
    exported); head ψ -> g(ψ) [B, projection_dim] of eq. (1) (None when projection_dim is 0)."""
    import tensorflow as tf

    from lce_tf.backbones import build_backbone

    backbone = build_backbone(settings.architecture, input_shape, settings.dim)
    head = None
    if settings.projection_dim:
        head = tf.keras.Sequential([tf.keras.layers.Dense(settings.projection_dim, activation="relu"),
                                    tf.keras.layers.Dense(settings.projection_dim)], name="projection_head")
        head.build((None, settings.dim))
    return SideEmbedder(backbone), head


def _side_embedder_class():
    import tensorflow as tf

    class _SideEmbedder(tf.keras.Model):
        """images -> unit ψ̂(images) [B, D_s]; the interface `lce_tf.export.export_model` reads (no T12/T21)."""

        t12 = None
        t21 = None

        def __init__(self, backbone, **kwargs):
            super().__init__(name="side_model", **kwargs)
            self.backbone = backbone
            self.embedding_dim = int(backbone.output.shape[-1])

        def call(self, images, training=None):
            return tf.math.l2_normalize(self.backbone(images, training=training), axis=-1, epsilon=1e-12)

    return _SideEmbedder


def SideEmbedder(backbone):  # pylint: disable=invalid-name
    """A `tf.keras.Model` images -> unit ψ̂ [B, D_s] around `backbone` (built lazily: TensorFlow is imported
    only when a side model is built)."""
    return _side_embedder_class()(backbone)


@dataclasses.dataclass
class TrainedSideModel:
    """The result of `train_side_model`: the embedder, its settings, per-epoch mean losses and seconds."""

    model: Any
    settings: SideModelSettings
    history: list[float]
    seconds: float
    num_images: int

    def embed(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Unit ψ̂ [N, D_s] of images [N, H, W, C] (inference mode)."""
        out = [self.model(images[i:i + batch_size], training=False).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.settings.dim), np.float32)


def train_side_model(images: np.ndarray, settings: SideModelSettings, *, steps: Optional[int] = None,
                     progress: Optional[Callable[[str], None]] = None) -> TrainedSideModel:
    """Trains ψ on images without labels, eq. (1) (Adam; full batches of `batch_size` images, a new seeded
    order every epoch).

    Args:
      images: float32 [N, H, W, C] in [0, 1]: the OLD model's training images (no labels are read).
      settings: the side model's settings.
      steps: stop after this many steps in all (tests); default every epoch in full.
      progress: called with one line per epoch.

    Raises:
      ValueError: bad settings, or fewer than 2 images.
      lce_tf.training.TrainingDivergedError: the loss became NaN/Inf.
    """
    import tensorflow as tf

    from lce_tf.training import TrainingDivergedError, seed_everything

    settings.validate()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"images: expected [N, H, W, C] with N >= 2; received shape {images.shape}")
    batch = min(settings.batch_size, len(images))
    seed_everything(settings.seed)
    embedder, head = build_side_model(images.shape[1:], settings)
    variables = embedder.trainable_variables + (head.trainable_variables if head is not None else [])
    optimizer = tf.keras.optimizers.Adam(settings.learning_rate)
    optimizer.build(variables)
    generator = tf.random.Generator.from_seed(settings.seed)

    @tf.function(input_signature=[tf.TensorSpec([batch, *images.shape[1:]], tf.float32)])
    def train_step(x):
        views = tf.concat([augment(x, settings, generator), augment(x, settings, generator)], axis=0)
        with tf.GradientTape() as tape:
            psi = embedder.backbone(views, training=True)
            z = head(psi, training=True) if head is not None else psi
            loss = tf.reduce_mean(info_nce_loss(z[:batch], z[batch:], settings.temperature))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng([settings.seed, 3])
    history: list[float] = []
    start, done = time.perf_counter(), 0
    for epoch in range(settings.epochs):
        order = rng.permutation(len(images))
        losses = []
        for i in range(0, len(order) - batch + 1, batch):
            losses.append(float(train_step(tf.constant(images[np.sort(order[i:i + batch])]))))
            done += 1
            if steps is not None and done >= steps:
                break
        history.append(float(np.mean(losses)))
        if not np.isfinite(history[-1]):
            raise TrainingDivergedError(f"side model training diverged: the loss became {history[-1]} in epoch "
                                        f"{epoch + 1}; lower the learning rate")
        if progress:
            progress(f"side model epoch {epoch + 1}/{settings.epochs}: InfoNCE {history[-1]:.4f}")
        if steps is not None and done >= steps:
            break
    return TrainedSideModel(embedder, settings, history, time.perf_counter() - start, len(images))


def export_side_model(trained: TrainedSideModel, out_dir: str, *, version: str = "side",
                      trained_on: Optional[dict[str, Any]] = None, overwrite: bool = False) -> dict[str, Any]:
    """Writes the side model as a model directory (`lce_tf.export.export_model`): `embed` gives unit ψ̂(x)
    [N, D_s]; metadata["training"]["side_info"] records the objective, the settings, the final loss and
    `trained_on` (e.g. {"data": ..., "labels_used": False}). Returns the metadata."""
    from lce_tf.export import export_model

    input_shape = [int(v) for v in trained.model.backbone.input_shape[1:]]
    record = {"objective": OBJECTIVE, "settings": dataclasses.asdict(trained.settings),
              "final_loss": trained.history[-1] if trained.history else None, "num_images": trained.num_images,
              "labels_used": False, "trained_on": dict(trained_on or {})}
    return export_model(trained.model, out_dir, architecture=trained.settings.architecture, input_shape=input_shape,
                        version=version, training={SIDE_INFO_KEY: record}, overwrite=overwrite)


def load_side_model(model_dir: str):
    """Loads a side model directory (`lce_tf.serving.EmbeddingModel`).

    Raises:
      ValueError: the directory is not a model directory, or its model is not a side model (one line).
    """
    from lce_tf.serving import load_embedding_model

    model = load_embedding_model(model_dir)
    if SIDE_INFO_KEY not in (model.metadata.get("training") or {}):
        raise ValueError(f"model {model.model_id} ({model_dir}) is not a side-information model (its metadata has "
                         f"no training.{SIDE_INFO_KEY}); train one with lce_tf.side_info.train_side_model")
    return model


def side_record(model_metadata: dict[str, Any]) -> dict[str, Any]:
    """What a side-information transformation records of its side model: model id, space, dimension."""
    return {"model_id": model_metadata["model_id"], "embedding_space": model_metadata["embedding_space"],
            "dim": int(model_metadata["embedding_dim"])}
