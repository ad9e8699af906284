"""Models trained outside lce-tf, imported as model directories (docs/design.md, "Artifacts and formats").

SRC is a Keras model file (`.keras`, `.h5` / `.hdf5`, loaded with `tf.keras.models.load_model(compile=False)`)
or a SavedModel directory (loaded with `tf.saved_model.load`; one of its signatures is called, so a Keras
SavedModel needs none of its custom objects). The model directory written takes lce-tf's input convention,
images float32 [N, H, W, C] in [0, 1] as `lce_tf.datasets` decodes them, and returns unit embeddings:

    embed(x) = normalize( output( model( preprocess(x) ) ) )       x in [0, 1], p = 255·x the decoded pixels

with the preprocessing the user declares (`--preprocess`, `parse_preprocess`):

    unit                x                    the model was trained on [0, 1] pixels, as lce-tf's own models
    raw                 p                    [0, 255] as decoded
    scale=A,offset=B    A·p + B              e.g. scale=0.0078431373,offset=-1 for [-1, 1]
    FAMILY              keras.applications.<module>.preprocess_input(p)   (`lce_tf.catalog.KERAS_PREPROCESS`)

The declaration is the whole difference between right and wrong embeddings (a keras.applications model fed
[0, 1] pixels gives vectors at cosine about 0 to its own), so it has no default, and `check_against_vectors`
(`--check`) re-embeds a sample of images whose vectors the user already has and refuses the import when any
cosine is below `MIN_CHECK_COSINE`.

The embedding space is the name the user gives, and the model id is that same name: lce-tf names a model's
space by its model id (class centers record `source_model_id`, a compatible v2 records the old model's id as the
space it answers), so an imported model is the first of its lineage like any exported one, and importing the same
model under the same name gives the same ids. The metadata also records the source (file name, format, sha256),
the preprocessing and, with `--check`, the cosines measured. The files are written by `lce_tf.export`'s writer
(`save_model_files`) into a temporary sibling that is renamed into place, so nothing is written when a check fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from lce_tf import catalog, collapse, defaults, export, fileio
from lce_tf.checks import check_finite
from lce_tf.index import checks as index_checks
from lce_tf.serving import METADATA_FILE

ARCHITECTURE = "imported"
"""The `architecture` of an imported model's metadata."""
MIN_CHECK_COSINE = defaults.IMPORT_CHECK_MIN_COSINE
CHECK_SAMPLE = defaults.IMPORT_CHECK_SAMPLE
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_SCALE = re.compile(r"scale=([^,=]+)(?:,offset=([^,=]+))?")
_FORMULAS = {"unit": "x", "raw": "255*x", "scale": "{scale!r}*(255*x) + {offset!r}",
             "family": "tf.keras.applications.{module}.preprocess_input(255*x)"}


# ---------------------------------------------------------------------------------------------------------------
# The declaration: preprocessing, embedding space, image size (pure Python)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How images x in [0, 1] become the source model's input (the module docstring's table).

    Attributes:
      kind: "unit", "raw", "scale" or "family".
      scale, offset: A and B of `scale=A,offset=B` (kind "scale"): the input is A·(255·x) + B.
      family: a key of `lce_tf.catalog.KERAS_PREPROCESS` (kind "family").
    """

    kind: str
    scale: float = 1.0
    offset: float = 0.0
    family: Optional[str] = None

    @property
    def spec(self) -> str:
        """The `--preprocess` text that gives this preprocessing (recorded in the metadata)."""
        if self.kind == "scale":
            return f"scale={self.scale!r},offset={self.offset!r}"
        return self.family if self.kind == "family" else self.kind

    @property
    def formula(self) -> str:
        """The model's input as a formula of x in [0, 1], e.g. "255*x"."""
        module = catalog.KERAS_PREPROCESS.get(self.family or "", "")
        return _FORMULAS[self.kind].format(scale=self.scale, offset=self.offset, module=module)

    def apply(self, images: tf.Tensor) -> tf.Tensor:
        """images float32 [N, H, W, C] in [0, 1] -> the source model's input [N, H, W, C]."""
        if self.kind == "unit":
            return images
        pixels = images * 255.0
        if self.kind == "family":
            module = getattr(tf.keras.applications, catalog.KERAS_PREPROCESS[self.family])
            return module.preprocess_input(pixels)
        return pixels * self.scale + self.offset if self.kind == "scale" else pixels


