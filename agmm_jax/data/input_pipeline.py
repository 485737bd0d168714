"""Grain input pipelines over prepared TFRecord shards.

A prepared dataset folder holds ``metadata.json`` (``classes``,
``num_classes``, ``splits: {split: {num_examples, shards, has_sparse,
has_dense}}``) and the split's TFRecord shards of ``tf.train.Example``s (see
``agmm_jax.data.tfrecord``). Every shard is indexed once (record offsets and
lengths, cached in memory), and the records of a split are exposed as one
random-access Grain data source, which gives

* a true global shuffle, different in every epoch
  (``MapDataset.shuffle(...).repeat()``: Grain folds the epoch into the
  shuffle seed and into the ``random_map`` seeds);
* deterministic augmentation: ``random_map`` draws from a generator seeded by
  the pipeline seed and the element's position in the (repeated, shuffled)
  stream, so the same seed gives the same batches, independently of the number
  of reading threads and of the number of processes;
* exact resumption: the iterator state is the stream position
  (``get_state()`` / ``set_state()``; saved with Orbax through
  ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``, which write one
  JSON file per process);
* per-process slicing: process ``p`` of ``P`` takes stream positions
  ``p, p + P, p + 2P, ...``, so the processes read disjoint examples that
  together cover every epoch.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import io
import json
import math
import os
import threading
from typing import Any, Callable, NamedTuple

import grain
import numpy as np
from PIL import Image
from PIL import ImageOps

from agmm_jax.data import augment
from agmm_jax.data import labels
from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels

METADATA_FILE = 'metadata.json'
IMAGE_KEY = 'image/encoded'
ID_KEY = 'image/id'
LABEL_KEYS = {'sparse': 'label/sparse/encoded', 'dense': 'label/dense/encoded'}
_HAS_LABEL_KEYS = {'sparse': 'has_sparse', 'dense': 'has_dense'}

# Offset indexes of shards already seen, keyed by (path, size, mtime).
_INDEX_CACHE: dict[tuple[str, int, int], np.ndarray] = {}
_INDEX_CACHE_LOCK = threading.Lock()
# Largest image sizes read from the records of a split, keyed by its shards'
# (path, mtime) (datasets prepared without sizes in metadata.json).
_IMAGE_SIZE_CACHE: dict[tuple[tuple[str, int], ...], tuple[int, int]] = {}


def read_metadata(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and checks ``data_dir/metadata.json``.

  Raises:
    ValueError: one line naming the file, if it is missing, not JSON, or lacks
      ``num_classes`` / ``splits`` with ``shards`` and ``num_examples``.
  """
  path = os.path.join(os.fspath(data_dir), METADATA_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      metadata = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'{path}: dataset metadata not found (is data.dir a '
                     'prepared TFRecord folder?)') from None
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable dataset metadata: {e}') from None
  if not isinstance(metadata, dict):
    raise ValueError(f'{path}: expected a JSON object')
  num_classes = metadata.get('num_classes')
  if not isinstance(num_classes, int) or num_classes <= 0:
    raise ValueError(f'{path}: num_classes must be a positive integer, got '
                     f'{num_classes!r}')
  splits = metadata.get('splits')
  if not isinstance(splits, dict) or not splits:
    raise ValueError(f'{path}: splits must be a non-empty object')
  for name, split in splits.items():
    if (not isinstance(split, dict)
        or not isinstance(split.get('shards'), list)
        or not isinstance(split.get('num_examples'), int)):
      raise ValueError(f'{path}: split {name!r} needs a shards list and an '
                       'integer num_examples')
  return metadata


def checked_metadata(data_config) -> dict[str, Any]:
  """The metadata of the prepared dataset ``config.data.dir``; a one-line
  error when the folder does not exist."""
  data_dir = _data_config_value(data_config, 'dir')
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f'config.data.dir={data_dir!r}: no such directory')
  return read_metadata(data_dir)


def class_names(metadata: Mapping[str, Any]) -> list[str]:
  """Class names from metadata.json (``class_<i>`` where it has none)."""
  num_classes = int(metadata['num_classes'])
  names = list(metadata.get('classes') or [])
  if len(names) != num_classes:
    names = [f'class_{i}' for i in range(num_classes)]
  return [str(name) for name in names]


