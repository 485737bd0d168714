"""NumPy/PIL image and label transforms of the input pipeline.

The training augmentation follows the official AGMM-SASS code
(``dataset/transform.py`` and ``dataset/sass.py``), in this order:

1. random rescale: the long side ``L = max(H, W)`` becomes an integer drawn
   uniformly from ``[int(L * lo), int(L * hi)]`` (``scale_range = (lo, hi)``),
   the short side ``int(short * new_L / L + 0.5)``; image bilinear (PIL, with
   its antialiasing when shrinking), label nearest;
2. pad at the bottom/right up to the crop size: image with black (uint8 0,
   *before* normalization and before the photometric transforms, as the
   official code pads the PIL image), label with ``PADDING``;
3. random ``crop x crop`` window;
4. horizontal flip with probability 0.5;
5. ``augment == 'voc'`` only: colour jitter (brightness, contrast, saturation
   in ``[0.5, 1.5]``, hue in ``[-0.25, 0.25]``, in random order, as
   torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.25)``) with probability 0.5,
   grayscale with probability 0.1, PIL Gaussian blur with radius
   ``sigma ~ U(0.1, 2)`` with probability 0.5, and a brightness shift of
   ``U(-10, 10)`` grey levels (rounded, clipped to 0..255) with probability 0.5;
6. ImageNet normalization ``(x / 255 - mean) / std``.

Steps 1-3 are fused: only the part of the rescaled image that falls inside the
crop window is resampled (PIL ``resize(box=...)`` samples the same source
positions ``(i + 0.5) * in / out - 0.5`` as resizing the whole image and then
cropping; the results differ only where PIL rounds exact .5 ties, by at most
one grey level per resampling pass), so the cost does not grow with the
rescale factor. Labels are bit-identical to PIL's nearest resize.

All randomness comes from a ``np.random.Generator`` passed in by the caller.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter

from agmm_jax.data import labels

# The ImageNet normalization of every image the model sees (written once: the
# losses and the visualizations undo it with these).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# (x / 255 - mean) / std == x * _NORM_SCALE + _NORM_OFFSET.
_NORM_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_NORM_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)

AUGMENTS = ('voc', 'basic')


def normalize(image: np.ndarray) -> np.ndarray:
  """ImageNet normalization of an RGB image on the 0..255 scale.

  Args:
    image: ``[..., 3]``, uint8 or any real dtype.

  Returns:
    float32 ``[..., 3]``: ``(image / 255 - mean) / std``, computed in float32
    as ``image * (1 / (255 std)) - mean / std``.
  """
  normalized = np.array(image, np.float32)
  normalized *= _NORM_SCALE  # In place: one float32 buffer, no temporaries.
  normalized += _NORM_OFFSET
  return normalized


def class_presence(label: np.ndarray, num_classes: int) -> np.ndarray:
  """Image-level class presence vector.

  Args:
    label: int ``[H, W]`` label map (class ids, ``UNLABELED``, ``PADDING``).
    num_classes: ``K``.

  Returns:
    float32 ``[K]``: 1 where class ``k`` labels at least one pixel, else 0.
  """
  counts = np.bincount(label[label >= 0].ravel(), minlength=num_classes)
  return (counts[:num_classes] > 0).astype(np.float32)


def sample_scaled_size(height: int, width: int,
                       scale_range: Sequence[float],
                       rng: np.random.Generator) -> tuple[int, int]:
  """Draws the rescaled ``(height, width)`` (official ``resize``).

  The long side ``L`` becomes ``n ~ U{int(L * lo), ..., int(L * hi)}`` and the
  short side ``s`` becomes ``int(s * n / L + 0.5)`` (at least 1).
  """
  low, high = float(scale_range[0]), float(scale_range[1])
  long_side = max(height, width)
  first, last = int(long_side * low), int(long_side * high)
  if not 1 <= first <= last:
    raise ValueError(f'scale_range {tuple(scale_range)} gives no valid long '
                     f'side for a {height}x{width} image')
  new_long = int(rng.integers(first, last + 1))
  if height > width:
    return new_long, max(1, int(width * new_long / height + 0.5))
  return max(1, int(height * new_long / width + 0.5)), new_long


def sample_crop_offset(scaled_height: int, scaled_width: int, crop_size: int,
                       rng: np.random.Generator) -> tuple[int, int]:
  """Draws the top-left ``(y, x)`` of the crop in the padded rescaled image.

  The rescaled image is padded at the bottom/right to at least ``crop_size``,
  so ``y ~ U{0, ..., max(scaled_height, crop) - crop}`` (and likewise ``x``).
  """
  x = int(rng.integers(0, max(scaled_width, crop_size) - crop_size + 1))
  y = int(rng.integers(0, max(scaled_height, crop_size) - crop_size + 1))
  return y, x


def nearest_source_indices(out_size: int, in_size: int, start: int,
                           count: int) -> np.ndarray:
  """Source rows/columns of nearest-neighbour resizing ``in_size -> out_size``.

  Output index ``i`` reads ``floor(p_i)`` with ``p_i ~= (i + 0.5) * in_size /
  out_size``, computed exactly as PIL's ``Image.NEAREST`` does: ``p_0 = step /
  2`` and ``p_{i+1} = p_i + step`` by repeated float64 addition (the rounding
  of that running sum decides ties), so labels match PIL bit for bit.
  Returns the indices of ``i = start .. start+count-1``.
  """
  step = in_size / out_size
  increments = np.full(start + count, step, np.float64)
  increments[0] = step * 0.5
  positions = np.add.accumulate(increments)[start:]
  return np.minimum(positions.astype(np.int64), in_size - 1)


def rescale_pad_crop(image: Image.Image, label: np.ndarray | None,
                     scaled_size: tuple[int, int], offset: tuple[int, int],
                     crop_size: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Rescales, pads and crops an image (bilinear) and its label (nearest).

  Equivalent to resizing ``image`` and ``label`` to ``scaled_size``, padding
  them at the bottom/right to ``crop_size`` (image 0, label ``PADDING``) and
  taking the ``crop_size`` window at ``offset``, but only the part inside the
  window is resampled.

  Args:
    image: PIL RGB image of size ``W x H``.
    label: int32 ``[H, W]`` or None.
    scaled_size: rescaled ``(h, w)``.
    offset: crop top-left ``(y, x)`` in the padded rescaled image.
    crop_size: ``c``.

  Returns:
    uint8 ``[c, c, 3]`` image and int32 ``[c, c]`` label (or None).
  """
  in_width, in_height = image.size
  scaled_height, scaled_width = scaled_size
  y, x = offset
  # The part of the crop window that lies inside the rescaled image.
  valid_height = max(0, min(crop_size, scaled_height - y))
  valid_width = max(0, min(crop_size, scaled_width - x))
  image_out = np.zeros((crop_size, crop_size, 3), np.uint8)
  label_out = None
  if label is not None:
    label_out = np.full((crop_size, crop_size), labels.PADDING, np.int32)
  if valid_height == 0 or valid_width == 0:
    return image_out, label_out
  x_scale = in_width / scaled_width
  y_scale = in_height / scaled_height
  box = (x * x_scale, y * y_scale, (x + valid_width) * x_scale,
         (y + valid_height) * y_scale)
  resized = image.resize((valid_width, valid_height), Image.BILINEAR, box=box)
  image_out[:valid_height, :valid_width] = np.asarray(resized)
  if label is not None:
    rows, cols = label_sources((in_height, in_width), scaled_size, offset,
                               crop_size)
    label_out[:valid_height, :valid_width] = label[rows[:, None], cols[None, :]]
  return image_out, label_out


