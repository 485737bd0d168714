"""Tiny on-disk datasets in the exact layouts and encodings of the real ones.

* ``make_folder_root``: CamVid-like folder (``{split}/images/NAME.jpg``,
  ``{split}/labels/NAME.png`` single-channel, ``classes.txt``, a void value).
* ``make_voc_root``: VOC 2012 (``JPEGImages``, palette ``SegmentationClass``
  with 255 object borders, grayscale ``SegmentationClassAug``,
  ``point/segcls`` and ``scribble/seginst`` sparse PNGs with 255 or 21 as
  unlabeled, ``ImageSets/Segmentation`` lists, an official-format split list).
* ``make_cityscapes_root``: ``leftImg8bit``/``gtFine`` (labelIds and
  labelTrainIds) and flat ``{N}clicks`` folders with 19 or 255 as unlabeled.
* ``make_folder_dataset_tfrecords``: a converted dataset folder, quickly (for
  the input pipeline and trainer tests).
* ``truncate_largest_file`` and ``host_array``: damage a saved checkpoint, and
  read its leaves back as NumPy (the resume and fault tests).

Each ``make_*_root`` returns ``(root, truth)`` where ``truth`` holds the labels
in the stored convention (uint8 class ids, 255 unlabeled/void) that a correct
converter must produce, computed here independently of ``data_prep``.
"""

import os

import jax
import numpy as np
from PIL import Image

HEIGHT, WIDTH = 40, 56
STORED_UNLABELED = 255


def _voc_palette() -> list[int]:
  palette = []
  for index in range(256):
    value, r, g, b = index, 0, 0, 0
    for bit in range(8):
      r |= ((value >> 0) & 1) << (7 - bit)
      g |= ((value >> 1) & 1) << (7 - bit)
      b |= ((value >> 2) & 1) << (7 - bit)
      value >>= 3
    palette += [r, g, b]
  return palette


