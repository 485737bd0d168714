"""Image-level tags and bounding boxes: their record fields, checks and
geometry.

Conventions (one for the converters, the records, the pipeline and the
losses):

* tags: float32 ``[K]``, 1 where class ``k`` is in the image;
* boxes: int32 ``[n, 5]`` rows ``(class, y0, x0, y1, x1)`` in pixels, half
  open (the box covers ``label[y0:y1, x0:x1]``), ``0 <= y0 < y1 <= H`` and
  ``0 <= x0 < x1 <= W``.

A record with weak labels holds ``label/tags`` (int64 ``[K]`` of 0/1),
``label/boxes/count`` (int64 ``n``) and, when ``n > 0``, ``label/boxes``
(int64 ``5 n``: the rows above, flattened).

In training the boxes follow the augmentation exactly (:func:`crop_boxes`):
an output pixel lies in the transformed box iff the source pixel the label's
nearest-neighbour resampling reads lies in the source box, so a box drawn on
the label map before augmentation and the transformed box agree pixel for
pixel. The losses receive them as a fixed-size array (:func:`pad_boxes`).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from agmm_jax.data import augment

TAGS_KEY = 'label/tags'
BOXES_KEY = 'label/boxes'
BOX_COUNT_KEY = 'label/boxes/count'
BOX_COLUMNS = 5
# The class of a padding row of pad_boxes.
NO_BOX = -1


def check_boxes(boxes: np.ndarray, *, height: int, width: int,
                num_classes: int, where: str) -> np.ndarray:
  """``boxes`` as int32 ``[n, 5]``; a one-line ValueError naming ``where``
  for a box outside the image, an empty box or an unknown class."""
  boxes = np.asarray(boxes, np.int64).reshape(-1, BOX_COLUMNS)
  for class_id, y0, x0, y1, x1 in boxes.tolist():
    box = f'box (class {class_id}, y {y0}:{y1}, x {x0}:{x1})'
    if not 0 <= class_id < num_classes:
      raise ValueError(f'{where}: {box}: unknown class (classes are '
                       f'0..{num_classes - 1})')
    if y0 >= y1 or x0 >= x1:
      raise ValueError(f'{where}: {box}: empty box')
    if y0 < 0 or x0 < 0 or y1 > height or x1 > width:
      raise ValueError(f'{where}: {box}: outside the {height}x{width} image')
  return boxes.astype(np.int32)


def tags_from_boxes(boxes: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 ``[K]``: 1 for each class with a box."""
  tags = np.zeros(num_classes, np.float32)
  tags[np.asarray(boxes, np.int64).reshape(-1, BOX_COLUMNS)[:, 0]] = 1.0
  return tags


def record_features(tags: np.ndarray, boxes: np.ndarray) -> dict[str, Any]:
  """The record features of an image's tags and boxes."""
  boxes = np.asarray(boxes, np.int64).reshape(-1, BOX_COLUMNS)
  features = {TAGS_KEY: [int(t) for t in np.asarray(tags) > 0],
              BOX_COUNT_KEY: int(len(boxes))}
  if len(boxes):
    features[BOXES_KEY] = boxes.reshape(-1).tolist()
  return features


def from_record(example: Mapping[str, Any], *, num_classes: int, height: int,
                width: int, where: str
                ) -> tuple[np.ndarray, np.ndarray] | None:
  """``(tags [K], boxes [n, 5])`` of a decoded record, or None when it has
  no weak labels; a one-line ValueError naming ``where`` for bad ones."""
  if TAGS_KEY not in example:
    return None
  tags = np.asarray(example[TAGS_KEY], np.float32)
  if tags.shape != (num_classes,) or not np.isin(tags, (0.0, 1.0)).all():
    raise ValueError(f'{where}: {TAGS_KEY} must be {num_classes} values of 0 '
                     f'or 1, got {tags.tolist()[:30]}')
  count = example.get(BOX_COUNT_KEY, [0])[0]
  flat = np.asarray(example.get(BOXES_KEY, []), np.int64)
  if flat.size != BOX_COLUMNS * count:
    raise ValueError(f'{where}: {BOXES_KEY} has {flat.size} values for '
                     f'{count} boxes (5 each)')
  boxes = check_boxes(flat, height=height, width=width,
                      num_classes=num_classes, where=where)
  return tags, boxes