def parse_preprocess(spec: str) -> Preprocess:
    """`--preprocess` text -> `Preprocess`: unit, raw, a keras.applications family, or scale=A,offset=B.

    Raises:
      ValueError: one line listing what is accepted.
    """
    text = (spec or "").strip()
    if text in ("unit", "raw"):
        return Preprocess(text)
    if text in catalog.KERAS_PREPROCESS:
        return Preprocess("family", family=text)
    match = _SCALE.fullmatch(text)
    if match:
        try:
            scale, offset = float(match.group(1)), float(match.group(2) or 0.0)
        except ValueError:
            scale = offset = float("nan")
        if np.isfinite(scale) and np.isfinite(offset):
            return Preprocess("scale", scale=scale, offset=offset)
    raise ValueError(f"--preprocess {spec!r} is not one of: unit ([0, 1] pixels, lce-tf's own), raw ([0, 255] as "
                     "decoded), scale=A,offset=B (A*(255*x) + B), or a keras.applications family: "
                     f"{', '.join(catalog.KERAS_PREPROCESS)}.")


def check_space_name(name: str) -> str:
    """An embedding-space name (`lce_tf.index.checks.check_space_name`, also `lce-tf index import --space`'s rule).

    Raises:
      ValueError: one line naming the value.
    """
    return index_checks.check_space_name(name, "--embedding-space")


def resolve_image_shape(model_shape: Sequence[Optional[int]], image_size: Optional[Sequence[int]],
                        what: str) -> tuple[int, int, int]:
    """The (H, W, C) images the imported model takes, from its input [H, W, C] (None where any) and --image-size.

    Args:
      model_shape: the source model's input shape without the batch axis, None where it takes any size.
      image_size: (H, W) or (H, W, C) of `--image-size`, or None.
      what: how messages name the model.

    Raises:
      ValueError: --image-size is needed (the model takes any height or width) and missing, or it disagrees
        with the model, or the channels are not 1 or 3 (what lce-tf decodes).
    """
    if len(model_shape) != 3:
        raise ValueError(f"{what} takes inputs of shape {_shape_text([None, *model_shape])}, not images "
                         "[N, H, W, C].")
    if image_size is not None:
        if len(image_size) not in (2, 3) or any(int(v) < 1 for v in image_size):
            raise ValueError(f"--image-size expects H W or H W C, positive; received {' '.join(map(str, image_size))}.")
        given = [int(v) for v in image_size] + [None] * (3 - len(image_size))
    else:
        given = [None, None, None]
    shape = []
    for axis, (mine, theirs) in enumerate(zip(model_shape, given)):
        if mine is not None and theirs is not None and int(mine) != theirs:
            raise ValueError(f"{what} takes images {_shape_text(model_shape)} (H, W, C) but --image-size gives "
                             f"{' '.join(map(str, image_size))}.")
        value = theirs if mine is None else int(mine)
        if value is None:
            raise ValueError(f"{what} takes images of any {('height', 'width', 'channel count')[axis]} (input "
                             f"{_shape_text(model_shape)}): pass --image-size H W" + (" C" if axis == 2 else "") + ".")
        shape.append(value)
    if shape[2] not in (1, 3):
        raise ValueError(f"{what} takes images with {shape[2]} channels; lce-tf feeds 1 (grayscale) or 3 (RGB).")
    return shape[0], shape[1], shape[2]


