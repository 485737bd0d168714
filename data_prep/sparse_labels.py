r"""Seeded sparse-label generator: points, clicks, scribbles from dense masks.

Input is a stored dense label map (uint8 ``[H, W]``: class ids, 255 = void);
output is a stored sparse label map of the same shape (class ids on the chosen
pixels, 255 elsewhere). A generated label is always the pixel's own dense
class, and void pixels are never labeled.

Spec strings (``parse_spec``):

* ``points[:K][:margin=M][:min_area=A]``: ``K`` (default 1) points per
  8-connected region of each class with at least ``A`` (default 1) pixels,
  drawn uniformly from the region eroded by ``M`` pixels (default 0), so
  points keep away from region borders; when erosion empties a region the whole
  region is used instead.
* ``clicks:N``: the Cityscapes "N clicks" protocol: ``N`` pixels per image drawn
  uniformly without replacement from all non-void pixels (so large classes get
  more clicks, as with the released 20/50/100-click files).
* ``scribbles[:F][:erode=E][:min_area=A][:width=W]``: per 8-connected region
  (at least ``A`` pixels), the region is eroded by ``E`` pixels (default 2;
  the region itself when that empties it) and thinned to a one-pixel skeleton
  (Zhang-Suen thinning, implemented here because scikit-image is not a
  dependency); the scribble is the connected piece of the skeleton grown by
  breadth-first search from a random skeleton pixel until it holds
  ``max(1, round(F * skeleton length))`` pixels (``F`` default 0.5), then
  thickened by ``W // 2`` steps of 3x3 dilation inside the region (``W``
  default 1: one pixel wide).

* ``boxes[:min_area=A]``: weak labels, no labeled pixel (the sparse map is
  all 255): one box per 8-connected region of each class with at least
  ``A`` (default 1) pixels, the region's bounding box, and the image's tags;
  a converter may name a background class, which gets no box
  (``weak_labels``).
* ``tags``: weak labels, no labeled pixel: the image's tags (the classes with
  at least one pixel), no box.

Randomness comes from ``image_rng(seed, image_id)``, a generator seeded by
``(seed, sha256(image_id))``, so labels do not depend on worker order.

Command line: generate sparse PNGs for a folder of dense PNGs, print
statistics and optionally write overlays::

  python -m data_prep.sparse_labels --dense_dir=labels --void_value=11 \
      --num_classes=11 --spec=clicks:20 --seed=0 --output_dir=/tmp/clicks20 \
      --image_dir=images --overlays=5
"""

import argparse
import collections
import dataclasses
import hashlib
import io
import os
import sys
import time

import numpy as np
from PIL import Image
from scipy import ndimage
import tqdm

from agmm_jax.data import labels
from agmm_jax.evaluation import visualize

STORED_UNLABELED = labels.STORED_UNLABELED
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_KINDS = ('points', 'clicks', 'scribbles', 'boxes', 'tags')
# Kinds that label no pixel: their labels are the record's tags and boxes.
WEAK_KINDS = ('boxes', 'tags')


@dataclasses.dataclass(frozen=True)
class SparseSpec:
  """A parsed generator spec (see the module docstring for the meaning)."""
  kind: str
  count: int = 1          # points per region / clicks per image
  fraction: float = 0.5   # scribbles: fraction of the skeleton length
  margin: int = 0         # points: erosion before sampling
  erode: int = 2          # scribbles: erosion before thinning
  min_area: int = 1       # points / scribbles: smallest region considered
  width: int = 1          # scribbles: thickness in pixels

  @property
  def weak(self) -> bool:
    """Tags and boxes instead of labeled pixels."""
    return self.kind in WEAK_KINDS

  def to_dict(self) -> dict:
    settings = {'kind': self.kind, 'spec': str(self)}
    if self.kind == 'tags':
      return settings
    if self.kind == 'boxes':
      settings.update(min_area=self.min_area)
    elif self.kind == 'points':
      settings.update(count=self.count, margin=self.margin,
                      min_area=self.min_area)
    elif self.kind == 'clicks':
      settings.update(count=self.count)
    else:
      settings.update(fraction=self.fraction, erode=self.erode,
                      min_area=self.min_area, width=self.width)
    return settings

  def __str__(self) -> str:
    if self.kind == 'points':
      return (f'points:{self.count}:margin={self.margin}:'
              f'min_area={self.min_area}')
    if self.kind == 'clicks':
      return f'clicks:{self.count}'
    if self.kind == 'boxes':
      return f'boxes:min_area={self.min_area}'
    if self.kind == 'tags':
      return 'tags'
    return (f'scribbles:{self.fraction:g}:erode={self.erode}:'
            f'min_area={self.min_area}:width={self.width}')