def num_examples(metadata: Mapping[str, Any], split: str, data_dir: str) -> int:
  """Number of examples of ``split`` from the dataset's metadata.json."""
  if split not in metadata['splits']:
    raise ValueError(f'{data_dir}/metadata.json: no split {split!r} (has '
                     f'{sorted(metadata["splits"])})')
  return int(metadata['splits'][split]['num_examples'])


def split_image_size(data_dir: str, metadata: Mapping[str, Any],
                     split: str) -> tuple[int, int]:
  """``(max height, max width)`` over the images of ``split``.

  From the split's ``max_height`` / ``max_width`` in metadata.json (written
  by data_prep), or, for datasets prepared without them, read from every
  record's ``image/height`` and ``image/width``.
  """
  info = metadata['splits'].get(split, {})
  if 'max_height' in info and 'max_width' in info:
    return int(info['max_height']), int(info['max_width'])
  shards = _split_shards(data_dir, metadata, split, None)
  key = tuple((os.path.abspath(p), os.stat(p).st_mtime_ns) for p in shards)
  with _INDEX_CACHE_LOCK:
    size = _IMAGE_SIZE_CACHE.get(key)
  if size is not None:
    return size
  source = TFRecordSource(shards)
  height = width = 0
  for index in range(len(source)):
    record = source[index]
    try:
      example = tfrecord.decode_example(record.data)
      height = max(height, int(example['image/height'][0]))
      width = max(width, int(example['image/width'][0]))
    except (ValueError, KeyError, IndexError) as e:
      raise ValueError(f'{record.where}: no image/height and image/width '
                       f'({e})') from None
  with _INDEX_CACHE_LOCK:
    _IMAGE_SIZE_CACHE[key] = (height, width)
  return height, width


def eval_canvas(data_config, split: str) -> tuple[int, int]:
  """The eval canvas ``(Hc, Wc)`` of ``split``: ``data.eval_canvas``, or the
  split's largest image size when it is empty.

  Raises:
    ValueError: one line naming ``config.data.eval_canvas`` and the size the
      split needs, when the given canvas is smaller than one of its images.
  """
  data_dir = os.fspath(_data_config_value(data_config, 'dir'))
  metadata = read_metadata(data_dir)
  _split_shards(data_dir, metadata, split, 'dense')
  needed = split_image_size(data_dir, metadata, split)
  canvas = tuple(int(s) for s in _data_config_value(data_config, 'eval_canvas'))
  if not canvas:
    return needed
  if len(canvas) != 2:
    raise ValueError(f'config.data.eval_canvas must be (H, W) or () (sized '
                     f'from the data), got {canvas}')
  if canvas[0] < needed[0] or canvas[1] < needed[1]:
    raise ValueError(
        f'config.data.eval_canvas={canvas} is smaller than the largest image '
        f'({needed[0]}x{needed[1]}) of split {split!r} of {data_dir}; set '
        f"--config.data.eval_canvas='{needed}' or '()' to size it from the "
        'data')
  return canvas


def check_crop_size(data_config) -> None:
  """Checks ``data.crop_size`` against the training images at start-up.

  A crop larger than the longest side of every rescaled training image (the
  largest image at the largest ``scale_range`` factor) would be mostly
  padding in both directions; that is a one-line ValueError naming both.
  Datasets prepared without image sizes in metadata.json are not read for
  this (the train split can be large).
  """
  data_dir = os.fspath(_data_config_value(data_config, 'dir'))
  metadata = read_metadata(data_dir)
  split = str(_data_config_value(data_config, 'train_split'))
  crop_size = int(_data_config_value(data_config, 'crop_size'))
  if crop_size < 1:
    raise ValueError(f'config.data.crop_size must be positive, got {crop_size}')
  info = metadata['splits'].get(split, {})
  if 'max_height' not in info or 'max_width' not in info:
    return
  longest = max(int(info['max_height']), int(info['max_width']))
  high = float(_data_config_value(data_config, 'scale_range')[1])
  if crop_size > int(longest * high):
    raise ValueError(
        f'config.data.crop_size={crop_size} is larger than the longest side '
        f'of every training image even at the largest scale ({longest} x '
        f'{high} of split {split!r} of {data_dir}); set '
        f'--config.data.crop_size to at most {int(longest * high)}')


