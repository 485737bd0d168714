"""Pseudo-labels: a prepared dataset written from a model's predictions, and
its quality against the dense labels of the same records.

:func:`write` passes over one split of a prepared dataset in record order,
pads each batch of images to the split's canvas (ImageNet-normalized, as the
eval pipeline does), asks ``label_batch`` for the pseudo-label of every
pixel and writes each record again with its sparse label replaced by the
pseudo-label (PNG, ``agmm_jax.data.labels.encode_png``; TFRecords,
``agmm_jax.data.tfrecord``: what the converters write), plus a
``metadata.json`` with that split only. It writes into ``TARGET.tmp`` and
renames it to ``TARGET`` when complete, so a folder ``TARGET`` is always
whole. A killed pass resumes: each shard of ``records_per_shard`` records is
written beside and renamed when complete, and a rerun keeps the complete
shards of the same plan (``progress.json``: source, split, counts).

:func:`confusion_with_dense` measures a pseudo-label dataset against its
dense labels (which sparse-label runs never train on).
"""

import json
import os
import shutil
from typing import Callable

import numpy as np

from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels

PROGRESS_FILE = 'progress.json'
# Records per shard of a pseudo-label dataset: the unit a killed pass keeps.
RECORDS_PER_SHARD = 256

LabelBatchFn = Callable[..., np.ndarray]


