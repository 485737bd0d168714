"""Shared machinery of the converters: validation, encoding, sharding, metadata.

A converter (``folder``, ``voc``, ``cityscapes``) only finds its files and
describes their label encodings; ``convert`` does the rest:

1. every example is loaded and checked (in worker processes once the first
   examples show that the conversion repays their start-up; image decodes;
   label files exist, are single-channel, have the image's size and only
   declared values), label values are mapped to the stored convention (class
   ids, 255 = unlabeled/void; ``agmm_jax.data.labels``), sparse labels are read or
   generated, and the ``tf.train.Example`` is serialized;
2. the main process writes the records, in the input order, into
   ``{split}-{i:05d}-of-{n:05d}.tfrecord`` shards and ``metadata.json`` inside a
   temporary sibling folder, which is renamed to the output only at the end.

Any problem (of every file, not just the first) raises ``ConversionError`` and
leaves no output, unless ``skip_bad`` is set; then the bad examples are left out
and listed in ``bad_files.txt`` of the output. Nothing is dropped silently.
"""

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
import concurrent.futures
import dataclasses
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
import tqdm

from agmm_jax.data import labels as labels_lib
from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels
from data_prep import sparse_labels

STORED_UNLABELED = labels_lib.STORED_UNLABELED
METADATA_FILE = 'metadata.json'
BAD_FILES_FILE = 'bad_files.txt'
DEFAULT_SPLITS = ('train', 'val')
# The words of a label-value problem (LabelDecoder.decode).
BAD_LABEL_VALUES = 'label values'
# Shards hold about this many examples when --num_shards is 0 (automatic).
_EXAMPLES_PER_SHARD = 500
_INVALID = -1


class ConversionError(Exception):
  """Bad input; ``problems`` has one line per offending file.

  ``skippable``: every problem is one of bad examples, which ``skip_bad``
  would leave out (a missing class list or split folder is not). ``hint``:
  what the caller's user can change, for the summary line.
  """

  def __init__(self, problems: Sequence[str], *, skippable: bool = False,
               hint: str = ''):
    self.problems = list(problems)
    self.skippable = skippable
    self.hint = hint
    super().__init__(f'{len(self.problems)} problem(s):\n' +
                     '\n'.join(self.problems))


@dataclasses.dataclass(frozen=True)
class LabelDecoder:
  """Maps raw label PNG values to the stored convention.

  Attributes:
    lut: 256 entries, ``lut[raw] = stored`` value (class id or 255), or -1 when
      ``raw`` is not allowed.
    description: the allowed values in words, for error messages.
  """
  lut: tuple[int, ...]
  description: str

  @classmethod
  def identity(cls, num_classes: int,
               unlabeled_values: Iterable[int]) -> 'LabelDecoder':
    """Class ids as they are; each of ``unlabeled_values`` becomes 255."""
    unlabeled_values = sorted(set(int(v) for v in unlabeled_values))
    lut = [_INVALID] * 256
    for value in range(num_classes):
      lut[value] = value
    for value in unlabeled_values:
      if value < num_classes:
        raise ValueError(f'unlabeled/void value {value} is a class id '
                         f'(< {num_classes})')
      lut[value] = STORED_UNLABELED
    return cls(tuple(lut), f'classes 0..{num_classes - 1} and '
               f'unlabeled/void {unlabeled_values}')

  @classmethod
  def from_mapping(cls, mapping: Mapping[int, int],
                   description: str) -> 'LabelDecoder':
    """Raw value -> stored value (e.g. Cityscapes labelIds -> trainIds)."""
    lut = [_INVALID] * 256
    for raw, stored in mapping.items():
      lut[raw] = stored
    return cls(tuple(lut), description)

  @property
  def unlabeled_raw_values(self) -> list[int]:
    return [raw for raw, stored in enumerate(self.lut)
            if stored == STORED_UNLABELED]

  def decode(self, raw: np.ndarray, path: str) -> np.ndarray:
    """Stored uint8 labels for ``raw`` ``[H, W]``; errors name ``path``."""
    if raw.size and (raw.min() < 0 or raw.max() > 255):
      raise ValueError(f'{path}: label values outside 0..255 '
                       f'(min {raw.min()}, max {raw.max()})')
    lut = np.asarray(self.lut, np.int32)
    stored = lut[raw.astype(np.intp)]
    if (stored == _INVALID).any():
      bad = sorted(np.unique(raw[stored == _INVALID]).tolist())
      raise ValueError(f'{path}: {BAD_LABEL_VALUES} {bad[:20]} are not '
                       f'{self.description}')
    return stored.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SourceExample:
  """Files of one example; ``None`` where the split has no such label."""
  image_id: str
  image_path: str
  dense_path: str | None = None
  sparse_path: str | None = None
  # Tags and boxes read by SplitOptions.annotation_reader (VOC's XML).
  annotation_path: str | None = None