def scene_labels(rng: np.random.Generator, class_ids, height: int = HEIGHT,
                 width: int = WIDTH) -> np.ndarray:
  """uint8 ``[H, W]``: a background of ``class_ids[0]`` and 2-3 rectangles."""
  label = np.full((height, width), class_ids[0], np.uint8)
  for _ in range(int(rng.integers(2, 4))):
    top = int(rng.integers(0, height - 8))
    left = int(rng.integers(0, width - 8))
    bottom = top + int(rng.integers(6, height // 2))
    right = left + int(rng.integers(6, width // 2))
    label[top:bottom, left:right] = rng.choice(class_ids[1:])
  return label


def scene_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
  """uint8 RGB ``[H, W, 3]``: a colour per label value plus noise."""
  colours = np.asarray(_voc_palette(), np.int32).reshape(256, 3)
  base = colours[(label.astype(np.int32) * 37 + 11) % 256]
  noise = rng.integers(-20, 21, size=base.shape)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _boundary(label: np.ndarray) -> np.ndarray:
  """Pixels whose 4-neighbourhood holds another value (VOC's void borders)."""
  edge = np.zeros(label.shape, bool)
  edge[:-1] |= label[:-1] != label[1:]
  edge[1:] |= label[1:] != label[:-1]
  edge[:, :-1] |= label[:, :-1] != label[:, 1:]
  edge[:, 1:] |= label[:, 1:] != label[:, :-1]
  return edge


def _sparse_from(rng: np.random.Generator, stored_dense: np.ndarray,
                 count: int) -> np.ndarray:
  """Stored sparse labels: ``count`` random non-void pixels keep their class."""
  sparse = np.full_like(stored_dense, STORED_UNLABELED)
  candidates = np.flatnonzero(stored_dense != STORED_UNLABELED)
  chosen = rng.choice(candidates, size=min(count, candidates.size),
                      replace=False)
  sparse.reshape(-1)[chosen] = stored_dense.reshape(-1)[chosen]
  return sparse


def _save_l(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.astype(np.uint8), mode='L').save(path)


def _save_rgb(path: str, rgb: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith('.jpg'):
    Image.fromarray(rgb).save(path, quality=95)
  else:
    Image.fromarray(rgb).save(path)


def make_folder_root(tmp_path, *, num_classes: int = 4,
                     split_sizes: dict[str, int] | None = None,
                     void_value: int | None = None, height: int = HEIGHT,
                     width: int = WIDTH, seed: int = 0, name: str = 'folder'):
  """CamVid-like folder; void pixels (value ``num_classes`` by default) on a
  few random pixels. Returns ``(root, {split: {id: stored dense}})``."""
  split_sizes = split_sizes or {'train': 4, 'val': 2}
  void_value = num_classes if void_value is None else void_value
  rng = np.random.default_rng(seed)
  root = os.path.join(str(tmp_path), name)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.write(''.join(f'class_{c}\n' for c in range(num_classes)))
  truth = {}
  for split, size in split_sizes.items():
    truth[split] = {}
    for index in range(size):
      image_id = f'{split}_{index:04d}'
      label = scene_labels(rng, list(range(num_classes)), height, width)
      raw = label.copy()
      void = rng.random(label.shape) < 0.05
      raw[void] = void_value
      _save_rgb(os.path.join(root, split, 'images', image_id + '.jpg'),
                scene_image(rng, raw))
      _save_l(os.path.join(root, split, 'labels', image_id + '.png'), raw)
      stored = raw.copy()
      stored[void] = STORED_UNLABELED
      truth[split][image_id] = stored
  return root, truth


def make_voc_root(tmp_path, *, train_ids=('2007_000032', '2007_000039',
                                          '2008_000002', '2009_000566'),
                  val_ids=('2007_000033', '2007_000042'),
                  sparse_unlabeled: int = 255, seed: int = 0):
  """VOC 2012 layout. Returns ``(root, truth)`` with ``truth['dense'][id]``,
  ``truth['point'][id]`` and ``truth['scribble'][id]`` (stored convention)."""
  rng = np.random.default_rng(seed)
  root = os.path.join(str(tmp_path), 'VOC2012')
  truth = {'dense': {}, 'point': {}, 'scribble': {}}
  for image_id in list(train_ids) + list(val_ids):
    label = scene_labels(rng, [0, 1, 7, 15, 20])
    # VOC marks object borders as void (255), in both label folders.
    label[_boundary(label)] = 255
    _save_rgb(os.path.join(root, 'JPEGImages', image_id + '.jpg'),
              scene_image(rng, label))
    palette_png = Image.fromarray(label, mode='P')
    palette_png.putpalette(_voc_palette())
    os.makedirs(os.path.join(root, 'SegmentationClass'), exist_ok=True)
    palette_png.save(os.path.join(root, 'SegmentationClass', image_id + '.png'))
    _save_l(os.path.join(root, 'SegmentationClassAug', image_id + '.png'),
            label)
    truth['dense'][image_id] = label
    if image_id in train_ids:
      for kind, folder, count in (('point', 'point/segcls', 4),
                                  ('scribble', 'scribble/seginst', 60)):
        stored = _sparse_from(rng, label, count)
        raw = stored.copy()
        raw[stored == STORED_UNLABELED] = sparse_unlabeled
        _save_l(os.path.join(root, folder, image_id + '.png'), raw)
        truth[kind][image_id] = stored
  lists = os.path.join(root, 'ImageSets', 'Segmentation')
  os.makedirs(lists, exist_ok=True)
  for split, ids in (('train', train_ids), ('val', val_ids)):
    with open(os.path.join(lists, f'{split}.txt'), 'w') as f:
      f.write(''.join(f'{i}\n' for i in ids))
  # The official AGMM list format: "NAME.jpg NAME.png".
  os.makedirs(os.path.join(root, 'splits'), exist_ok=True)
  with open(os.path.join(root, 'splits', 'train.txt'), 'w') as f:
    f.write(''.join(f'{i}.jpg {i}.png\n' for i in train_ids))
  return root, truth


# labelId -> trainId, written out independently of data_prep.cityscapes
# (cityscapesScripts helpers/labels.py: name, id, trainId).
CITYSCAPES_LABELS = (
    ('unlabeled', 0, 255), ('ego vehicle', 1, 255),
    ('rectification border', 2, 255), ('out of roi', 3, 255),
    ('static', 4, 255), ('dynamic', 5, 255), ('ground', 6, 255),
    ('road', 7, 0), ('sidewalk', 8, 1), ('parking', 9, 255),
    ('rail track', 10, 255), ('building', 11, 2), ('wall', 12, 3),
    ('fence', 13, 4), ('guard rail', 14, 255), ('bridge', 15, 255),
    ('tunnel', 16, 255), ('pole', 17, 5), ('polegroup', 18, 255),
    ('traffic light', 19, 6), ('traffic sign', 20, 7), ('vegetation', 21, 8),
    ('terrain', 22, 9), ('sky', 23, 10), ('person', 24, 11), ('rider', 25, 12),
    ('car', 26, 13), ('truck', 27, 14), ('bus', 28, 15), ('caravan', 29, 255),
    ('trailer', 30, 255), ('train', 31, 16), ('motorcycle', 32, 17),
    ('bicycle', 33, 18))


def make_cityscapes_root(tmp_path, *, clicks=(20,), click_unlabeled: int = 19,
                         seed: int = 0):
  """Cityscapes layout (2 train cities, 1 val city). Returns ``(root, truth)``
  with ``truth['dense'][split][id]`` (train ids, 255 void),
  ``truth['label_ids'][split][id]`` (raw) and ``truth['clicks'][N][id]``."""
  rng = np.random.default_rng(seed)
  root = os.path.join(str(tmp_path), 'cityscapes')
  to_train_id = np.full(256, 255, np.uint8)
  for _, label_id, train_id in CITYSCAPES_LABELS:
    to_train_id[label_id] = train_id
  all_ids = [label_id for _, label_id, _ in CITYSCAPES_LABELS]
  truth = {'dense': {}, 'label_ids': {}, 'clicks': {n: {} for n in clicks}}
  cities = {'train': ('aachen', 'bochum'), 'val': ('frankfurt',)}
  for split, split_cities in cities.items():
    truth['dense'][split] = {}
    truth['label_ids'][split] = {}
    for city in split_cities:
      for frame in range(2):
        image_id = f'{city}_{frame:06d}_000019'
        label_ids = scene_labels(rng, [7] + all_ids)
        train_ids = to_train_id[label_ids]
        _save_rgb(os.path.join(root, 'leftImg8bit', split, city,
                               f'{image_id}_leftImg8bit.png'),
                  scene_image(rng, label_ids))
        gt = os.path.join(root, 'gtFine', split, city, f'{image_id}_gtFine')
        _save_l(f'{gt}_labelIds.png', label_ids)
        _save_l(f'{gt}_labelTrainIds.png', train_ids)
        truth['dense'][split][image_id] = train_ids
        truth['label_ids'][split][image_id] = label_ids
        if split == 'train':
          for count in clicks:
            stored = _sparse_from(rng, train_ids, count)
            raw = stored.copy()
            raw[stored == STORED_UNLABELED] = click_unlabeled
            _save_l(os.path.join(root, f'{count}clicks',
                                 f'{image_id}_gtFine_labelTrainIds.png'), raw)
            truth['clicks'][count][image_id] = stored
  return root, truth


def make_folder_dataset_tfrecords(tmp_path, *, num_train: int = 6,
                                  num_val: int = 3, num_classes: int = 4,
                                  sparse: str = 'points:1',
                                  height: int = HEIGHT, width: int = WIDTH,
                                  seed: int = 0, train_dense: bool = True,
                                  num_shards: int = 2) -> str:
  """A prepared dataset folder (metadata.json + shards) from a folder fixture.

  Returns the dataset directory (``tmp_path/prepared``).
  """
  from data_prep import folder  # pylint: disable=g-import-not-at-top
  root, _ = make_folder_root(
      tmp_path, num_classes=num_classes,
      split_sizes={'train': num_train, 'val': num_val}, height=height,
      width=width, seed=seed, name='folder_source')
  data_dir = os.path.join(str(tmp_path), 'prepared')
  folder.convert_folder(root, data_dir, void_values=(num_classes,),
                        sparse=sparse, seed=seed, train_dense=train_dense,
                        num_shards=num_shards, progress=False)
  return data_dir


def truncate_largest_file(directory: str) -> None:
  """Cuts the largest file under ``directory`` to half its size (a write
  interrupted by a crash, as the storage layer sees it)."""
  paths = [os.path.join(root, name) for root, _, names in os.walk(directory)
           for name in names]
  largest = max(paths, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def host_array(leaf) -> np.ndarray:
  """NumPy view of a restored leaf (typed PRNG keys as their key data)."""
  if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None), jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)