def _read_batch(records: list[input_pipeline.RawRecord], batch_size: int,
                canvas: tuple[int, int], num_classes: int, label_key: str
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
  """Normalized images ``[batch_size, Hc, Wc, 3]`` and int32 labels (padding
  ``PADDING``, rows past the records all padding) and the records' sizes."""
  images = np.zeros((batch_size, *canvas, 3), np.float32)
  label_batch = np.full((batch_size, *canvas), labels_lib.PADDING, np.int32)
  sizes = []
  for row, record in enumerate(records):
    image, label, _ = input_pipeline.decode_record(record, num_classes=num_classes,
                                                   label_key=label_key)
    images[row], label_batch[row] = augment.pad_to_canvas(
        augment.normalize(np.asarray(image)), label, canvas)
    sizes.append(label.shape)
  return images, label_batch, sizes


def read_weak_labels(records: list[input_pipeline.RawRecord],
                     sizes: list[tuple[int, int]], batch_size: int,
                     num_classes: int, max_boxes: int) -> dict[str, np.ndarray]:
  """The records' weak labels: ``tags`` float32 ``[batch_size, K]`` and
  ``boxes`` int32 ``[batch_size, max_boxes, 5]`` (``weak_labels.pad_boxes``;
  rows past the records: no tag, no box); ``sizes``: the records' (height,
  width), as :func:`_read_batch` decoded them; a one-line ValueError naming
  the record when it has none."""
  tags = np.zeros((batch_size, num_classes), np.float32)
  boxes = np.stack([weak_labels.pad_boxes(np.zeros((0, 5)), max_boxes)] * batch_size)
  for row, (record, (height, width)) in enumerate(zip(records, sizes)):
    example = tfrecord.decode_example(record.data)
    weak = weak_labels.from_record(example, num_classes=num_classes, height=height,
                                   width=width, where=record.where)
    if weak is None:
      raise ValueError(f'{record.where}: no {weak_labels.TAGS_KEY}: prepare the data '
                       'with tags or boxes (data_prep --sparse=tags|boxes)')
    tags[row], boxes[row] = weak[0], weak_labels.pad_boxes(weak[1], max_boxes)
  return {'tags': tags, 'boxes': boxes}


def _write_shard(path: str, records: list[input_pipeline.RawRecord], batch_size: int,
                 read: Callable[..., tuple], label_batch: LabelBatchFn,
                 stop: Callable[[], None],
                 read_weak: Callable[..., dict[str, np.ndarray]] | None) -> None:
  """One shard of the records relabeled, written beside and renamed."""
  with tfrecord.TFRecordWriter(f'{path}.part') as writer:
    for start in range(0, len(records), batch_size):
      chunk = records[start:start + batch_size]
      images, label_batch_in, sizes = read(chunk)
      if read_weak is None:
        pseudo = np.asarray(label_batch(images, label_batch_in))
      else:
        pseudo = np.asarray(label_batch(images, label_batch_in, read_weak(chunk, sizes)))
      for row, (record, (height, width)) in enumerate(zip(chunk, sizes)):
        features = tfrecord.decode_example(record.data)
        features[input_pipeline.LABEL_KEYS['sparse']] = labels_lib.encode_png(
            labels_lib.to_stored(pseudo[row, :height, :width]))
        writer.write(tfrecord.encode_example(features))
      stop()
  os.replace(f'{path}.part', path)


def _resumable_partial(partial: str, plan: dict) -> None:
  """``partial`` ready for ``plan``: kept when an earlier pass of the same
  plan left it, else emptied."""
  progress = os.path.join(partial, PROGRESS_FILE)
  try:
    with open(progress, encoding='utf-8') as f:
      if json.load(f) == plan:
        return
  except (OSError, ValueError):
    pass
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  with open(progress, 'w', encoding='utf-8') as f:
    json.dump(plan, f)


def write(target: str, *, data_dir: str, split: str, label_kind: str, batch_size: int,
          label_batch: LabelBatchFn, stop: Callable[[], None] = lambda: None,
          records_per_shard: int = RECORDS_PER_SHARD,
          max_boxes: int | None = None) -> str:
  """Writes ``target`` (module docstring) from ``split`` of ``data_dir``;
  returns it. A complete ``target`` is left as it is.

  Args:
    label_kind: the labels ``label_batch`` sees (``sparse`` or ``dense``).
    batch_size: images per call of ``label_batch``.
    label_batch: ``(images [B, Hc, Wc, 3], labels [B, Hc, Wc]) ->
      pseudo-labels [B, Hc, Wc]`` (class ids or ``UNLABELED`` on the real
      pixels).
    stop: called after every batch (raises to stop the pass; what is
      complete is kept).
    max_boxes: given, ``label_batch`` also receives the records' weak labels
      as a third argument (:func:`read_weak_labels`: ``tags`` and ``boxes``
      padded to ``max_boxes`` rows, in record pixels).
  """
  if os.path.isdir(target):
    return target
  metadata = input_pipeline.read_metadata(data_dir)
  num_classes = int(metadata['num_classes'])
  info = metadata['splits'][split]
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, name) for name in info['shards']])
  canvas = input_pipeline.split_image_size(data_dir, metadata, split)
  count = len(source)
  num_shards = max(-(-count // records_per_shard), 1)
  names = [f'{split}-{i:05d}-of-{num_shards:05d}.tfrecord' for i in range(num_shards)]
  partial = f'{target}.tmp'
  _resumable_partial(partial, dict(source=os.path.abspath(data_dir), split=split,
                                   num_examples=count, label_kind=label_kind,
                                   records_per_shard=records_per_shard))

  def read(records):
    return _read_batch(records, batch_size, canvas, num_classes,
                       input_pipeline.LABEL_KEYS[label_kind])

  read_weak = None if max_boxes is None else (
      lambda records, sizes: read_weak_labels(records, sizes, batch_size, num_classes,
                                              max_boxes))
  for index, name in enumerate(names):
    path = os.path.join(partial, name)
    if not os.path.exists(path):
      records = [source[i] for i in range(index * records_per_shard,
                                          min((index + 1) * records_per_shard, count))]
      _write_shard(path, records, batch_size, read, label_batch, stop, read_weak)
  split_info = dict(info, shards=names, num_examples=count, has_sparse=True)
  with open(os.path.join(partial, input_pipeline.METADATA_FILE), 'w', encoding='utf-8') as f:
    json.dump(dict(metadata, splits={split: split_info}), f, indent=2)
  os.remove(os.path.join(partial, PROGRESS_FILE))
  os.replace(partial, target)
  return target


def confusion_with_dense(folder: str, split: str = 'train'
                         ) -> tuple[np.ndarray, int, int]:
  """``(confusion [K, K] (dense class, pseudo class), pixels with both a
  dense and a pseudo-label, pixels with a dense label)`` over every record
  of ``split`` of the pseudo-label dataset ``folder``."""
  metadata = input_pipeline.read_metadata(folder)
  num_classes = int(metadata['num_classes'])
  confusion = np.zeros((num_classes, num_classes), np.int64)
  pseudo_labeled = dense_labeled = 0
  for shard in metadata['splits'][split]['shards']:
    for data in tfrecord.read_all_records(os.path.join(folder, shard)):
      example = tfrecord.decode_example(data)
      dense, pseudo = (input_pipeline.decode_label_png(
          example[input_pipeline.LABEL_KEYS[kind]], num_classes)
                       for kind in ('dense', 'sparse'))
      truth = dense != labels_lib.UNLABELED
      both = truth & (pseudo != labels_lib.UNLABELED)
      dense_labeled += int(truth.sum())
      pseudo_labeled += int(both.sum())
      confusion += np.bincount(
          dense[both] * num_classes + pseudo[both],
          minlength=num_classes**2).reshape(num_classes, num_classes)
  return confusion, pseudo_labeled, dense_labeled