def _split_shards(data_dir: str, metadata: Mapping[str, Any], split: str,
                  label_kind: str | None) -> list[str]:
  """The shard paths of ``split``; checks the split carries ``label_kind``."""
  path = os.path.join(data_dir, METADATA_FILE)
  splits = metadata['splits']
  if split not in splits:
    raise ValueError(f'{path}: no split {split!r} (has {sorted(splits)})')
  info = splits[split]
  if label_kind is not None and not info.get(_HAS_LABEL_KEYS[label_kind],
                                             False):
    raise ValueError(f'{path}: split {split!r} has no {label_kind} labels '
                     f'({_HAS_LABEL_KEYS[label_kind]} is false)')
  if not info['shards']:
    raise ValueError(f'{path}: split {split!r} lists no shards')
  return [os.path.join(data_dir, name) for name in info['shards']]


def cached_index_shard(path: str) -> np.ndarray:
  """``tfrecord.index_shard`` memoized on (path, size, mtime): int64 [N, 2]."""
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  with _INDEX_CACHE_LOCK:
    index = _INDEX_CACHE.get(key)
  if index is None:
    index = tfrecord.index_shard(path)
    with _INDEX_CACHE_LOCK:
      _INDEX_CACHE[key] = index
  return index


class RawRecord(NamedTuple):
  """A record's bytes and where it came from (``'SHARD: record I'``)."""
  data: bytes
  where: str


# Stands for a padding example at the end of an eval split.
FILLER = RawRecord(b'', '')


class TFRecordSource:
  """Random access to the records of several shards (Grain data source).

  Record ``i`` of the concatenation of the shards (in the given order) is read
  with one positioned read; its CRC is checked. Reads are thread-safe: every
  thread keeps its own file handles.
  """

  def __init__(self, shard_paths: Sequence[str]):
    self._paths = [os.fspath(p) for p in shard_paths]
    indexes = [cached_index_shard(p) for p in self._paths]
    counts = np.array([len(index) for index in indexes], np.int64)
    self._shard_of = np.repeat(np.arange(len(indexes)), counts)
    self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self._locations = (np.concatenate(indexes) if indexes
                       else np.zeros((0, 2), np.int64))
    self._local = threading.local()

  def __len__(self) -> int:
    return len(self._locations)

  def __getitem__(self, record_key: int) -> RawRecord:
    record_key = int(record_key)
    shard = int(self._shard_of[record_key])
    record_index = record_key - int(self._first[shard])
    offset, length = self._locations[record_key].tolist()
    path = self._paths[shard]
    data = tfrecord.read_record(self._file(shard), offset, length, shard=path,
                                record_index=record_index)
    return RawRecord(data, f'{path}: record {record_index}')

  def _file(self, shard: int):
    handles = getattr(self._local, 'handles', None)
    if handles is None:
      handles = self._local.handles = {}
    if shard not in handles:
      handles[shard] = open(self._paths[shard], 'rb')
    return handles[shard]

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_local']  # Open files do not travel to worker processes.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def __repr__(self) -> str:
    return f'TFRecordSource({len(self._paths)} shards, {len(self)} records)'


def decode_label_png(encoded: bytes, num_classes: int) -> np.ndarray:
  """A stored label PNG as class ids, ``labels.UNLABELED`` elsewhere."""
  with Image.open(io.BytesIO(encoded)) as png:
    stored = np.asarray(png)
  if stored.ndim != 2 or stored.dtype != np.uint8:
    raise ValueError(f'label PNG must be single-channel uint8, got shape '
                     f'{stored.shape} {stored.dtype}')
  return labels.from_stored(stored, num_classes)


