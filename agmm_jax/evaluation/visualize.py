"""Colour maps and images for predictions, labels and GMM responses.

Class ids follow ``agmm_jax/data/labels.py``: ids >= 0 are classes, negative ids
(``UNLABELED``, ``PADDING``) have no class and are drawn black (or left
transparent in overlays, stored as 255 in palette PNGs).
"""

import os

import numpy as np
from PIL import Image

from agmm_jax.data import augment
from agmm_jax.data import labels


# The 19 Cityscapes training classes in their official colours.
CITYSCAPES_COLORS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32)], np.uint8)


def palette(num_classes: int = 256, name: str = 'voc') -> np.ndarray:
  """uint8 ``[num_classes, 3]`` RGB colours.

  ``name='voc'``: the PASCAL VOC colour map. The bits of the class id are dealt
  out in turn to R, G, B from the most significant colour bit down: bit
  ``3 j + c`` of the id sets bit ``7 - j`` of channel ``c``, giving (0, 0, 0),
  (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), ... and (224, 224, 192)
  for id 255 (the VOC boundary colour). ``name='cityscapes'``: the official
  colours of the 19 training classes, then black.
  """
  if not 0 < num_classes <= 256:
    raise ValueError(f'palette: num_classes must be in 1..256, got '
                     f'{num_classes}')
  if name == 'cityscapes':
    colors = np.zeros((num_classes, 3), np.uint8)
    count = min(num_classes, len(CITYSCAPES_COLORS))
    colors[:count] = CITYSCAPES_COLORS[:count]
    return colors
  if name != 'voc':
    raise ValueError(f"palette: name must be 'voc' or 'cityscapes', got "
                     f'{name!r}')
  ids = np.arange(num_classes)
  colors = np.zeros((num_classes, 3), np.int64)
  for bit_group in range(8):
    for channel in range(3):
      bit = (ids >> (3 * bit_group + channel)) & 1
      colors[:, channel] |= bit << (7 - bit_group)
  return colors.astype(np.uint8)


def colorize(class_ids: np.ndarray,
             colors: np.ndarray | None = None) -> np.ndarray:
  """uint8 ``[H, W, 3]`` image of int ``[H, W]`` class ids.

  Negative ids are black. ``colors`` defaults to the VOC palette.
  """
  class_ids = np.asarray(class_ids)
  colors = palette() if colors is None else np.asarray(colors, np.uint8)
  if class_ids.size and class_ids.max() >= len(colors):
    raise ValueError(f'colorize: class id {class_ids.max()} has no colour '
                     f'(palette of {len(colors)})')
  image = colors[np.clip(class_ids, 0, None)]
  image[class_ids < 0] = 0
  return image


def overlay(image: np.ndarray, class_ids: np.ndarray, alpha: float = 0.5,
            colors: np.ndarray | None = None) -> np.ndarray:
  """Blends class colours over a uint8 ``[H, W, 3]`` image.

  ``out = (1 - alpha) image + alpha colour`` where ``class_ids >= 0``; pixels
  with negative ids keep the image.
  """
  image = np.asarray(image)
  if image.shape[:2] != np.shape(class_ids):
    raise ValueError(f'overlay: image {image.shape} and class ids '
                     f'{np.shape(class_ids)} differ in size')
  blended = ((1.0 - alpha) * image.astype(np.float32)
             + alpha * colorize(class_ids, colors).astype(np.float32))
  labeled = labels.labeled_mask(np.asarray(class_ids))[..., None]
  return np.where(labeled, np.round(blended), image).astype(np.uint8)


def denormalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB of an ImageNet-normalized float ``[..., 3]`` image.

  ``rgb = round(255 clip(x std + mean, 0, 1))``.
  """
  rgb = np.asarray(image, np.float32) * augment.IMAGENET_STD + augment.IMAGENET_MEAN
  return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def heatmap(response: np.ndarray) -> np.ndarray:
  """uint8 ``[H, W, 3]`` "jet" colouring of values in [0, 1].

  Piecewise linear jet: ``R = clip(1.5 - |4v - 3|)``, ``G = clip(1.5 - |4v -
  2|)``, ``B = clip(1.5 - |4v - 1|)``: 0 is dark blue, 0.5 green, 1 dark red.
  Values outside [0, 1] are clipped; NaN counts as 0.
  """
  value = np.clip(np.nan_to_num(np.asarray(response, np.float32)), 0.0, 1.0)
  centers = np.array([3.0, 2.0, 1.0], np.float32)
  rgb = np.clip(1.5 - np.abs(4.0 * value[..., None] - centers), 0.0, 1.0)
  return np.round(rgb * 255.0).astype(np.uint8)


def save_palette_png(path: str, class_ids: np.ndarray,
                     colors: np.ndarray | None = None) -> None:
  """Saves int ``[H, W]`` class ids as an indexed ('P' mode) PNG.

  Negative ids are stored as ``labels.STORED_UNLABELED`` (255), the same
  encoding as the dataset labels. ``colors`` (default: the 256-entry VOC
  palette) becomes the PNG palette; missing entries are black.
  """
  class_ids = np.asarray(class_ids)
  if class_ids.ndim != 2:
    raise ValueError(f'save_palette_png({path}): class ids must be [H, W], '
                     f'got shape {class_ids.shape}')
  if class_ids.size and class_ids.max() >= labels.STORED_UNLABELED:
    raise ValueError(f'save_palette_png({path}): class id {class_ids.max()} '
                     f'does not fit below {labels.STORED_UNLABELED}')
  stored = np.where(class_ids < 0, labels.STORED_UNLABELED,
                    class_ids).astype(np.uint8)
  colors = palette() if colors is None else np.asarray(colors, np.uint8)
  full_palette = np.zeros((256, 3), np.uint8)
  full_palette[:len(colors)] = colors[:256]
  indexed = Image.fromarray(stored)  # mode 'L'; putpalette makes it 'P'
  indexed.putpalette(full_palette.reshape(-1).tolist())
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  indexed.save(path, format='PNG')