@dataclasses.dataclass(frozen=True)
class SplitOptions:
  """How one split is converted.

  Attributes:
    dense_decoder: raw dense values -> stored; None when there is no dense
      label.
    store_dense: write ``label/dense/encoded`` (the val split always does).
    sparse_decoder: raw values of provided sparse PNGs -> stored.
    sparse_spec: generate sparse labels from the dense ones with this spec.
    seed: generator seed.
    downscale: integer factor; images are shrunk with a box filter, labels by
      nearest neighbour (the pixel at the centre of each block), before
      sparse labels are generated.
    jpeg_quality: 0 keeps JPEG/PNG image bytes as they are; otherwise images
      are re-encoded as JPEG of this quality.
    annotation_reader: ``read(path, height=, width=, num_classes=) -> (tags,
      boxes)`` of an example's ``annotation_path`` (a module-level function:
      workers get it by name), used instead of the tags and boxes a weak
      ``sparse_spec`` derives from the dense labels.
    box_background: the class that gets no box when boxes are derived from
      dense labels (VOC's background), or None.
  """
  dense_decoder: LabelDecoder | None = None
  store_dense: bool = True
  sparse_decoder: LabelDecoder | None = None
  sparse_spec: sparse_labels.SparseSpec | None = None
  seed: int = 0
  downscale: int = 1
  jpeg_quality: int = 0
  annotation_reader: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None
  box_background: int | None = None

  @property
  def has_sparse(self) -> bool:
    return self.sparse_decoder is not None or self.sparse_spec is not None

  @property
  def has_weak_labels(self) -> bool:
    """The records hold tags and boxes (``weak_labels``)."""
    return self.sparse_spec is not None and self.sparse_spec.weak


@dataclasses.dataclass
class SplitSource:
  """A split to convert: examples, options and problems found so far."""
  examples: list[SourceExample]
  options: SplitOptions
  problems: list[str] = dataclasses.field(default_factory=list)
  sparse_settings: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Result:
  image_id: str
  height: int = 0
  width: int = 0
  record: bytes | None = None
  problems: list[str] = dataclasses.field(default_factory=list)
  sparse_stats: sparse_labels.SparseStats | None = None
  num_boxes: int = 0
  unlabeled_values_found: list[int] = dataclasses.field(default_factory=list)
  overlay_png: bytes | None = None


# The label PNG codec of prepared datasets lives in the library (the
# pseudo-label writer stores labels the same way).
encode_png = labels_lib.encode_png
decode_png = labels_lib.decode_png


def _load_image(path: str, options: SplitOptions
                ) -> tuple[bytes, str, int, int, np.ndarray, tuple[int, int]]:
  """Returns (encoded bytes, 'jpeg'|'png', height, width, RGB uint8 array,
  source (height, width) before downscaling)."""
  if not os.path.exists(path):
    raise ValueError(f'{path}: missing image file')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    source_format = image.format
    rgb = np.asarray(image.convert('RGB'))
  except Exception as e:  # PIL raises many types for corrupt files.
    raise ValueError(f'{path}: cannot decode image ({e})') from e
  source_size = rgb.shape[:2]
  factor = options.downscale
  if factor > 1:
    height, width = rgb.shape[0] // factor, rgb.shape[1] // factor
    rgb = np.asarray(Image.fromarray(rgb).resize((width, height),
                                                 Image.Resampling.BOX))
  keep = (factor == 1 and options.jpeg_quality == 0 and image.mode == 'RGB'
          and source_format in ('JPEG', 'PNG'))
  if keep:
    return (data, source_format.lower(), rgb.shape[0], rgb.shape[1], rgb,
            source_size)
  buffer = io.BytesIO()
  if options.jpeg_quality:
    Image.fromarray(rgb).save(buffer, format='JPEG',
                              quality=options.jpeg_quality)
    image_format = 'jpeg'
  else:
    Image.fromarray(rgb).save(buffer, format='PNG')
    image_format = 'png'
  return (buffer.getvalue(), image_format, rgb.shape[0], rgb.shape[1], rgb,
          source_size)