def label_sources(source_size: tuple[int, int], scaled_size: tuple[int, int],
                  offset: tuple[int, int], crop_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The source rows and columns the label crop of ``rescale_pad_crop``
  reads, for the part of the crop inside the rescaled image (boxes follow
  the label through them, ``weak_labels.crop_boxes``)."""
  (in_height, in_width), (scaled_height, scaled_width) = source_size, scaled_size
  y, x = offset
  valid_height = max(0, min(crop_size, scaled_height - y))
  valid_width = max(0, min(crop_size, scaled_width - x))
  return (nearest_source_indices(scaled_height, in_height, y, valid_height),
          nearest_source_indices(scaled_width, in_width, x, valid_width))


def _adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """Rotates the PIL HSV hue channel by ``hue_factor`` turns (torchvision rule).

  The uint8 hue channel is shifted by ``int(hue_factor * 255)`` modulo 256.
  """
  hue, saturation, value = image.convert('HSV').split()
  shift = np.uint8(int(hue_factor * 255) % 256)
  hue_array = np.asarray(hue, np.uint8) + shift  # uint8 wraps around.
  hue = Image.fromarray(hue_array, 'L')
  return Image.merge('HSV', (hue, saturation, value)).convert('RGB')


def color_jitter(image: Image.Image, rng: np.random.Generator,
                 strength: float = 0.5, hue: float = 0.25) -> Image.Image:
  """torchvision ``ColorJitter(strength, strength, strength, hue)`` on PIL.

  Draws brightness, contrast and saturation factors from ``U(1 - strength,
  1 + strength)`` and a hue shift from ``U(-hue, hue)``, then applies the four
  adjustments in a random order (PIL ``ImageEnhance`` and an HSV hue rotation,
  the operations torchvision uses for PIL images).
  """
  order = rng.permutation(4)
  brightness = rng.uniform(1 - strength, 1 + strength)
  contrast = rng.uniform(1 - strength, 1 + strength)
  saturation = rng.uniform(1 - strength, 1 + strength)
  hue_factor = rng.uniform(-hue, hue)
  for op in order:
    if op == 0:
      image = ImageEnhance.Brightness(image).enhance(brightness)
    elif op == 1:
      image = ImageEnhance.Contrast(image).enhance(contrast)
    elif op == 2:
      image = ImageEnhance.Color(image).enhance(saturation)
    else:
      image = _adjust_hue(image, hue_factor)
  return image


def photometric_voc(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The official strong (VOC) photometric augmentation of a uint8 crop.

  Args:
    image: uint8 ``[h, w, 3]``.
    rng: the random generator.

  Returns:
    uint8 ``[h, w, 3]``: colour jitter (p 0.5), grayscale (p 0.1), Gaussian
    blur with ``sigma ~ U(0.1, 2)`` (p 0.5), brightness shift ``U(-10, 10)``
    (p 0.5, rounded and clipped), each decided independently in this order.
  """
  pil_image = Image.fromarray(image, 'RGB')
  if rng.random() < 0.5:
    pil_image = color_jitter(pil_image, rng)
  if rng.random() < 0.1:
    pil_image = pil_image.convert('L').convert('RGB')
  if rng.random() < 0.5:
    sigma = rng.uniform(0.1, 2.0)
    pil_image = pil_image.filter(ImageFilter.GaussianBlur(radius=sigma))
  result = np.asarray(pil_image)
  if rng.random() < 0.5:
    shift = rng.uniform(-10.0, 10.0)
    # clip(rint(x + shift)) in float32, tabulated for the 256 values of x.
    table = np.clip(np.rint(np.arange(256, dtype=np.float32)
                            + np.float32(shift)), 0, 255).astype(np.uint8)
    result = table[result]
  return result


class Geometry(NamedTuple):
  """The random geometry of one training crop (steps 1, 3 and 4)."""
  scaled_size: tuple[int, int]  # rescaled (h, w)
  offset: tuple[int, int]       # crop top-left (y, x) in the padded image
  flip: bool                    # left-right flip of the crop


def sample_geometry(height: int, width: int, *, crop_size: int,
                    scale_range: Sequence[float],
                    rng: np.random.Generator) -> Geometry:
  """Draws the rescaled size, the crop offset and the flip, in that order
  (the order ``augment_train`` has always drawn them)."""
  scaled_size = sample_scaled_size(height, width, scale_range, rng)
  offset = sample_crop_offset(*scaled_size, crop_size, rng)
  return Geometry(scaled_size, offset, bool(rng.random() < 0.5))


class TrainExample(NamedTuple):
  """One augmented training example (NumPy)."""
  image: np.ndarray  # float32 [c, c, 3], normalized
  label: np.ndarray  # int32 [c, c]
  class_present: np.ndarray  # float32 [K]


def augment_train(image: Image.Image, label: np.ndarray, *, num_classes: int,
                  crop_size: int, scale_range: Sequence[float], augment: str,
                  rng: np.random.Generator,
                  geometry: Geometry | None = None) -> TrainExample:
  """The full training transform of one example (see the module docstring).

  Args:
    image: PIL RGB image ``W x H``.
    label: int32 ``[H, W]`` in the ``labels`` convention (class ids,
      ``UNLABELED``).
    num_classes: ``K``.
    crop_size: ``c``.
    scale_range: ``(lo, hi)`` rescale factors of the long side.
    augment: ``'voc'`` (with the photometric transforms) or ``'basic'``.
    rng: the random generator.
    geometry: the crop geometry, drawn from ``rng`` by ``sample_geometry``
      (the caller's draw when given, so that it can move boxes with it).

  Returns:
    ``TrainExample`` with ``class_present`` computed on the whole label map.
  """
  if augment not in AUGMENTS:
    raise ValueError(f'augment {augment!r} is not one of {AUGMENTS}')
  width, height = image.size
  if label.shape != (height, width):
    raise ValueError(f'label shape {label.shape} != image shape '
                     f'{(height, width)}')
  class_present = class_presence(label, num_classes)
  if geometry is None:
    geometry = sample_geometry(height, width, crop_size=crop_size,
                               scale_range=scale_range, rng=rng)
  image_crop, label_crop = rescale_pad_crop(
      image, label, geometry.scaled_size, geometry.offset, crop_size)
  if geometry.flip:
    image_crop = image_crop[:, ::-1]
    label_crop = label_crop[:, ::-1]
  if augment == 'voc':
    image_crop = photometric_voc(np.ascontiguousarray(image_crop), rng)
  return TrainExample(image=normalize(image_crop),
                      label=np.ascontiguousarray(label_crop),
                      class_present=class_present)


def pad_to_canvas(image: np.ndarray, label: np.ndarray,
                  canvas: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Pads a normalized eval image and its label at the bottom/right.

  Args:
    image: float32 ``[h, w, 3]`` (normalized).
    label: int32 ``[h, w]``.
    canvas: ``(Hc, Wc)`` with ``Hc >= h`` and ``Wc >= w``.

  Returns:
    float32 ``[Hc, Wc, 3]`` (0 outside the image, i.e. the mean colour) and
    int32 ``[Hc, Wc]`` (``PADDING`` outside the image).
  """
  height, width = label.shape
  canvas_height, canvas_width = int(canvas[0]), int(canvas[1])
  if height > canvas_height or width > canvas_width:
    raise ValueError(f'a {height}x{width} image does not fit the eval canvas '
                     f'{canvas_height}x{canvas_width}')
  image_out = np.zeros((canvas_height, canvas_width, 3), np.float32)
  label_out = np.full((canvas_height, canvas_width), labels.PADDING, np.int32)
  image_out[:height, :width] = image
  label_out[:height, :width] = label
  return image_out, label_out