def parse_spec(spec: str) -> SparseSpec:
  """Parses 'clicks:20', 'points:1:margin=5', 'scribbles:0.3:erode=3', ...

  Raises:
    ValueError: naming the spec, for an unknown kind, option or bad value.
  """
  parts = [p.strip() for p in spec.strip().split(':')]
  kind = parts[0]
  if kind not in _KINDS:
    raise ValueError(f'sparse spec {spec!r}: kind must be one of {_KINDS}')
  allowed = {'points': {'margin', 'min_area'}, 'clicks': set(),
             'scribbles': {'erode', 'min_area', 'width'},
             'boxes': {'min_area'}, 'tags': set()}[kind]
  values = {}
  positional = [p for p in parts[1:] if '=' not in p]
  if positional and kind in WEAK_KINDS:
    raise ValueError(f'sparse spec {spec!r}: {kind} takes no positional value')
  if len(positional) > 1:
    raise ValueError(f'sparse spec {spec!r}: at most one positional value')
  try:
    if positional:
      if kind == 'scribbles':
        values['fraction'] = float(positional[0])
      else:
        values['count'] = int(positional[0])
    for part in parts[1:]:
      if '=' not in part:
        continue
      key, value = part.split('=', 1)
      if key not in allowed:
        raise ValueError(f'sparse spec {spec!r}: unknown option {key!r} for '
                         f'{kind} (allowed: {sorted(allowed)})')
      values[key] = int(value)
  except ValueError as e:
    if 'sparse spec' in str(e):
      raise
    raise ValueError(f'sparse spec {spec!r}: {e}') from e
  if kind == 'clicks' and 'count' not in values:
    raise ValueError(f'sparse spec {spec!r}: clicks needs a count, e.g. '
                     'clicks:20')
  parsed = SparseSpec(kind=kind, **values)
  if parsed.count < 1 or parsed.min_area < 1 or parsed.width < 1:
    raise ValueError(f'sparse spec {spec!r}: count, min_area and width must '
                     'be >= 1')
  if parsed.margin < 0 or parsed.erode < 0:
    raise ValueError(f'sparse spec {spec!r}: margin and erode must be >= 0')
  if not 0.0 < parsed.fraction <= 1.0:
    raise ValueError(f'sparse spec {spec!r}: fraction must be in (0, 1]')
  return parsed


def image_rng(seed: int, image_id: str) -> np.random.Generator:
  """A generator that depends only on ``seed`` and the image id."""
  digest = hashlib.sha256(image_id.encode('utf-8')).digest()
  return np.random.default_rng(
      [int(seed), int.from_bytes(digest[:8], 'little')])


def _regions(dense: np.ndarray, min_area: int):
  """Yields ``(class_id, slices, mask)`` of 8-connected class regions."""
  for class_id in np.unique(dense).tolist():
    if class_id == STORED_UNLABELED:
      continue
    components, _ = ndimage.label(dense == class_id, structure=_EIGHT_CONNECTED)
    for index, slices in enumerate(ndimage.find_objects(components), start=1):
      if slices is None:
        continue
      region = components[slices] == index
      if int(region.sum()) >= min_area:
        yield class_id, slices, region


def _eroded_or_region(region: np.ndarray, iterations: int) -> np.ndarray:
  if iterations <= 0:
    return region
  # Pad so that erosion measures distance to the region border only; the
  # image border counts as a border too because the pad is background.
  padded = np.pad(region, iterations)
  eroded = ndimage.binary_erosion(padded, iterations=iterations)
  eroded = eroded[iterations:-iterations, iterations:-iterations]
  return eroded if eroded.any() else region


def _points(dense: np.ndarray, spec: SparseSpec,
            rng: np.random.Generator) -> np.ndarray:
  sparse = np.full_like(dense, STORED_UNLABELED)
  for class_id, slices, region in _regions(dense, spec.min_area):
    candidates = np.flatnonzero(_eroded_or_region(region, spec.margin))
    chosen = rng.choice(candidates, size=min(spec.count, candidates.size),
                        replace=False)
    rows, cols = np.unravel_index(chosen, region.shape)
    sparse[slices][rows, cols] = class_id
  return sparse


