"""TensorFlow-free metric writers with CLU's ``MetricWriter`` interface.

``clu.metric_writers`` imports TensorFlow; this module writes the same
TensorBoard event files with ``tensorboard``'s own ``EventFileWriter`` and
protos:

* scalars as ``simple_value`` (read by every TensorBoard loader);
* images as one string tensor ``[width, height, png_0, ..., png_{N-1}]`` per
  tag with the ``images`` plugin metadata (what ``tf.summary.image`` writes);
* texts as string tensors with the ``text`` plugin metadata;
* histograms as ``HistogramProto``;
* hyperparameters with the hparams plugin's ``hparams_pb``.

``create_default_writer(logdir, just_logging=jax.process_index() > 0)`` gives
the usual multi-host setup: process 0 logs and writes events, the other
processes only log. ``ReportProgress`` reports steps/s, images/s and the ETA.
"""

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import io
import os
import time
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

Scalar = int | float | np.number | np.ndarray
DEFAULT_HISTOGRAM_BUCKETS = 30


class MetricWriter(abc.ABC):
  """The subset of ``clu.metric_writers.MetricWriter`` used by agmm_jax."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Writes scalar values (Python numbers or 0-d arrays)."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes images: ``[N, H, W, C]`` or ``[H, W, C]`` (or ``[H, W]``) arrays.

    uint8 arrays are used as is; float arrays are taken to be in [0, 1]. C is
    1 (grayscale), 3 (RGB) or 4 (RGBA).
    """

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes text (Markdown in TensorBoard)."""

  @abc.abstractmethod
  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    """Writes histograms of the values of arrays."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes hyperparameters (nested mappings are flattened with '.')."""

  @abc.abstractmethod
  def flush(self) -> None:
    """Makes everything written so far durable."""

  @abc.abstractmethod
  def close(self) -> None:
    """Flushes and releases resources."""

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class SummaryWriter(MetricWriter):
  """Writes TensorBoard event files to ``logdir`` without TensorFlow."""

  def __init__(self, logdir: str, flush_secs: float = 120.0):
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(logdir, flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    self._write(step, [
        summary_pb2.Summary.Value(tag=tag, simple_value=_to_float(tag, value))
        for tag, value in scalars.items()
    ])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    values = []
    for tag, array in images.items():
      batch = _to_uint8_images(tag, array)
      encoded = [_encode_png(image) for image in batch]
      height, width = batch.shape[1:3]
      tensor = tensor_util.make_tensor_proto(
          np.array([str(width).encode(), str(height).encode()] + encoded,
                   dtype=object))
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor,
          metadata=image_metadata.create_summary_metadata(
              display_name=tag, description='')))
    self._write(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, [
        summary_pb2.Summary.Value(
            tag=tag,
            tensor=tensor_util.make_tensor_proto(
                np.array(text.encode('utf-8'), dtype=object)),
            metadata=text_metadata.create_summary_metadata(
                display_name=tag, description=''))
        for tag, text in texts.items()
    ])

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    values = []
    for tag, array in arrays.items():
      buckets = (num_buckets or {}).get(tag, DEFAULT_HISTOGRAM_BUCKETS)
      values.append(summary_pb2.Summary.Value(
          tag=tag, histo=_histogram_proto(tag, array, buckets)))
    self._write(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    summary = hparams_summary.hparams_pb(_flatten_hparams(hparams))
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                           summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def _write(self, step: int,
             values: Sequence[summary_pb2.Summary.Value]) -> None:
    if values:
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=summary_pb2.Summary(value=list(values))))


class LoggingWriter(MetricWriter):
  """Logs one line per call with absl logging (scalars ``[step] k=v, ...``)."""

  def __init__(self, collection: str | None = None):
    self._prefix = f' {collection}:' if collection else ''

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    values = ', '.join(f'{tag}={_to_float(tag, value):.6g}'
                       for tag, value in sorted(scalars.items()))
    logging.info('[%d]%s %s', step, self._prefix, values)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    shapes = ', '.join(f'{tag}={np.shape(array)}'
                       for tag, array in sorted(images.items()))
    logging.info('[%d]%s images: %s', step, self._prefix, shapes)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for tag, text in sorted(texts.items()):
      logging.info('[%d]%s %s: %s', step, self._prefix, tag, text)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    for tag, array in sorted(arrays.items()):
      array = np.asarray(array, np.float64)
      logging.info('[%d]%s %s: min=%.6g mean=%.6g max=%.6g', step,
                   self._prefix, tag, array.min(), array.mean(), array.max())

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = _flatten_hparams(hparams)
    logging.info('[hparams]%s %s', self._prefix,
                 ', '.join(f'{k}={v}' for k, v in sorted(flat.items())))

  def flush(self) -> None:
    logging.flush()

  def close(self) -> None:
    self.flush()