def _kept_interval(sources: np.ndarray, start: int, stop: int
                   ) -> tuple[int, int]:
  """The output interval whose (non-decreasing) source indices fall in
  ``[start, stop)``."""
  return (int(np.searchsorted(sources, start, 'left')),
          int(np.searchsorted(sources, stop, 'left')))


def crop_boxes(boxes: np.ndarray, *, row_sources: np.ndarray,
               col_sources: np.ndarray, crop_size: int,
               flip: bool) -> np.ndarray:
  """Boxes after rescale, pad, crop and flip (``augment.Geometry``).

  Args:
    boxes: int32 ``[n, 5]`` in source pixels.
    row_sources, col_sources: the source row / column each output row /
      column of the crop reads (``augment.nearest_source_indices``; only the
      part of the crop inside the rescaled image, before the flip).
    crop_size: ``c``.
    flip: whether the crop is flipped left-right.

  Returns:
    int32 ``[m, 5]`` in crop pixels, ``m <= n``: the boxes that keep at least
    one pixel, in their input order.
  """
  kept = []
  for class_id, y0, x0, y1, x1 in np.asarray(boxes).tolist():
    top, bottom = _kept_interval(row_sources, y0, y1)
    left, right = _kept_interval(col_sources, x0, x1)
    if top >= bottom or left >= right:
      continue
    if flip:
      left, right = crop_size - right, crop_size - left
    kept.append((class_id, top, left, bottom, right))
  return np.asarray(kept, np.int32).reshape(-1, BOX_COLUMNS)


def train_weak_labels(example: Mapping[str, Any], *, num_classes: int,
                      source_size: tuple[int, int],
                      geometry: augment.Geometry, crop_size: int,
                      where: str) -> dict[str, np.ndarray]:
  """``tags`` float32 ``[K]`` and ``boxes`` int32 ``[m, 5]`` in crop pixels
  of a decoded training record, the boxes moved with its label by
  ``geometry`` (:func:`crop_boxes`); a one-line ValueError naming ``where``
  when the record has none or bad ones."""
  weak = from_record(example, num_classes=num_classes, height=source_size[0],
                     width=source_size[1], where=where)
  if weak is None:
    raise ValueError(f'{where}: no {TAGS_KEY} although the split has weak '
                     'labels')
  tags, boxes = weak
  rows, cols = augment.label_sources(source_size, geometry.scaled_size,
                                     geometry.offset, crop_size)
  return {'tags': tags, 'boxes': crop_boxes(
      boxes, row_sources=rows, col_sources=cols, crop_size=crop_size,
      flip=geometry.flip)}


def downscale_boxes(boxes: np.ndarray, factor: int, height: int,
                    width: int) -> np.ndarray:
  """Boxes of a ``height x width`` image on its labels downscaled by
  ``factor`` (the converters read the pixel at the centre of each block:
  output row ``i`` is source row ``i * factor + factor // 2``); boxes that
  keep no pixel are dropped."""
  offset = factor // 2
  return crop_boxes(boxes,
                    row_sources=np.arange(height // factor) * factor + offset,
                    col_sources=np.arange(width // factor) * factor + offset,
                    crop_size=0, flip=False)


def pad_boxes(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
  """int32 ``[max_boxes, 5]``: the boxes, then rows of class ``NO_BOX``.

  With more than ``max_boxes`` boxes the largest ``max_boxes`` are kept (a
  stable sort by area, so equal areas keep their order).
  """
  boxes = np.asarray(boxes, np.int32).reshape(-1, BOX_COLUMNS)
  if len(boxes) > max_boxes:
    areas = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    boxes = boxes[np.sort(np.argsort(-areas, kind='stable')[:max_boxes])]
  padded = np.zeros((max_boxes, BOX_COLUMNS), np.int32)
  padded[:, 0] = NO_BOX
  padded[:len(boxes)] = boxes
  return padded


def box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """bool ``[n, H, W]``: each box as a mask (tests, overlays)."""
  boxes = np.asarray(boxes).reshape(-1, BOX_COLUMNS)
  masks = np.zeros((len(boxes), height, width), bool)
  for index, (_, y0, x0, y1, x1) in enumerate(boxes.tolist()):
    masks[index, max(y0, 0):y1, max(x0, 0):x1] = True
  return masks

