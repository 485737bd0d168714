"""Segmentation metrics: confusion matrix (device) and IoU scores (host).

The confusion matrix ``C`` of ``K`` classes counts labeled pixels:
``C[g, p] = #{pixels with ground truth g and prediction p}`` (rows = ground
truth, columns = prediction). Only pixels with ``0 <= label < K`` count (see
``agmm_jax/data/labels.py``: ``UNLABELED`` void pixels and ``PADDING`` never count).
Batches are summed on device; the scores are computed once on the host:

* ``IoU_k = C[k, k] / (sum_p C[k, p] + sum_g C[g, k] - C[k, k])``
* ``mIoU = mean_k IoU_k`` over classes with a non-empty union
* ``pixel accuracy = trace(C) / sum(C)``
* ``mean class accuracy = mean_k C[k, k] / sum_p C[k, p]`` over classes present
  in the ground truth.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(prediction: jax.Array, label: jax.Array,
                     num_classes: int) -> jax.Array:
  """Counts (ground truth, prediction) pairs over labeled pixels.

  Implemented as one ``bincount`` of ``label * K + prediction`` with weight 0 on
  unlabeled pixels, so memory stays O(pixels + K^2) (no one-hot ``[..., K, K]``
  intermediate). Jit-friendly: every shape is static.

  Args:
    prediction: int array of predicted class ids in ``[0, K)``, any shape
      (typically ``[B, H, W]``).
    label: int array of the same shape; pixels with ``label < 0`` (void,
      padding) or ``label >= K`` are ignored. Pixels whose prediction is outside
      ``[0, K)`` are ignored too (a prediction of -1 marks "not predicted").
    num_classes: K.

  Returns:
    int32 ``[K, K]``, rows = ground truth, columns = prediction. int32 holds up
    to 2^31 - 1 pixels per cell: 1000 Cityscapes-sized 1024x2048 images.
  """
  if prediction.shape != label.shape:
    raise ValueError(f'confusion_matrix: prediction shape {prediction.shape} '
                     f'!= label shape {label.shape}')
  prediction = jnp.asarray(prediction, jnp.int32).reshape(-1)
  label = jnp.asarray(label, jnp.int32).reshape(-1)
  counted = ((label >= 0) & (label < num_classes) & (prediction >= 0)
             & (prediction < num_classes))
  pair_index = jnp.where(counted, label * num_classes + prediction, 0)
  counts = jnp.bincount(pair_index, weights=counted.astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_scores(confusion: Any) -> dict[str, Any]:
  """IoU and accuracy scores of a confusion matrix (host-side NumPy).

  Classes absent from both the ground truth and the predictions (empty union)
  have ``per_class_iou = NaN`` and are excluded from ``miou``; this matches the
  ``np.nanmean`` of the official AGMM evaluation. A class that is predicted but
  never occurs in the ground truth has IoU 0 and does count. Likewise
  ``mean_class_accuracy`` averages over classes present in the ground truth.
  Scores are fractions in [0, 1]; a metric with nothing to average is NaN.

  Args:
    confusion: ``[K, K]`` counts, rows = ground truth, columns = prediction.

  Returns:
    dict with ``miou`` (float), ``per_class_iou`` (float64 ``[K]``),
    ``pixel_accuracy`` (float), ``mean_class_accuracy`` (float).
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'segmentation_scores: confusion must be square [K, K], '
                     f'got shape {confusion.shape}')
  true_positive = np.diag(confusion)
  ground_truth_count = confusion.sum(axis=1)
  predicted_count = confusion.sum(axis=0)
  union = ground_truth_count + predicted_count - true_positive
  per_class_iou = _safe_divide(true_positive, union)
  per_class_accuracy = _safe_divide(true_positive, ground_truth_count)
  total = confusion.sum()
  return {
      'miou': _nanmean(per_class_iou),
      'per_class_iou': per_class_iou,
      'pixel_accuracy': float(true_positive.sum() / total) if total else np.nan,
      'mean_class_accuracy': _nanmean(per_class_accuracy),
  }


def format_iou_table(per_class_iou: Any, class_names: Sequence[str],
                     miou: float, pixel_accuracy: float) -> str:
  """A plain-text table of per-class IoU (in %) followed by mIoU and accuracy.

  Classes with NaN IoU (absent from ground truth and prediction) print as
  ``n/a``.
  """
  per_class_iou = np.asarray(per_class_iou, np.float64)
  if len(class_names) != per_class_iou.shape[0]:
    raise ValueError(f'format_iou_table: {len(class_names)} class names for '
                     f'{per_class_iou.shape[0]} IoU values')
  width = max([len(name) for name in class_names] + [len('pixel accuracy')])
  lines = [f'{"class":<{width}}  IoU (%)']
  for name, iou in zip(class_names, per_class_iou):
    value = 'n/a' if np.isnan(iou) else f'{100.0 * iou:6.2f}'
    lines.append(f'{name:<{width}}  {value:>7}')
  lines.append(f'{"mIoU":<{width}}  {100.0 * miou:7.2f}')
  lines.append(f'{"pixel accuracy":<{width}}  {100.0 * pixel_accuracy:7.2f}')
  return '\n'.join(lines)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """``numerator / denominator`` with NaN where the denominator is 0."""
  result = np.full(numerator.shape, np.nan)
  nonzero = denominator > 0
  result[nonzero] = numerator[nonzero] / denominator[nonzero]
  return result


def _nanmean(values: np.ndarray) -> float:
  """Mean of the non-NaN entries; NaN (without a warning) if there are none."""
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float('nan')