class MultiWriter(MetricWriter):
  """Forwards every call to several writers."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for writer in self._writers:
      writer.write_images(step, images)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for writer in self._writers:
      writer.write_texts(step, texts)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    for writer in self._writers:
      writer.write_histograms(step, arrays, num_buckets)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self._writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def create_default_writer(logdir: str | None = None, *,
                          just_logging: bool = False,
                          collection: str | None = None) -> MultiWriter:
  """Logging plus (unless ``just_logging`` or no ``logdir``) event files.

  Mirrors ``clu.metric_writers.create_default_writer`` (synchronously): pass
  ``just_logging=jax.process_index() > 0`` so that only process 0 writes
  events. Events of a ``collection`` go to ``logdir/collection``.
  """
  writers: list[MetricWriter] = [LoggingWriter(collection)]
  if not just_logging and logdir:
    if collection:
      logdir = os.path.join(logdir, collection)
    writers.append(SummaryWriter(logdir))
  return MultiWriter(writers)


class ReportProgress:
  """Periodically reports training speed and the remaining time.

  Call ``report(step)`` after every step. Every ``every_steps`` steps or
  ``every_secs`` seconds (whichever comes first) it computes over the window
  since the previous report

    steps_per_sec = (step - previous_step) / (elapsed - paused)

  where ``paused`` is the time spent inside ``with report.paused():`` blocks
  (evaluation, checkpointing), the ETA ``(num_train_steps - step) /
  steps_per_sec``, and, given ``global_batch_size``, ``images_per_sec =
  steps_per_sec * global_batch_size``. It logs one line, writes the rates as
  scalars to ``writer`` (if any) and returns them; otherwise returns None. The
  first call only starts the clock.
  """

  def __init__(self, num_train_steps: int, *,
               writer: MetricWriter | None = None,
               every_steps: int | None = 100,
               every_secs: float | None = 60.0,
               global_batch_size: int | None = None,
               time_fn: Callable[[], float] = time.monotonic):
    if not every_steps and not every_secs:
      raise ValueError('ReportProgress: set every_steps or every_secs')
    self._num_train_steps = num_train_steps
    self._writer = writer
    self._every_steps = every_steps
    self._every_secs = every_secs
    self._global_batch_size = global_batch_size
    self._time_fn = time_fn
    self._previous_step: int | None = None
    self._previous_time = 0.0
    self._paused_secs = 0.0

  def __call__(self, step: int) -> dict[str, float] | None:
    now = self._time_fn()
    if self._previous_step is None:
      self._restart(step, now)
      return None
    steps = step - self._previous_step
    elapsed = now - self._previous_time
    due = ((self._every_steps and steps >= self._every_steps)
           or (self._every_secs and elapsed >= self._every_secs))
    if not due or steps <= 0:
      return None
    running = max(elapsed - self._paused_secs, 1e-9)
    report = {'steps_per_sec': steps / running}
    if self._global_batch_size:
      report['images_per_sec'] = (report['steps_per_sec']
                                  * self._global_batch_size)
    eta_secs = max(self._num_train_steps - step, 0) / report['steps_per_sec']
    logging.info('step %d/%d (%.1f%%): %.3g steps/s%s, ETA %s', step,
                 self._num_train_steps,
                 100.0 * step / max(self._num_train_steps, 1),
                 report['steps_per_sec'],
                 (f', {report["images_per_sec"]:.3g} images/s'
                  if 'images_per_sec' in report else ''),
                 _format_duration(eta_secs))
    if self._writer is not None:
      self._writer.write_scalars(step, report)
    report['eta_secs'] = eta_secs
    self._restart(step, now)
    return report

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent inside this block does not count towards the step rate."""
    start = self._time_fn()
    try:
      yield
    finally:
      self._paused_secs += self._time_fn() - start

  def _restart(self, step: int, now: float) -> None:
    self._previous_step = step
    self._previous_time = now
    self._paused_secs = 0.0


def _format_duration(secs: float) -> str:
  """``1h02m03s`` style."""
  secs = int(round(secs))
  hours, rest = divmod(secs, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else (
      f'{minutes}m{seconds:02d}s')


def _to_float(tag: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'scalar {tag!r} has shape {array.shape}, expected one '
                     'value')
  return float(array.reshape(()))


def _to_uint8_images(tag: str, array: Any) -> np.ndarray:
  """``[N, H, W, C]`` uint8 from uint8 or [0, 1] float images."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim == 3:
    array = array[None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or not array.size:
    raise ValueError(f'image {tag!r} has shape {array.shape}; expected '
                     '[N, H, W, C] or [H, W, C] with C in (1, 3, 4)')
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f'image {tag!r} has dtype {array.dtype}; expected uint8 '
                     'or float in [0, 1]')
  return np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0).astype(
      np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of one ``[H, W, C]`` uint8 image."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format='PNG')
  return buffer.getvalue()


def _histogram_proto(tag: str, array: Any,
                     num_buckets: int) -> summary_pb2.HistogramProto:
  """Legacy histogram proto; ``bucket_limit`` holds right bucket edges."""
  values = np.asarray(array, np.float64).reshape(-1)
  values = values[np.isfinite(values)]
  if not values.size:
    raise ValueError(f'histogram {tag!r} has no finite values')
  counts, edges = np.histogram(values, bins=num_buckets)
  return summary_pb2.HistogramProto(
      min=float(values.min()), max=float(values.max()), num=float(values.size),
      sum=float(values.sum()), sum_squares=float(np.square(values).sum()),
      bucket_limit=edges[1:].tolist(), bucket=counts.astype(float).tolist())


def _flatten_hparams(hparams: Mapping[str, Any],
                     prefix: str = '') -> dict[str, bool | int | float | str]:
  """Nested mappings to ``{'a.b': value}``; non-scalar values become str."""
  flat = {}
  for key, value in hparams.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) or hasattr(value, 'to_dict'):
      value = value.to_dict() if hasattr(value, 'to_dict') else value
      flat.update(_flatten_hparams(value, prefix=f'{name}.'))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    elif isinstance(value, np.generic):
      flat[name] = value.item()
    else:
      flat[name] = str(value)
  return flat