def _shape_text(shape: Sequence[Optional[int]]) -> str:
    return "[" + ", ".join("None" if v is None else str(int(v)) for v in shape) + "]"


# ---------------------------------------------------------------------------------------------------------------
# The source model


@dataclasses.dataclass
class SourceModel:
    """A loaded SRC reduced to one image input and one output.

    Attributes:
      path: SRC as given.
      format: "keras" (.keras), "h5" (.h5 / .hdf5) or "saved_model".
      call: input [N, H, W, C] of `input_dtype` -> the chosen output.
      input_shape: [H, W, C] of the model's input, None where it takes any size.
      input_dtype: the input's dtype.
      output_name: the chosen output (a Keras output name or a signature's output key).
      output_shape, output_dtype: its static shape (batch axis included; None when unknown) and dtype.
      signature: the SavedModel signature called (None for Keras files).
      trackables: what the serving module must track so the SavedModel it writes holds the weights.
    """

    path: str
    format: str
    call: Callable[[tf.Tensor], tf.Tensor]
    input_shape: list
    input_dtype: tf.DType
    output_name: str
    output_shape: Optional[list]
    output_dtype: tf.DType
    signature: Optional[str]
    trackables: list

    def describe(self) -> str:
        return f"{self.path} (output {self.output_name!r}" + (
            f" of signature {self.signature!r})" if self.signature else ")")


def _pick_output(names: Sequence[str], output: Optional[str], src: str) -> int:
    if output is None:
        if len(names) == 1:
            return 0
        raise ValueError(f"{src} has {len(names)} outputs ({', '.join(names)}): choose the embedding with "
                         "--output.")
    if output in names:
        return list(names).index(output)
    raise ValueError(f"--output {output!r} is not an output of {src}; it has {', '.join(names)}.")


def _load_keras(src: str, output: Optional[str]) -> SourceModel:
    try:
        model = tf.keras.models.load_model(src, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad file; one line names it
        raise ValueError(f"Cannot load {src} as a Keras model: {_first_line(e)}") from None
    if not model.inputs:
        raise ValueError(f"{src} declares no inputs (a subclassed model?): save it as a SavedModel with a "
                         "serving signature and import that.")
    if len(model.inputs) != 1:
        raise ValueError(f"{src} takes {len(model.inputs)} inputs; an embedding model takes one image tensor.")
    names = list(model.output_names)
    index = _pick_output(names, output, src)
    tensor = model.outputs[index]

    def call(images: tf.Tensor) -> tf.Tensor:
        outputs = model(images, training=False)
        if isinstance(outputs, dict):
            return outputs[names[index]]
        return outputs[index] if isinstance(outputs, (list, tuple)) else outputs

    spec = model.inputs[0]
    return SourceModel(
        path=src, format="keras" if src.lower().endswith(".keras") else "h5", call=call,
        input_shape=list(spec.shape[1:]), input_dtype=spec.dtype, output_name=names[index],
        output_shape=None if tensor.shape.rank is None else list(tensor.shape), output_dtype=tensor.dtype,
        signature=None, trackables=list(model.variables))


def _load_saved_model(src: str, signature: Optional[str], output: Optional[str]) -> SourceModel:
    try:
        loaded = tf.saved_model.load(src)
    except Exception as e:  # noqa: BLE001 - one line names the directory
        raise ValueError(f"Cannot load the SavedModel {src}: {_first_line(e)}") from None
    available = list(loaded.signatures.keys())
    if signature is None:
        if "serving_default" in available or len(available) == 1:
            signature = "serving_default" if "serving_default" in available else available[0]
        else:
            raise ValueError(f"SavedModel {src} has " + (f"the signatures {', '.join(available)}: choose one with "
                             "--signature." if available else "no signatures; save it with signatures=..."))
    elif signature not in available:
        raise ValueError(f"--signature {signature!r} is not a signature of {src}; it has "
                         f"{', '.join(available) or 'none'}.")
    fn = loaded.signatures[signature]
    inputs = fn.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"Signature {signature!r} of {src} takes {len(inputs)} inputs ({', '.join(inputs)}); an "
                         "embedding model takes one image tensor.")
    input_name, spec = next(iter(inputs.items()))
    outputs = fn.structured_outputs
    names = sorted(outputs)
    name = names[_pick_output(names, output, f"signature {signature!r} of {src}")]
    tensor = outputs[name]
    if spec.shape.rank is None:
        raise ValueError(f"Signature {signature!r} of {src} declares no rank for its input {input_name!r}.")

    def call(images: tf.Tensor) -> tf.Tensor:
        return fn(**{input_name: images})[name]

    return SourceModel(
        path=src, format="saved_model", call=call, input_shape=list(spec.shape[1:]), input_dtype=spec.dtype,
        output_name=name, output_shape=None if tensor.shape.rank is None else list(tensor.shape),
        output_dtype=tensor.dtype, signature=signature, trackables=[loaded])