def decode_record(record: RawRecord, *, num_classes: int,
                  label_key: str) -> tuple[Image.Image, np.ndarray, str]:
  """Decodes a record into an RGB image, its int32 label and its id.

  Returns:
    (PIL RGB image ``W x H``, int32 ``[H, W]`` label in the ``labels``
    convention, id string).

  Raises:
    ValueError: naming the shard and record, for a bad Example, a missing key,
      an undecodable image/label, a size mismatch or an out-of-range label.
  """
  try:
    example = tfrecord.decode_example(record.data)
    for key in (IMAGE_KEY, label_key):
      if key not in example:
        raise ValueError(f'missing feature {key!r}')
    example_id = example.get(ID_KEY, b'')
    if isinstance(example_id, bytes):
      example_id = example_id.decode('utf-8', errors='replace')
    # Decoded from memory, so no file handle needs closing; RGB JPEGs are
    # used as decoded, without convert()'s copy.
    image = Image.open(io.BytesIO(example[IMAGE_KEY]))
    image.load()
    if image.mode != 'RGB':
      image = image.convert('RGB')
    label = decode_label_png(example[label_key], num_classes)
    if label.shape != (image.height, image.width):
      raise ValueError(f'{label_key} is {label.shape[0]}x{label.shape[1]} but '
                       f'the image is {image.height}x{image.width}')
  except (ValueError, OSError) as e:
    raise ValueError(f'{record.where}: {e}') from e
  return image, label, str(example_id)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Grain random map: raw record -> augmented train example dict."""
  num_classes: int
  label_key: str
  crop_size: int
  scale_range: tuple[float, float]
  augment: str
  # (name, make) of the fields a loss method declares (Needs.batch_fields):
  # make(example) -> array, computed from the augmented example.
  batch_fields: tuple[tuple[str, Callable[..., np.ndarray]], ...] = ()
  # The records hold tags and boxes (the split's has_weak_labels).
  has_weak_labels: bool = False

  def __call__(self, record: RawRecord,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label, _ = decode_record(record, num_classes=self.num_classes,
                                    label_key=self.label_key)
    geometry = augment.sample_geometry(
        image.height, image.width, crop_size=self.crop_size,
        scale_range=self.scale_range, rng=rng)
    example = augment.augment_train(
        image, label, num_classes=self.num_classes, crop_size=self.crop_size,
        scale_range=self.scale_range, augment=self.augment, rng=rng,
        geometry=geometry)._asdict()
    weak = {}
    if self.has_weak_labels:
      weak = weak_labels.train_weak_labels(
          tfrecord.decode_example(record.data), num_classes=self.num_classes,
          source_size=(image.height, image.width), geometry=geometry,
          crop_size=self.crop_size, where=record.where)
      # The weak labels name the classes present: sparse maps of the weak
      # kinds label no pixel.
      example['class_present'] = weak['tags']
    # The factories also see the weak labels (variable-size boxes); the batch
    # holds only what they make of them.
    seen = {**example, **weak}
    fields = {name: np.asarray(make(seen)) for name, make in self.batch_fields}
    return {**example, **fields}


def _data_config_value(data_config, name: str):
  """``config.data.<name>``; the defaults live in configs/common.py only."""
  if not hasattr(data_config, name):
    raise ValueError(f'config.data has no field {name!r}')
  return getattr(data_config, name)


def _read_options(data_config) -> grain.ReadOptions:
  num_threads = int(_data_config_value(data_config, 'num_threads'))
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=max(1, 2 * num_threads))


def _checked_batch_fields(batch_fields: Mapping[str, Callable[..., np.ndarray]] | None
                          ) -> tuple[tuple[str, Callable[..., np.ndarray]], ...]:
  """Sorted ``(name, make)`` pairs; a name of the standard batch is an error."""
  fields = tuple(sorted((batch_fields or {}).items()))
  for name, _ in fields:
    if name in augment.TrainExample._fields:
      raise ValueError(f'batch field {name!r} would replace the batch\'s own '
                       f'{name!r}; declare it under another name')
  return fields


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, '
                     f'{process_count})')


def create_train_iterator(data_config, *, batch_size_per_process: int,
                          seed: int, process_index: int = 0,
                          process_count: int = 1,
                          num_classes: int | None = None,
                          batch_fields: Mapping[str, Callable[..., np.ndarray]]
                          | None = None) -> grain.DatasetIterator:
  """The infinite, checkpointable iterator of this process's train batches.

  Args:
    data_config: ``config.data`` (``dir``, ``train_split``, ``train_labels``,
      ``crop_size``, ``scale_range``, ``augment``, ``num_threads``,
      ``prefetch``).
    batch_size_per_process: ``b``.
    seed: pipeline seed in ``[0, 2**32)`` (shuffle and augmentation).
    process_index: this JAX process, ``jax.process_index()``.
    process_count: ``jax.process_count()``.
    num_classes: ``K``; defaults to ``metadata['num_classes']``.
    batch_fields: extra fields by name, ``make(example) -> array`` of one
      augmented example (``image``, ``label``, ``class_present``, and where
      the split has weak labels ``tags`` and ``boxes`` of
      ``weak_labels.crop_boxes``): the loss's ``Needs.batch_fields``.

  Returns:
    A Grain ``DatasetIterator`` (``get_state()`` / ``set_state()``) of dicts:
    ``image`` float32 ``[b, c, c, 3]``, ``label`` int32 ``[b, c, c]``,
    ``class_present`` float32 ``[b, K]``, and each batch field stacked over
    the batch.
  """
  _check_process(process_index, process_count)
  data_dir = os.fspath(_data_config_value(data_config, 'dir'))
  metadata = read_metadata(data_dir)
  num_classes = int(num_classes or metadata['num_classes'])
  label_kind = str(_data_config_value(data_config, 'train_labels'))
  if label_kind not in LABEL_KEYS:
    raise ValueError(f'data.train_labels {label_kind!r} is not one of '
                     f'{sorted(LABEL_KEYS)}')
  augment_name = str(_data_config_value(data_config, 'augment'))
  if augment_name not in augment.AUGMENTS:
    raise ValueError(f'data.augment {augment_name!r} is not one of '
                     f'{augment.AUGMENTS}')
  split = str(_data_config_value(data_config, 'train_split'))
  source = TFRecordSource(_split_shards(data_dir, metadata, split, label_kind))
  if not len(source):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'{data_dir}: split {split!r} has no records')
  scale_range = tuple(float(s) for s in _data_config_value(data_config, 'scale_range'))
  transform = TrainTransform(
      num_classes=num_classes, label_key=LABEL_KEYS[label_kind],
      crop_size=int(_data_config_value(data_config, 'crop_size')),
      scale_range=scale_range, augment=augment_name,
      batch_fields=_checked_batch_fields(batch_fields),
      has_weak_labels=bool(metadata['splits'][split].get('has_weak_labels')))
  dataset = (grain.MapDataset.source(source).seed(int(seed)).shuffle()
             .repeat(None).random_map(transform))
  dataset = dataset[process_index::process_count]
  prefetch = int(_data_config_value(data_config, 'prefetch'))
  read_options = _read_options(data_config)
  read_options = dataclasses.replace(
      read_options, prefetch_buffer_size=max(
          read_options.prefetch_buffer_size, prefetch * batch_size_per_process))
  iter_dataset = dataset.to_iter_dataset(read_options).batch(
      batch_size_per_process, drop_remainder=True)
  return iter(iter_dataset)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Grain map: raw record (or ``FILLER``) -> eval example dict."""
  num_classes: int
  canvas: tuple[int, int]

  def __call__(self, record: RawRecord) -> dict[str, Any]:
    canvas_height, canvas_width = self.canvas
    if record == FILLER:
      return {
          'image': np.zeros((canvas_height, canvas_width, 3), np.float32),
          'label': np.full((canvas_height, canvas_width), labels.PADDING,
                           np.int32),
          'height': np.int32(0), 'width': np.int32(0), 'id': ''}
    image, label, example_id = decode_record(
        record, num_classes=self.num_classes, label_key=LABEL_KEYS['dense'])
    if image.height > canvas_height or image.width > canvas_width:
      raise ValueError(
          f'{record.where} (id {example_id!r}): the {image.height}x'
          f'{image.width} image does not fit data.eval_canvas '
          f'{canvas_height}x{canvas_width}; use a larger canvas')
    image_array, label_array = augment.pad_to_canvas(
        augment.normalize(np.asarray(image)), label, self.canvas)
    return {'image': image_array, 'label': label_array,
            'height': np.int32(image.height), 'width': np.int32(image.width),
            'id': example_id}