def _clicks(dense: np.ndarray, spec: SparseSpec,
            rng: np.random.Generator) -> np.ndarray:
  sparse = np.full_like(dense, STORED_UNLABELED)
  candidates = np.flatnonzero(dense != STORED_UNLABELED)
  chosen = rng.choice(candidates, size=min(spec.count, candidates.size),
                      replace=False)
  sparse.reshape(-1)[chosen] = dense.reshape(-1)[chosen]
  return sparse


def thin(mask: np.ndarray) -> np.ndarray:
  """Zhang-Suen thinning of a boolean mask ``[H, W]`` to 1-pixel skeletons.

  Each sub-iteration deletes, in parallel, foreground pixels ``P1`` with
  neighbours ``P2..P9`` (clockwise from north) such that
  ``2 <= B(P1) <= 6`` (foreground neighbours), ``A(P1) == 1`` (0->1
  transitions around the ring), and ``P2*P4*P6 == P4*P6*P8 == 0`` (first) or
  ``P2*P4*P8 == P2*P6*P8 == 0`` (second), until nothing changes. It keeps
  8-connectivity, so one region gives one skeleton.
  """
  image = np.pad(mask.astype(bool), 1)
  while True:
    changed = False
    for second in (False, True):
      c = image[1:-1, 1:-1]
      p2, p3, p4 = image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:]
      p5, p6, p7 = image[2:, 2:], image[2:, 1:-1], image[2:, :-2]
      p8, p9 = image[1:-1, :-2], image[:-2, :-2]
      ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
      neighbours = sum(p.astype(np.int8) for p in ring[:-1])
      transitions = sum((~a & b).astype(np.int8)
                        for a, b in zip(ring[:-1], ring[1:]))
      if second:
        side = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
      else:
        side = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
      delete = (c & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1)
                & side)
      if delete.any():
        image[1:-1, 1:-1] = c & ~delete
        changed = True
    if not changed:
      return image[1:-1, 1:-1]


def _skeleton_piece(skeleton: np.ndarray, length: int,
                    rng: np.random.Generator) -> np.ndarray:
  """``length`` connected skeleton pixels grown by BFS (8-neighbours)."""
  rows, cols = np.nonzero(skeleton)
  start = int(rng.integers(rows.size))
  on_skeleton = set(zip(rows.tolist(), cols.tolist()))
  queue = collections.deque([(int(rows[start]), int(cols[start]))])
  seen = {queue[0]}
  piece = np.zeros_like(skeleton)
  taken = 0
  while queue and taken < length:
    r, c = queue.popleft()
    piece[r, c] = True
    taken += 1
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        neighbour = (r + dr, c + dc)
        if neighbour in on_skeleton and neighbour not in seen:
          seen.add(neighbour)
          queue.append(neighbour)
  return piece


def _scribbles(dense: np.ndarray, spec: SparseSpec,
               rng: np.random.Generator) -> np.ndarray:
  sparse = np.full_like(dense, STORED_UNLABELED)
  for class_id, slices, region in _regions(dense, spec.min_area):
    core = _eroded_or_region(region, spec.erode)
    skeleton = thin(core)
    # Zhang-Suen removes some tiny shapes (a 2x2 block) completely.
    if not skeleton.any():
      skeleton = core
    length = max(1, int(round(spec.fraction * int(skeleton.sum()))))
    scribble = _skeleton_piece(skeleton, length, rng)
    if spec.width > 1:
      scribble = ndimage.binary_dilation(
          scribble, structure=_EIGHT_CONNECTED, iterations=spec.width // 2
      ) & region
    sparse[slices][scribble] = class_id
  return sparse


def _no_pixels(dense: np.ndarray, spec: SparseSpec,
               rng: np.random.Generator) -> np.ndarray:
  """Weak kinds: no labeled pixel (their labels are ``weak_labels``)."""
  del spec, rng
  return np.full_like(dense, STORED_UNLABELED)


_GENERATORS = {'points': _points, 'clicks': _clicks, 'scribbles': _scribbles,
               'boxes': _no_pixels, 'tags': _no_pixels}