def load_source(src: str, *, signature: Optional[str] = None, output: Optional[str] = None) -> SourceModel:
    """Loads SRC: a .keras / .h5 / .hdf5 Keras file or a SavedModel directory.

    Args:
      src: the file or directory.
      signature: the SavedModel signature to call (default `serving_default`, or the only one).
      output: the output holding the embedding, when the model has several (a Keras output name or a
        signature's output key).

    Raises:
      ValueError: one line: SRC missing or of an unknown kind, unloadable, several inputs, several outputs and
        no `output`, an unknown `signature` or `output`, an input that is not float images.
    """
    if os.path.isdir(src):
        if not any(os.path.exists(os.path.join(src, n)) for n in ("saved_model.pb", "saved_model.pbtxt")):
            raise ValueError(f"{src} is a directory but not a SavedModel (no saved_model.pb).")
        source = _load_saved_model(src, signature, output)
    elif not os.path.exists(src):
        raise ValueError(f"Model {src} does not exist.")
    elif src.lower().endswith(KERAS_SUFFIXES):
        if signature is not None:
            raise ValueError(f"--signature applies to SavedModel directories; {src} is a Keras file.")
        source = _load_keras(src, output)
    else:
        raise ValueError(f"{src} is neither a Keras model file ({', '.join(KERAS_SUFFIXES)}) nor a SavedModel "
                         "directory.")
    if not source.input_dtype.is_floating:
        raise ValueError(f"{source.describe()} takes {source.input_dtype.name} input; lce-tf feeds float images.")
    return source


def check_embedding_output(source: SourceModel) -> None:
    """The chosen output must be a rank-2 float embedding [N, D] (static shape, where the model declares one).

    Raises:
      ValueError: naming the output's dtype and shape.
    """
    shape = source.output_shape
    if not source.output_dtype.is_floating or (shape is not None and len(shape) != 2):
        raise ValueError(f"Output {source.output_name!r} of {source.path} is {source.output_dtype.name} "
                         f"{_shape_text(shape) if shape is not None else '(unknown shape)'}, not a rank-2 float "
                         "embedding [N, D]: choose another --output" + (" or --signature" if source.signature else "")
                         + ", or end the model with a pooling layer.")