class _PaddedSource:
  """``source`` followed by ``FILLER``s up to ``length`` elements.

  (Not ``None``: Grain drops ``None`` elements as filtered out.)
  """

  def __init__(self, source: TFRecordSource, length: int):
    self._source = source
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    return self._source[index] if index < len(self._source) else FILLER

  def __repr__(self) -> str:
    return f'_PaddedSource({self._source!r}, length={self._length})'


def stack_eval_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Batches eval example dicts; ``id`` becomes a NumPy str array ``[b]``."""
  batch = {key: np.stack([e[key] for e in examples])
           for key in ('image', 'label', 'height', 'width')}
  batch['id'] = np.array([e['id'] for e in examples], dtype=str)
  return batch


def eval_num_batches(num_examples: int, *, batch_size_per_process: int,
                     process_count: int = 1) -> int:
  """Batches every process sees: ``ceil(N / (b * P))``."""
  return math.ceil(num_examples / (batch_size_per_process * process_count))


def create_eval_iterator(data_config, split: str, *,
                         batch_size_per_process: int, process_index: int = 0,
                         process_count: int = 1,
                         num_classes: int | None = None) -> grain.IterDataset:
  """The finite, re-iterable eval batches of this process.

  Process ``p`` of ``P`` takes examples ``p, p + P, ...``; the example list is
  extended with fillers (zero image, all-``PADDING`` label, size 0, id ``''``)
  to ``eval_num_batches * b * P`` so that every process yields the same
  number of equally shaped batches.

  Returns:
    A Grain ``IterDataset`` of dicts: ``image`` float32 ``[b, Hc, Wc, 3]``
    (0, the mean colour, outside the image), ``label`` int32 ``[b, Hc, Wc]``
    (dense; void -> ``UNLABELED``, outside the image -> ``PADDING``),
    ``height`` / ``width`` int32 ``[b]``, and the host-side ``id`` str array
    ``[b]``.
  """
  _check_process(process_index, process_count)
  data_dir = os.fspath(_data_config_value(data_config, 'dir'))
  metadata = read_metadata(data_dir)
  num_classes = int(num_classes or metadata['num_classes'])
  source = TFRecordSource(_split_shards(data_dir, metadata, split, 'dense'))
  canvas = eval_canvas(data_config, split)
  num_batches = eval_num_batches(
      len(source), batch_size_per_process=batch_size_per_process,
      process_count=process_count)
  padded = _PaddedSource(source,
                         num_batches * batch_size_per_process * process_count)
  dataset = grain.MapDataset.source(padded)[process_index::process_count]
  dataset = dataset.map(EvalTransform(num_classes=num_classes, canvas=canvas))
  return dataset.to_iter_dataset(_read_options(data_config)).batch(
      batch_size_per_process, batch_fn=stack_eval_examples)


def _as_rgb8(image: Image.Image) -> np.ndarray:
  """uint8 ``[H, W, 3]`` of any PIL mode: 16-bit grey (``I;16``, ``I``: how
  Pillow opens a 16-bit PNG) scaled from 0..65535, which Pillow's own
  ``convert('RGB')`` clips at 255 (a white image)."""
  if image.mode.startswith('I'):
    grey = np.clip(np.round(np.asarray(image, np.float64) * 255 / 65535), 0, 255)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
  return np.asarray(image.convert('RGB'))


def load_image_for_predict(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an image file as a normalized float32 ``[H, W, 3]`` array as
  viewers show it (EXIF orientation applied, any mode as 8-bit RGB).
  Raises:
    ValueError: naming the file, if it cannot be read as an image.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      rgb = _as_rgb8(ImageOps.exif_transpose(image))
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'{path}: not a readable image: {e}') from None
  return augment.normalize(rgb)
