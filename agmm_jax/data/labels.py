"""The one label convention of agmm_jax.

Every label map that reaches the model, the losses or the metrics is an int32
array with these values:

* ``0 .. num_classes - 1``: the pixel is labeled with that class;
* ``UNLABELED`` (-1): a real image pixel without a label (sparse supervision
  leaves most pixels like this) or a void pixel of a dense ground truth;
* ``PADDING`` (-2): not an image pixel at all (crop padding or the padded part
  of an evaluation canvas).

Self-supervised terms (GMM, absent-class) cover real pixels, ``label != PADDING``.
Supervised terms (pCE) and metrics cover labeled pixels, ``label >= 0``.

On disk (PNG inside TFRecords) labels are uint8 with class ids and
``STORED_UNLABELED`` (255) for unlabeled / void pixels. Padding is never stored:
the input pipeline creates it. ``from_stored`` maps the stored encoding to the
in-memory one.
"""

import io
from typing import Final

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

UNLABELED: Final[int] = -1
PADDING: Final[int] = -2
STORED_UNLABELED: Final[int] = 255


def labeled_mask(label):
  """True where the pixel carries a class id (works on NumPy and JAX arrays)."""
  return label >= 0


def real_mask(label):
  """True where the pixel belongs to the image (not padding)."""
  return label != PADDING


def labeled_class_counts(label: jax.Array, num_classes: int,
                         dtype=jnp.float32) -> jax.Array:
  """``n[b, k]``: the number of pixels of label map b ``[B, H, W]`` labeled
  k, ``[B, K]``."""

  def one_image(label):
    # Unlabeled and padding pixels get an out-of-range index, which 'drop'
    # skips.
    class_ids = jnp.where(labeled_mask(label), label, num_classes)
    return jnp.zeros(num_classes, dtype).at[class_ids.reshape(-1)].add(
        1, mode='drop')

  return jax.vmap(one_image)(label)


def from_stored(stored: np.ndarray, num_classes: int) -> np.ndarray:
  """Maps a stored uint8 label map (class ids, 255 unlabeled) to int32.

  Raises ValueError if a value is neither a class id nor ``STORED_UNLABELED``.
  """
  label = stored.astype(np.int32)
  bad = (label >= num_classes) & (label != STORED_UNLABELED)
  if bad.any():
    raise ValueError(
        f'label values {sorted(set(np.unique(label[bad]).tolist()))} are '
        f'neither class ids < {num_classes} nor {STORED_UNLABELED}')
  label[label == STORED_UNLABELED] = UNLABELED
  return label


def to_stored(label: np.ndarray) -> np.ndarray:
  """uint8 label map of an int32 one: class ids, ``STORED_UNLABELED`` for
  every pixel without a class."""
  return np.where(label >= 0, label, STORED_UNLABELED).astype(np.uint8)


def encode_png(label: np.ndarray) -> bytes:
  """PNG bytes of a uint8 ``[H, W]`` label map (mode L): how a prepared
  dataset stores labels (the converters and the pseudo-label writer)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label, np.uint8), mode='L').save(
      buffer, format='PNG')
  return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """Inverse of ``encode_png``: uint8 ``[H, W]``."""
  return np.asarray(Image.open(io.BytesIO(data)))