def source_checksum(src: str) -> str:
    """The sha256 of a model file, or of a SavedModel directory (every file's relative path and sha256, sorted)."""
    if not os.path.isdir(src):
        return fileio.sha256_file(src)
    lines = []
    for dirpath, _, names in os.walk(src):
        for name in names:
            path = os.path.join(dirpath, name)
            lines.append(f"{os.path.relpath(path, src).replace(os.sep, '/')}\t{fileio.sha256_file(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


class _ImportedModule(tf.Module):
    """The serving module of an imported model: `embed` = normalize(output(model(preprocess(images))))."""

    def __init__(self, source: SourceModel, preprocess: Preprocess, input_shape: Sequence[int]):
        super().__init__()
        # The weights (a Keras model's variables, or the loaded SavedModel) are tracked, not the Keras object
        # itself, for the reason lce_tf.export._ServingModule gives.
        self.source_objects = list(source.trackables)
        image_spec = tf.TensorSpec([None, *input_shape], tf.float32, name="images")

        def embed(images):
            inputs = tf.cast(preprocess.apply(images), source.input_dtype)
            embedding = tf.cast(source.call(inputs), tf.float32)
            return {"embedding": tf.math.l2_normalize(embedding, axis=-1)}

        self.embed = tf.function(embed, input_signature=[image_spec])


def _probe(module: _ImportedModule, source: SourceModel, shape: tuple[int, int, int]) -> int:
    """Runs `embed` once on a zero image: the model must take the size and return [N, D]. Returns D."""
    try:
        out = module.embed(tf.zeros((1, *shape), tf.float32))["embedding"]
    except Exception as e:  # noqa: BLE001 - a shape TensorFlow rejects, at trace or at run time
        raise ValueError(f"{source.describe()} cannot take images {shape[0]}x{shape[1]}x{shape[2]} "
                         f"(H x W x C): {_first_line(e)}") from None
    if out.shape.rank != 2 or out.shape[1] is None or out.shape[1] < 1:
        raise ValueError(f"Output {source.output_name!r} of {source.path} gives {source.output_dtype.name} "
                         f"{_shape_text(list(out.shape))} for images {_shape_text([1, *shape])}, not a rank-2 float "
                         "embedding [N, D].")
    return int(out.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# --check: stored vectors, their ids, the images


@dataclasses.dataclass(frozen=True)
class ImportCheck:
    """What `--check` compares: vectors the source model produced for images the user still has.

    Attributes:
      vectors: .npy (or .npz with one array, or the array `embeddings` / `vectors`) of float [N, D].
      ids: N ids, one per row of `vectors`: a text file (one per line) or .npy / .json (strings).
      images: the folder the ids are relative paths of (e.g. `coat/00123.png`).
      sample: how many rows are re-embedded (evenly spread; all when N is smaller).
      min_cosine: the least cosine every sampled row must reach.
    """

    vectors: str
    ids: str
    images: str
    sample: int = CHECK_SAMPLE
    min_cosine: float = MIN_CHECK_COSINE


def read_vectors(path: str, what: str = "--check") -> np.ndarray:
    """Stored vectors: float [N, D] from .npy, or .npz (its only array, else `embeddings` or `vectors`).

    Raises:
      ValueError: one line: missing or unreadable file, other suffix, not a 2-D float array, NaN/Inf.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"{what} {path}: expected vectors as .npy or .npz.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if suffix == ".npz":
            keys = list(loaded.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in ("embeddings", "vectors") if k in keys), None)
            if key is None:
                raise ValueError(f"holds {', '.join(keys) or 'no arrays'}; expected one array, or 'embeddings'")
            loaded = loaded[key]
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{what} {path}: {_first_line(e)}") from None
    if loaded.ndim != 2 or not np.issubdtype(loaded.dtype, np.floating):
        raise ValueError(f"{what} {path}: expected float vectors [N, D]; received {loaded.dtype} {list(loaded.shape)}.")
    return check_finite(loaded.astype(np.float32), f"{what} {path}")


def read_ids(path: str, what: str = "--check-ids") -> list[str]:
    """Ids, one per stored vector: .npy (a string array), .json (a list of strings) or text, one per line
    (blank lines skipped).

    Raises:
      ValueError: one line: missing or unreadable file, not strings.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist.")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim != 1 or array.dtype.kind != "U":
                raise ValueError(f"expected a 1-D string array; received {array.dtype} {list(array.shape)}")
            return [str(v) for v in array]
        with open(path, encoding="utf-8") as f:
            if suffix == ".json":
                ids = json.load(f)
                if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
                    raise ValueError("expected a JSON list of strings")
                return ids
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: {_first_line(e)}") from None


@dataclasses.dataclass
class _CheckSample:
    vectors: np.ndarray  # [n, D] the sampled stored vectors
    paths: list  # [n] their image files
    ids: list


def _read_check(check: ImportCheck) -> _CheckSample:
    """Reads and cross-checks the --check inputs before any model is loaded."""
    if check.sample < 1:
        raise ValueError(f"--check-sample must be >= 1; received {check.sample}.")
    vectors, ids = read_vectors(check.vectors), read_ids(check.ids)
    if len(ids) != len(vectors):
        raise ValueError(f"--check-ids {check.ids} holds {len(ids)} ids but --check {check.vectors} holds "
                         f"{len(vectors)} vectors.")
    if not os.path.isdir(check.images):
        raise ValueError(f"--check-images {check.images} is not a directory.")
    if not len(ids):
        raise ValueError(f"--check {check.vectors} holds no vectors.")
    rows = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), check.sample)).round().astype(int))
    sampled = [ids[i] for i in rows]
    paths = [os.path.join(check.images, i) for i in sampled]
    missing = [i for i, p in zip(sampled, paths) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--check-ids: {len(missing)} of the {len(sampled)} sampled ids are not image files under "
                         f"--check-images {check.images} (first {missing[0]!r}); ids are paths relative to it.")
    return _CheckSample(vectors[rows], paths, sampled)