def _load_label(path: str, decoder: LabelDecoder, image_path: str,
                source_size: tuple[int, int],
                downscale: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (stored uint8 [H, W], raw values) after the checks.

  The size check compares the label with the source image before either is
  downscaled, so a label one pixel off is caught whatever the factor.
  """
  if not os.path.exists(path):
    raise ValueError(f'{path}: missing label file (for image {image_path})')
  try:
    label_image = Image.open(path)
    label_image.load()
  except Exception as e:  # PIL raises many types for corrupt files.
    raise ValueError(f'{path}: cannot decode label PNG ({e})') from e
  if label_image.mode not in ('P', 'L', 'I', 'I;16', '1'):
    raise ValueError(f'{path}: label must be a single-channel PNG (class '
                     f'indices), got mode {label_image.mode}')
  raw = np.asarray(label_image).astype(np.int32)
  if raw.shape != tuple(source_size):
    raise ValueError(
        f'{path}: label size {raw.shape[1]}x{raw.shape[0]} differs from image '
        f'size {source_size[1]}x{source_size[0]} ({image_path})')
  if downscale > 1:
    height, width = raw.shape[0] // downscale, raw.shape[1] // downscale
    offset = downscale // 2
    raw = raw[offset::downscale, offset::downscale][:height, :width]
  return decoder.decode(raw, path), raw


def process_example(example: SourceExample, options: SplitOptions,
                    num_classes: int, want_overlay: bool = False) -> _Result:
  """Loads, checks and serializes one example (runs in a worker process)."""
  result = _Result(example.image_id)
  try:
    image_bytes, image_format, height, width, rgb, source_size = _load_image(
        example.image_path, options)
  except ValueError as e:
    result.problems.append(str(e))
    return result
  result.height, result.width = height, width
  features = {
      'image/encoded': image_bytes,
      'image/format': image_format,
      'image/id': example.image_id,
      'image/height': height,
      'image/width': width,
  }
  dense = None
  # Dense labels are read when stored or needed to generate sparse ones, so a
  # sparse-only training split does not require dense files.
  if options.dense_decoder is not None and (options.store_dense or
                                            options.sparse_spec is not None):
    try:
      dense, _ = _load_label(example.dense_path, options.dense_decoder,
                             example.image_path, source_size,
                             options.downscale)
    except ValueError as e:
      result.problems.append(str(e))
    else:
      if options.store_dense:
        features['label/dense/encoded'] = encode_png(dense)
  sparse = None
  if options.sparse_decoder is not None:
    try:
      sparse, raw = _load_label(example.sparse_path, options.sparse_decoder,
                                example.image_path, source_size,
                                options.downscale)
      result.unlabeled_values_found = sorted(
          set(np.unique(raw).tolist())
          & set(options.sparse_decoder.unlabeled_raw_values))
    except ValueError as e:
      result.problems.append(str(e))
  elif options.sparse_spec is not None and dense is not None:
    sparse = sparse_labels.generate(dense, options.sparse_spec,
                                    seed=options.seed,
                                    image_id=example.image_id)
  if options.has_weak_labels and not result.problems:
    try:
      features.update(_weak_features(example, options, dense, num_classes,
                                     source_size, result))
    except ValueError as e:
      result.problems.append(str(e))
  if result.problems:
    return result
  if sparse is not None:
    features['label/sparse/encoded'] = encode_png(sparse)
    result.sparse_stats = sparse_labels.SparseStats(num_classes)
    result.sparse_stats.add(sparse, dense)
    if want_overlay:
      result.overlay_png = sparse_labels.png_bytes(
          sparse_labels.overlay(rgb, sparse))
  result.record = tfrecord.encode_example(features)
  return result


def _weak_features(example: SourceExample, options: SplitOptions,
                   dense: np.ndarray | None, num_classes: int,
                   source_size: tuple[int, int], result: _Result) -> dict:
  """The record features of the example's tags and boxes: read from its
  annotation file, or derived from its dense labels."""
  if options.annotation_reader is not None:
    tags, boxes = options.annotation_reader(
        example.annotation_path, height=source_size[0], width=source_size[1],
        num_classes=num_classes)
    if options.sparse_spec.kind == 'tags':
      boxes = boxes[:0]
    if options.downscale > 1:
      boxes = weak_labels.downscale_boxes(boxes, options.downscale,
                                           *source_size)
  else:
    tags, boxes = sparse_labels.weak_labels(
        dense, options.sparse_spec, num_classes=num_classes,
        background=options.box_background)
  result.num_boxes = len(boxes)
  return weak_labels.record_features(tags, boxes)


def _process_star(args) -> _Result:
  return process_example(*args)


# Split names become file names ({split}-NNNNN-of-MMMMM.tfrecord): a letter or
# digit first (no hidden files, no '.' or '..'), then letters, digits, '_', '-'
# and '.' (no path separators).
_SPLIT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')


def check_split_name(split: str) -> None:
  """Raises ConversionError for a split name that would make odd file names."""
  if not _SPLIT_NAME.fullmatch(split):
    raise ConversionError([
        f'split name {split!r}: use letters, digits, "_", "-" or "." (not '
        'first), e.g. --splits=val; it names the shard files'])


def shard_names(split: str, num_shards: int) -> list[str]:
  return [f'{split}-{i:05d}-of-{num_shards:05d}.tfrecord'
          for i in range(num_shards)]


def _check_ids(split: str, examples: Sequence[SourceExample]) -> list[str]:
  seen = {}
  problems = []
  for example in examples:
    if example.image_id in seen:
      problems.append(f'{example.image_path}: duplicate image id '
                      f'{example.image_id!r} in split {split} (also '
                      f'{seen[example.image_id]})')
    else:
      seen[example.image_id] = example.image_path
  return problems


def _exit_with_parent(parent_pid: int) -> None:
  """Worker initializer: exits the worker once ``parent_pid`` is gone.

  A SIGKILLed converter cannot shut its pool down, and its idle workers
  would wait on their queue forever (a few hundred MB each).
  """
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True).start()


# The worker pool starts only once the examples converted so far show that
# the rest would take longer than this here: each spawned worker imports the
# library first (4-6 s on 2 vCPUs), more than a cheap conversion takes (MSRC's
# 335 dense images: 2.1 s here, 8.7 s with two workers; CamVid with generated
# scribbles: 184 s here, 119 s with two; docs/benchmarks.md).
_POOL_START_S = 10.0
# Examples converted here before the first decision.
_POOL_PROBE = 2


class _Pool:
  """The converter's worker processes, started on first use (``get``)."""

  def __init__(self, num_workers: int):
    self.num_workers = num_workers
    self.executor: concurrent.futures.ProcessPoolExecutor | None = None

  def get(self) -> concurrent.futures.ProcessPoolExecutor:
    if self.executor is None:
      # spawn: workers must not inherit a forked JAX runtime or locks of the
      # calling program.
      self.executor = concurrent.futures.ProcessPoolExecutor(
          self.num_workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_exit_with_parent, initargs=(os.getpid(),))
    return self.executor

  def shutdown(self) -> None:
    if self.executor is not None:
      self.executor.shutdown(wait=True, cancel_futures=True)


def _pool_pays_off(seconds: float, done: int, left: int) -> bool:
  """Whether ``left`` more examples, at the ``seconds / done`` each that
  ``done`` took here, would take longer than a pool's start-up."""
  return done >= _POOL_PROBE and seconds / done * left > _POOL_START_S


def _results(tasks: list[tuple], pool: _Pool | None) -> Iterable:
  """``_process_star`` of each task, in order: in this process, and on
  ``pool`` from the first task where it pays off (at once if it is running)."""
  start = time.monotonic()
  for position, task in enumerate(tasks):
    if pool is not None and (pool.executor is not None or _pool_pays_off(
        time.monotonic() - start, position, len(tasks) - position)):
      yield from pool.get().map(_process_star, tasks[position:], chunksize=4)
      return
    yield _process_star(task)


def _raise_on_signal(signum, frame):
  del frame
  raise KeyboardInterrupt(f'signal {signum}')


def convert(*, name: str, classes: Sequence[str],
            splits: Mapping[str, SplitSource], output: str,
            num_shards: int = 0, num_workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False, overlays: int = 0,
            extra_metadata: Mapping[str, Any] | None = None,
            progress: bool = True) -> dict[str, Any]:
  """Converts ``splits`` into a prepared dataset folder at ``output``.

  Args:
    name: dataset name for the metadata.
    classes: class names; their number is ``num_classes``.
    splits: split name -> examples and options.
    output: the folder to create (must not exist unless ``overwrite``).
    num_shards: shards per split; 0 picks about one per 500 examples.
    num_workers: processes that decode/encode examples (1: in this process).
    skip_bad: leave bad examples out (listed in bad_files.txt) instead of
      failing.
    overwrite: replace an existing ``output``.
    overlays: write this many overlay PNGs per sparse split to
      ``output/overlays/{split}/``.
    extra_metadata: merged into metadata.json (converter settings).
    progress: show tqdm bars.

  Returns:
    The metadata written to ``output/metadata.json``.

  Raises:
    ConversionError: listing every problem (unless ``skip_bad``), or when the
      output exists.
  """
  for split in splits:
    check_split_name(split)
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise ConversionError([f'{output}: output exists (use --overwrite to '
                           'replace it)'])
  num_classes = len(classes)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  temporary = os.path.join(
      parent, f'.{os.path.basename(output)}.incomplete-{os.getpid()}')
  trash = f'{temporary}.old'
  if os.path.exists(temporary):
    shutil.rmtree(temporary)
  os.makedirs(temporary)
  start = time.perf_counter()
  try:
    metadata = _convert_into(
        temporary, name=name, classes=classes, splits=splits,
        num_shards=num_shards, num_workers=num_workers, skip_bad=skip_bad,
        overlays=overlays, progress=progress, num_classes=num_classes)
    metadata.update(extra_metadata or {})
    metadata['conversion_seconds'] = round(time.perf_counter() - start, 2)
    with open(os.path.join(temporary, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
    if os.path.exists(output):
      os.rename(output, trash)
      os.rename(temporary, output)
      shutil.rmtree(trash)
    else:
      os.rename(temporary, output)
    _remove_leftovers_of_killed_runs(output)
  except BaseException:
    # An interruption between the two renames must not lose both datasets.
    if os.path.exists(trash) and not os.path.exists(output):
      os.rename(trash, output)
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  return metadata


def _remove_leftovers_of_killed_runs(output: str) -> None:
  """Deletes the ``.NAME.incomplete-PID`` folders (and their ``.old``
  siblings) that killed conversions into ``output`` left next to it, now that
  ``output`` replaces them. A folder whose PID is alive on this host is kept:
  it may be another conversion in progress."""
  parent, name = os.path.split(output)
  prefix = f'.{name}.incomplete-'
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    pid = entry[len(prefix):].split('.', 1)[0]
    if not pid.isdigit() or _process_alive(int(pid)):
      continue
    logging.info('removing %s, left by a killed conversion',
                 os.path.join(parent, entry))
    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's live process.
  return True


def _convert_into(directory: str, *, name, classes, splits, num_shards,
                  num_workers, skip_bad, overlays, progress,
                  num_classes) -> dict[str, Any]:
  metadata = {
      'name': name,
      'classes': list(classes),
      'num_classes': num_classes,
      'splits': {},
      'label_convention': {
          'stored_unlabeled': STORED_UNLABELED,
          'description': 'uint8 PNG labels: class ids 0..num_classes-1, 255 '
                         'unlabeled (sparse) or void (dense)',
      },
      'sparse_labels': {},
  }
  all_problems = []
  for split, source in splits.items():
    all_problems.extend(source.problems)
    all_problems.extend(_check_ids(split, source.examples))
  pool = _Pool(num_workers) if num_workers > 1 else None
  try:
    for split, source in splits.items():
      split_metadata, sparse_metadata, problems = _convert_split(
          directory, split, source, num_shards=num_shards, pool=pool,
          overlays=overlays, progress=progress, num_classes=num_classes,
          skip_bad=skip_bad, failed_already=bool(all_problems))
      all_problems.extend(problems)
      metadata['splits'][split] = split_metadata
      if sparse_metadata is not None:
        metadata['sparse_labels'][split] = sparse_metadata
  finally:
    if pool is not None:
      pool.shutdown()
  if all_problems and not skip_bad:
    raise ConversionError(all_problems, skippable=True)
  metadata['num_bad_files'] = len(all_problems)
  if all_problems:
    with open(os.path.join(directory, BAD_FILES_FILE), 'w') as f:
      f.write('\n'.join(all_problems) + '\n')
  return metadata


def _convert_split(directory, split, source: SplitSource, *, num_shards,
                   pool, overlays, progress, num_classes, skip_bad,
                   failed_already):
  """Writes one split's shards; returns (split metadata, sparse metadata,
  problems)."""
  examples = source.examples
  options = source.options
  count = len(examples)
  shards = num_shards or max(1, math.ceil(count / _EXAMPLES_PER_SHARD))
  shards = max(1, min(shards, max(count, 1)))
  names = shard_names(split, shards)
  tasks = [(example, options, num_classes,
            options.has_sparse and position < overlays)
           for position, example in enumerate(examples)]
  results = _results(tasks, pool)
  problems = []
  sparse_stats = sparse_labels.SparseStats(num_classes)
  unlabeled_found = set()
  written = num_boxes = 0
  max_height = max_width = 0
  writers = []
  try:
    writers = [tfrecord.TFRecordWriter(os.path.join(directory, n))
               for n in names]
    bar = tqdm.tqdm(results, total=count, desc=f'{split}', unit='img',
                    disable=not progress)
    for position, result in enumerate(bar):
      if result.problems:
        problems.extend(result.problems)
        continue
      if not skip_bad and (failed_already or problems):
        # The conversion will fail; keep checking files but skip writing.
        continue
      # Contiguous shards: example i goes to shard i * shards // count.
      writers[position * shards // count].write(result.record)
      written += 1
      max_height = max(max_height, result.height)
      max_width = max(max_width, result.width)
      if result.sparse_stats is not None:
        sparse_stats.merge(result.sparse_stats)
      num_boxes += result.num_boxes
      unlabeled_found.update(result.unlabeled_values_found)
      if result.overlay_png is not None:
        overlay_dir = os.path.join(directory, 'overlays', split)
        os.makedirs(overlay_dir, exist_ok=True)
        with open(os.path.join(overlay_dir, f'{result.image_id}.png'),
                  'wb') as f:
          f.write(result.overlay_png)
  finally:
    for writer in writers:
      writer.close()
  split_metadata = {
      'num_examples': written,
      'shards': names,
      'has_sparse': options.has_sparse,
      'has_dense': options.dense_decoder is not None and options.store_dense,
      'has_weak_labels': options.has_weak_labels,
      # The largest image of the split (the eval canvas is sized from it).
      'max_height': max_height,
      'max_width': max_width,
  }
  sparse_metadata = None
  if options.has_sparse:
    sparse_metadata = {
        'source': 'provided' if options.sparse_decoder is not None
                  else 'generated',
        **source.sparse_settings,
        **sparse_stats.to_dict(),
    }
    if options.sparse_spec is not None:
      sparse_metadata.update(options.sparse_spec.to_dict())
      sparse_metadata['seed'] = options.seed
    if options.has_weak_labels:
      sparse_metadata['weak_source'] = (
          'annotations' if options.annotation_reader is not None
          else 'dense labels')
      sparse_metadata['boxes_per_image'] = num_boxes / max(written, 1)
    if options.sparse_decoder is not None:
      sparse_metadata['unlabeled_values_found'] = sorted(unlabeled_found)
  return split_metadata, sparse_metadata, problems


def print_summary(metadata: Mapping[str, Any], output: str,
                  file=sys.stdout) -> None:
  """One line per split plus sparse-label statistics."""
  print(f'{output}: {metadata["name"]}, {metadata["num_classes"]} classes, '
        f'{metadata["conversion_seconds"]} s', file=file)
  for split, info in metadata['splits'].items():
    print(f'  {split}: {info["num_examples"]} examples in '
          f'{len(info["shards"])} shard(s), dense={info["has_dense"]}, '
          f'sparse={info["has_sparse"]}', file=file)
    sparse = metadata['sparse_labels'].get(split)
    if sparse:
      print(f'    sparse ({sparse["source"]}'
            f'{", " + sparse["spec"] if "spec" in sparse else ""}): '
            f'{sparse_labels.format_stats(sparse)}', file=file)
      if 'unlabeled_values_found' in sparse:
        print(f'    unlabeled values found in the sparse files: '
              f'{sparse["unlabeled_values_found"]} (stored as 255)', file=file)
  if metadata.get('num_bad_files'):
    print(f'  skipped {metadata["num_bad_files"]} bad file(s), listed in '
          f'{os.path.join(output, BAD_FILES_FILE)}', file=file)


def run_cli(build: Callable[[], dict[str, Any]], output: str) -> int:
  """Runs a converter's ``build()`` (which calls ``convert``) for ``main``.

  Prints every problem on its own line to stderr and returns 1 on bad input;
  SIGTERM interrupts like Ctrl-C (exit status 130), and ``convert`` removes its
  temporary folder on the way out.
  """
  previous = signal.signal(signal.SIGTERM, _raise_on_signal)
  try:
    metadata = build()
  except ConversionError as e:
    for problem in e.problems:
      print(problem, file=sys.stderr)
    hint = (' (--skip_bad leaves bad examples out and lists them)'
            if e.skippable else '')
    print(f'conversion failed: {len(e.problems)} problem(s); nothing written '
          f'to {output}{hint}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'interrupted; nothing written to {output}', file=sys.stderr)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  print_summary(metadata, output)
  return 0


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared by all converters (read back with ``common_kwargs``)."""
  parser.add_argument('--splits', default=None,
                      help='comma-separated splits to convert (default: '
                      f'{",".join(DEFAULT_SPLITS)}; the one split of a flat '
                      'folder dataset: val)')
  parser.add_argument('--sparse_splits', default='train',
                      help='splits that get sparse labels (training splits)')
  parser.add_argument('--output', required=True,
                      help='dataset folder to create (metadata.json + shards)')
  parser.add_argument('--num_shards', type=int, default=0,
                      help='shards per split (0: about one per 500 examples)')
  parser.add_argument('--num_workers', type=int, default=1,
                      help='worker processes for decoding/encoding, at most: '
                      'they start once the first examples show they save '
                      'time (each takes seconds to start)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the sparse-label generator')
  parser.add_argument('--skip_bad', action='store_true',
                      help='leave bad examples out, listed in bad_files.txt')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing output folder')
  parser.add_argument('--overlays', type=int, default=0,
                      help='overlay PNGs of sparse labels per split '
                      '(OUTPUT/overlays/SPLIT/)')
  parser.add_argument('--train_dense', default=True,
                      action=argparse.BooleanOptionalAction,
                      help='also store dense labels for training splits '
                      '(full-supervision upper bound); val always has them')
  parser.add_argument('--jpeg_quality', type=int, default=0,
                      help='re-encode images as JPEG of this quality (0: keep '
                      'the source JPEG/PNG bytes)')
  parser.add_argument('--no_progress', action='store_true',
                      help='hide progress bars')


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  """Converter keyword arguments of the flags of ``add_common_flags``."""
  return dict(
      splits=tuple(s for s in (args.splits or ','.join(DEFAULT_SPLITS)).split(',')
                   if s),
      sparse_splits=tuple(s for s in args.sparse_splits.split(',') if s),
      seed=args.seed, train_dense=args.train_dense,
      jpeg_quality=args.jpeg_quality, num_shards=args.num_shards,
      num_workers=args.num_workers, skip_bad=args.skip_bad,
      overwrite=args.overwrite, overlays=args.overlays,
      progress=not args.no_progress)


def parse_sparse_source_flags(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace) -> tuple[dict[str, str], int | None]:
  """``--split_file`` and ``--unlabeled_value`` ('auto' -> None) of the VOC
  and Cityscapes converters; a bad value is a usage error of ``parser``."""
  try:
    split_files = parse_split_files(args.split_file)
  except ValueError as e:
    parser.error(str(e))
  if args.unlabeled_value == 'auto':
    return split_files, None
  try:
    return split_files, int(args.unlabeled_value)
  except ValueError:
    parser.error(f"--unlabeled_value must be 'auto' or an integer, got "
                 f'{args.unlabeled_value!r}')


def read_split_file(path: str) -> list[list[str]]:
  """Lines of a split list, split on whitespace; blank lines skipped."""
  with open(path) as f:
    return [line.split() for line in f if line.strip()]


def parse_split_files(values: Sequence[str]) -> dict[str, str]:
  """``['train=PATH', ...]`` -> ``{'train': PATH}`` (the --split_file flag)."""
  split_files = {}
  for value in values:
    split, sep, path = value.partition('=')
    if not sep or not split or not path:
      raise ValueError(f'--split_file must be SPLIT=PATH, got {value!r}')
    split_files[split] = path
  return split_files