def image_tags(dense: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 ``[K]``: 1 for each class with at least one pixel."""
  counts = np.bincount(dense[dense != STORED_UNLABELED].ravel(),
                       minlength=num_classes)
  return (counts[:num_classes] > 0).astype(np.float32)


def region_boxes(dense: np.ndarray, min_area: int,
                 background: int | None = None) -> np.ndarray:
  """int32 ``[n, 5]`` ``(class, y0, x0, y1, x1)``, half open: the bounding
  box of each 8-connected region of each class (``background`` excepted)
  with at least ``min_area`` pixels, by class, then in ``ndimage.label``'s
  order (raster order of each region's first pixel)."""
  boxes = [(class_id, s[0].start, s[1].start, s[0].stop, s[1].stop)
           for class_id, s, _ in _regions(dense, min_area)
           if class_id != background]
  return np.asarray(boxes, np.int32).reshape(-1, 5)


def weak_labels(dense: np.ndarray, spec: SparseSpec | str, *,
                num_classes: int, background: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(tags [K], boxes [n, 5])`` of a weak spec from stored dense labels
  (no randomness: the regions decide); ``tags`` has no box."""
  if isinstance(spec, str):
    spec = parse_spec(spec)
  if not spec.weak:
    raise ValueError(f'sparse spec {spec}: not a weak kind {WEAK_KINDS}')
  dense = np.asarray(dense, np.uint8)
  boxes = (region_boxes(dense, spec.min_area, background)
           if spec.kind == 'boxes' else np.zeros((0, 5), np.int32))
  return image_tags(dense, num_classes), boxes


def generate(dense: np.ndarray, spec: SparseSpec | str, *, seed: int,
             image_id: str) -> np.ndarray:
  """Sparse labels for one image.

  Args:
    dense: uint8 ``[H, W]`` stored dense labels (class ids, 255 void).
    spec: a ``SparseSpec`` or a spec string.
    seed: the generator seed (>= 0).
    image_id: the image's id; with ``seed`` it fixes the random choices.

  Returns:
    uint8 ``[H, W]``: ``dense`` on the chosen pixels, 255 elsewhere.
  """
  if isinstance(spec, str):
    spec = parse_spec(spec)
  dense = np.asarray(dense, np.uint8)
  sparse = _GENERATORS[spec.kind](dense, spec, image_rng(seed, image_id))
  labeled = sparse != STORED_UNLABELED
  # The generators are built so this holds; checked because a wrong training
  # label would silently bias every experiment.
  assert np.array_equal(sparse[labeled], dense[labeled]), 'label mismatch'
  return sparse


def overlay(image: np.ndarray, sparse: np.ndarray) -> np.ndarray:
  """Visual check: labeled pixels in class colours on a dimmed image.

  Args:
    image: uint8 ``[H, W, 3]``.
    sparse: uint8 ``[H, W]`` stored sparse labels.

  Returns:
    uint8 ``[H, W, 3]``; each label is drawn as a 3x3 dot (display only).
  """
  palette = visualize.palette()
  canvas = (image.astype(np.float32) * 0.5).astype(np.uint8)
  # Colour of class c is palette[c + 1] (palette[0] is black); grey dilation
  # grows each label to a 3x3 dot, the larger id winning where dots touch.
  ids = np.where(sparse != STORED_UNLABELED, sparse.astype(np.int32) + 1, 0)
  grown = ndimage.grey_dilation(ids, size=(3, 3))
  show = grown > 0
  canvas[show] = palette[grown[show]]
  return canvas


def png_bytes(array: np.ndarray) -> bytes:
  """PNG encoding of a uint8 ``[H, W]`` or ``[H, W, 3]`` array."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG')
  return buffer.getvalue()


@dataclasses.dataclass
class SparseStats:
  """Accumulates labeled-pixel statistics over images."""
  num_classes: int
  images: int = 0
  pixels: int = 0
  labeled_pixels: int = 0
  class_pixels: np.ndarray | None = None      # [K] labeled pixels per class
  present_pairs: int = 0                      # (image, class) in dense labels
  covered_pairs: int = 0                      # ... with >= 1 sparse label

  def __post_init__(self):
    if self.class_pixels is None:
      self.class_pixels = np.zeros(self.num_classes, np.int64)

  def add(self, sparse: np.ndarray, dense: np.ndarray | None) -> None:
    labeled = sparse[sparse != STORED_UNLABELED]
    self.images += 1
    self.pixels += sparse.size
    self.labeled_pixels += labeled.size
    self.class_pixels += np.bincount(labeled, minlength=self.num_classes)[
        :self.num_classes]
    if dense is not None:
      present = set(np.unique(dense).tolist()) - {STORED_UNLABELED}
      self.present_pairs += len(present)
      self.covered_pairs += len(present & set(np.unique(labeled).tolist()))

  def merge(self, other: 'SparseStats') -> None:
    self.images += other.images
    self.pixels += other.pixels
    self.labeled_pixels += other.labeled_pixels
    self.class_pixels += other.class_pixels
    self.present_pairs += other.present_pairs
    self.covered_pairs += other.covered_pairs

  def to_dict(self) -> dict:
    stats = {
        'images': self.images,
        'labeled_pixels': self.labeled_pixels,
        'labeled_fraction': self.labeled_pixels / max(self.pixels, 1),
        'labeled_pixels_per_image': self.labeled_pixels / max(self.images, 1),
        'labeled_pixels_per_class': self.class_pixels.tolist(),
        'classes_covered': int((self.class_pixels > 0).sum()),
    }
    if self.present_pairs:
      stats['image_class_coverage'] = self.covered_pairs / self.present_pairs
    return stats


def format_stats(stats: dict) -> str:
  line = (f'{stats["images"]} images, labeled fraction '
          f'{stats["labeled_fraction"]:.5f} '
          f'({stats["labeled_pixels_per_image"]:.1f} px/image), '
          f'classes covered {stats["classes_covered"]}')
  if 'image_class_coverage' in stats:
    line += (f', (image, class) pairs covered '
             f'{100 * stats["image_class_coverage"]:.1f}%')
  return line


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.sparse_labels',
      description='Generate sparse label PNGs (255 = unlabeled) from dense '
      'label PNGs.')
  parser.add_argument('--dense_dir', required=True,
                      help='folder of single-channel dense label PNGs')
  parser.add_argument('--num_classes', type=int, required=True)
  parser.add_argument('--void_value', type=int, default=255,
                      help='dense value for void pixels (never labeled)')
  parser.add_argument('--spec', required=True,
                      help="e.g. 'clicks:20', 'points:1:margin=5', "
                      "'scribbles:0.3'")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--image_dir', default='',
                      help='images (NAME.jpg/.png) for --overlays')
  parser.add_argument('--overlays', type=int, default=0,
                      help='write this many overlay PNGs to OUTPUT/overlays')
  args = parser.parse_args(argv)
  spec = parse_spec(args.spec)
  if spec.weak:
    parser.error(f'--spec={args.spec}: tags and boxes are not label maps; the '
                 'converters store them in the records (e.g. python -m '
                 'data_prep.folder --sparse=boxes)')
  names = sorted(n for n in os.listdir(args.dense_dir) if n.endswith('.png'))
  if not names:
    print(f'{args.dense_dir}: no .png files', file=sys.stderr)
    return 1
  os.makedirs(args.output_dir, exist_ok=True)
  stats = SparseStats(args.num_classes)
  problems = []
  start = time.perf_counter()
  for position, name in enumerate(tqdm.tqdm(names, desc='sparse labels')):
    path = os.path.join(args.dense_dir, name)
    raw = np.asarray(Image.open(path))
    dense = raw.astype(np.uint8)
    void = raw == args.void_value
    bad = (raw >= args.num_classes) & ~void
    if raw.ndim != 2 or bad.any():
      problems.append(f'{path}: values outside 0..{args.num_classes - 1} and '
                      f'void {args.void_value}')
      continue
    dense[void] = STORED_UNLABELED
    image_id = os.path.splitext(name)[0]
    sparse = generate(dense, spec, seed=args.seed, image_id=image_id)
    stats.add(sparse, dense)
    Image.fromarray(sparse).save(os.path.join(args.output_dir, name))
    if position < args.overlays and args.image_dir:
      for extension in ('.jpg', '.jpeg', '.png'):
        image_path = os.path.join(args.image_dir, image_id + extension)
        if os.path.exists(image_path):
          os.makedirs(os.path.join(args.output_dir, 'overlays'), exist_ok=True)
          image = np.asarray(Image.open(image_path).convert('RGB'))
          Image.fromarray(overlay(image, sparse)).save(
              os.path.join(args.output_dir, 'overlays', image_id + '.png'))
          break
  for problem in problems:
    print(problem, file=sys.stderr)
  print(f'{spec}, seed {args.seed}: {format_stats(stats.to_dict())}; '
        f'{time.perf_counter() - start:.1f} s')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