def check_against_vectors(model, images: np.ndarray, stored: np.ndarray, preprocess: Preprocess,
                          min_cosine: float = MIN_CHECK_COSINE) -> dict[str, float]:
    """Re-embeds images with an (imported) model and compares with the vectors stored for them.

    Args:
      model: a loaded model directory (`lce_tf.serving.EmbeddingModel`).
      images: float32 [n, H, W, C] in [0, 1].
      stored: [n, D] the vectors the source model produced for them (any norm).
      preprocess: the declared preprocessing, named in the error.
      min_cosine: the least cosine every row must reach.

    Returns:
      {"count", "min_cosine", "mean_cosine", "mean_pairwise_cosine"}.

    Raises:
      ValueError: some cosine is below `min_cosine`: one line with the minimum and mean measured and the
        likely cause (pixel scaling).
      CollapsedEmbeddingError: the cosines pass but the re-embedded sample lies in one cone (`lce_tf.collapse`):
        a collapsed model embeds [0, 1] and [0, 255] pixels alike, so the comparison cannot tell the scaling,
        and the model would not retrieve anyway.
    """
    embeddings = model.embed(images)
    norms = np.linalg.norm(stored, axis=1, keepdims=True)
    cosines = np.sum(embeddings * (stored / np.maximum(norms, 1e-12)), axis=1)
    spread = collapse.mean_pairwise_cosine(embeddings)
    result = {"count": int(len(cosines)), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
              "mean_pairwise_cosine": None if np.isnan(spread) else round(float(spread), 6)}
    if result["min_cosine"] < min_cosine:
        raise ValueError(
            f"--check: the imported model does not reproduce the stored vectors: cosine min {result['min_cosine']:.4f}, "
            f"mean {result['mean_cosine']:.4f} over {result['count']} images (every one must reach {min_cosine}); "
            f"the likely cause is pixel scaling: --preprocess {preprocess.spec} feeds the model {preprocess.formula} "
            "for pixels x in [0, 1]; declare the preprocessing it was trained with (raw for [0, 255], a "
            "keras.applications family, or scale=A,offset=B). Nothing was written.")
    collapse.check_not_collapsed(spread, "--check: the imported model", f"{len(images)} re-embedded images")
    return result


# ---------------------------------------------------------------------------------------------------------------
# The import


def import_model(src: str, out_dir: str, *, embedding_space: str, preprocess: str,
                 image_size: Optional[Sequence[int]] = None, signature: Optional[str] = None,
                 output: Optional[str] = None, check: Optional[ImportCheck] = None, overwrite: bool = False,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Writes a model directory that embeds with a model trained outside lce-tf (`lce-tf model import`).

    The directory serves `embed` (= `serving_default`): images float32 [N, H, W, C] in [0, 1] -> unit
    embeddings [N, D], normalize(output(model(preprocess(x)))); it works wherever an exported model does
    (`--old-model`, `lce-tf centers`, `evaluate`, `transform fit`, `index build`, the pipeline's `old_model`).

    Example:
      import_model("user_v1.keras", "models/v1", embedding_space="user-v1", preprocess="mobilenet_v3",
                   check=ImportCheck("gallery.npy", "gallery_ids.txt", "photos/"))

    Args:
      src: a .keras / .h5 / .hdf5 Keras model file or a SavedModel directory.
      out_dir: the model directory to create.
      embedding_space: the name of the embedding space, also the model id and version (stable: the same name
        gives the same ids).
      preprocess: `--preprocess` text (`parse_preprocess`).
      image_size: (H, W) or (H, W, C); needed when the model takes any height or width.
      signature: the SavedModel signature (default `serving_default`).
      output: the output holding the embedding, for a model with several.
      check: stored vectors to reproduce (`ImportCheck`); the import is refused below its `min_cosine`.
      overwrite: replace an existing `out_dir` (atomically).
      progress: called with one line per stage.

    Returns:
      The metadata written to `lce_tf_model.json` (`imported` records the source, the preprocessing and the
      check).

    Raises:
      ValueError: one line, and nothing is written: see `parse_preprocess`, `check_space_name`, `load_source`,
        `resolve_image_shape`, `check_embedding_output`, `check_against_vectors`; an image size the model cannot
        take; stored vectors of another dimension; an existing `out_dir` without `overwrite`.
    """
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    say = progress or (lambda _message: None)
    plan = parse_preprocess(preprocess)
    name = check_space_name(embedding_space)
    out_dir = export.check_new_model_dir(out_dir, overwrite)
    sample = _read_check(check) if check is not None else None
    say(f"loading {src}")
    source = load_source(src, signature=signature, output=output)
    check_embedding_output(source)
    shape = resolve_image_shape(source.input_shape, image_size, src)
    module = _ImportedModule(source, plan, shape)
    dim = _probe(module, source, shape)
    if sample is not None and sample.vectors.shape[1] != dim:
        raise ValueError(f"--check {check.vectors} holds {sample.vectors.shape[1]}-d vectors but output "
                         f"{source.output_name!r} of {src} is {dim}-d.")
    images = load_images(sample.paths, shape) if sample is not None else None
    imported = {"source": os.path.basename(os.path.normpath(src)), "source_format": source.format,
                "source_sha256": source_checksum(src), "signature": source.signature, "output": source.output_name,
                "source_input_shape": source.input_shape, "preprocess": plan.spec,
                "preprocess_formula": plan.formula, "check": None}
    metadata = export.model_metadata(model_id=name, version=name, architecture=ARCHITECTURE, input_shape=shape,
                                     embedding_dim=dim, embedding_space=name, signatures=["embed"], imported=imported)
    say(f"writing {out_dir}: embedding space {name}, {dim}-d, images {shape}, preprocess {plan.spec} "
        f"({plan.formula})")
    with fileio.atomic_directory(out_dir, "model directory") as tmp_dir:
        export.save_model_files(module, tmp_dir, metadata)
        if sample is not None:
            say(f"--check: re-embedding {len(sample.paths)} images of {check.images} with the written model")
            result = check_against_vectors(load_embedding_model(tmp_dir), images, sample.vectors, plan,
                                           check.min_cosine)
            imported["check"] = {"vectors": os.path.basename(check.vectors), "ids": os.path.basename(check.ids),
                                 "images": os.path.abspath(check.images), **result}
            fileio.write_json(os.path.join(tmp_dir, METADATA_FILE), metadata)
    return metadata


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
