"""Benchmark of the SPML loss (forward + backward) and of its
oversegmentation field; prints figures.

Usage (from the repository root):

    python benchmarks/bench_spml.py [--runs 3] [--model_depth 101] [--skip_model]
        [--pseudo_labels_only]

1. The ``spml_regions`` field (Felzenszwalb, agmm_jax.methods.spml.oversegment)
   on 321 x 321 center crops of CamVid train images: milliseconds per crop on
   the segment grid (what the pipeline computes) and, for comparison, on the
   full crop (what a conversion-time map would cost before augmentation), and
   the number of regions.
2. VOC shapes (batch 4, 21 classes, 321 x 321 labels with ~2% labeled pixels,
   the 81 x 81 x 64 embedding, the CamVid regions of step 1, a full memory
   bank of 2 batches): compile time, median wall time and memory of
   jit(value_and_grad) of the ``spml`` term alone with respect to the
   embedding, and the number of segments per image (of the 256 slots).
3. Unless ``--skip_model``: a forward + backward of DeepLabV3+ ResNet-101
   output stride 8 at the same batch with ``pce_only``
   (``bench_losses.bench_model_step``), and the share of it the SPML term
   would add.
4. The second stage's pseudo-labels (``spml_walk.pseudo_labels``: the random walk
   on every 8th pixel and the resize back, without the network) at the
   CamVid study's CPU shapes (batch 8, 180 x 240, 11 classes) and VOC's
   largest canvas (batch 1, 500 x 500, 21 classes): compile time and median
   wall time per batch. Only this with ``--pseudo_labels_only``.
"""

import argparse
import functools
import glob
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from skimage import segmentation  # pylint: disable=g-import-not-at-top

from agmm_jax.data import augment  # pylint: disable=g-import-not-at-top
from agmm_jax.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import spml  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import spml_walk  # pylint: disable=g-import-not-at-top
from benchmarks import bench_losses  # pylint: disable=g-import-not-at-top

CAMVID_IMAGES = os.path.join(REPO_ROOT, '..', 'shared', 'datasets', 'camvid', 'train', 'images')
CROP = 321
# Clicks per image of the segment-count figure (VOC points: a few per image).
CLICKS = 20


def camvid_crops(count):
  """``count`` normalized 321 x 321 center crops of CamVid train images."""
  crops = []
  for path in sorted(glob.glob(os.path.join(CAMVID_IMAGES, '*')))[:count]:
    rgb = np.asarray(Image.open(path).convert('RGB'))
    top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
    crops.append(augment.normalize(rgb[top:top + CROP, left:left + CROP]))
  if len(crops) < count:
    raise SystemExit(f'{CAMVID_IMAGES}: {len(crops)} images, need {count}')
  return crops


def clicks(rng, label):
  """``label`` with only ``CLICKS`` labeled pixels per image (its classes at
  random labeled positions), padding kept."""
  label = np.asarray(label)
  out = np.where(label == labels_lib.PADDING, labels_lib.PADDING, labels_lib.UNLABELED)
  for b in range(label.shape[0]):
    ys, xs = np.nonzero(label[b] >= 0)
    pick = rng.choice(len(ys), CLICKS, replace=False)
    out[b, ys[pick], xs[pick]] = label[b, ys[pick], xs[pick]]
  return out.astype(np.int32)


def bench_regions(crops):
  """Per-crop cost of the field on the grid and on the full crop."""
  spml.oversegment({'image': crops[0]})  # warm-up: scikit-image's lazy imports
  start = time.perf_counter()
  regions = [spml.oversegment({'image': crop}) for crop in crops]
  grid_ms = (time.perf_counter() - start) / len(crops) * 1e3
  start = time.perf_counter()
  for crop in crops:
    rgb = np.clip(np.round(crop * (255.0 * augment.IMAGENET_STD)
                           + 255.0 * augment.IMAGENET_MEAN), 0, 255).astype(np.uint8)
    segmentation.felzenszwalb(rgb, scale=spml.FELZENSZWALB_SCALE,
                              sigma=spml.FELZENSZWALB_SIGMA, min_size=16 * spml.FELZENSZWALB_MIN_SIZE)
  full_ms = (time.perf_counter() - start) / len(crops) * 1e3
  counts = [r.max() + 1 for r in regions]
  print(f'spml_regions field: {grid_ms:.1f} ms per crop on the {regions[0].shape[0]}^2 grid, '
        f'{full_ms:.0f} ms on the full {CROP}^2 crop; regions per crop median '
        f'{np.median(counts):.0f} (range {min(counts)}-{max(counts)})', flush=True)
  return np.stack(regions)


def bench_pseudo_labels(rng, runs):
  """Seconds per batch of ``spml_walk.pseudo_labels`` at the study's and VOC's
  shapes (smooth random embeddings, random softmax, clicks)."""
  for name, batch, height, width, num_classes in (('CamVid CPU', 8, 180, 240, 11),
                                                   ('VOC canvas', 1, 500, 500, 21)):
    grid = (spml.grid_size(height), spml.grid_size(width))
    coarse = jnp.asarray(rng.normal(size=(batch, 9, 9, spml.EMBEDDING_DIM)), jnp.float32)
    embedding = jax.image.resize(coarse, (batch, *grid, spml.EMBEDDING_DIM), 'bilinear')
    logits = jnp.asarray(rng.normal(size=(batch, height, width, num_classes)), jnp.float32)
    label = clicks(rng, rng.integers(0, num_classes, (batch, height, width)))
    args = (embedding, jax.nn.softmax(logits, axis=-1), jnp.asarray(label))
    start = time.perf_counter()
    compiled = jax.jit(spml_walk.pseudo_labels).lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds = bench_losses.time_calls(compiled, args, runs)
    points = ((height - 1) // spml.WALK_STRIDE + 1) * ((width - 1) // spml.WALK_STRIDE + 1)
    print(f'pseudo-labels, {name}: batch {batch} x {height} x {width}, {points} walked '
          f'pixels per image: compile {compile_s:.1f} s, median of {runs} '
          f'{seconds:.3f} s per batch', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--model_runs', type=int, default=1)
  parser.add_argument('--model_depth', type=int, default=101)
  parser.add_argument('--max_step_memory_gb', type=float, default=12.0)
  parser.add_argument('--skip_model', action='store_true')
  parser.add_argument('--pseudo_labels_only', action='store_true')
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, '
        f'load average {os.getloadavg()[0]:.1f} (timings scale with other load)', flush=True)
  bench_pseudo_labels(np.random.default_rng(1), args.runs)
  if args.pseudo_labels_only:
    return
  batch = 4
  regions = bench_regions(camvid_crops(2 * batch))
  rng = np.random.default_rng(0)
  inputs = bench_losses.sparse_batch(rng, batch, CROP, spml.grid_size(CROP), 256, 21)
  grid = spml.grid_size(CROP)
  # A spatially smooth embedding (random 9 x 9 fields upsampled), as a
  # network's; pixel-wise noise would scatter the K-means clusters.
  coarse = jnp.asarray(rng.normal(size=(batch, 9, 9, spml.EMBEDDING_DIM)), jnp.float32)
  embedding = jax.image.resize(coarse, (batch, grid, grid, spml.EMBEDDING_DIM), 'bilinear')
  loss = methods.build_loss(methods.loss_config({'spml': 1.0}))
  state = loss.init_state(batch, 21)
  inputs = inputs._replace(fields={spml.REGIONS_FIELD: jnp.asarray(regions[:batch])})

  def total(embedding, inputs, state):
    outputs = {spml.EMBEDDING_HEAD: spml.normalize(embedding)}
    value, _, new_state = loss.apply(inputs._replace(outputs=outputs, state=state))
    return value, new_state

  fn = jax.jit(jax.value_and_grad(total, has_aux=True))
  start = time.perf_counter()
  compiled = fn.lower(embedding, inputs, state).compile()
  print(f'spml term, batch {batch} x {CROP}, grid {grid}^2, 64-d, 21 classes: compile '
        f'{time.perf_counter() - start:.1f} s; {bench_losses.memory_line(compiled)}', flush=True)
  # A full memory bank: the state after two steps (on the other CamVid crops).
  other = inputs._replace(fields={spml.REGIONS_FIELD: jnp.asarray(regions[batch:])})
  for step_inputs in (other, inputs):
    (_, state), _ = compiled(embedding, step_inputs, state)
  seconds = bench_losses.time_calls(compiled, (embedding, inputs, state), args.runs)
  used = np.sum(np.asarray(state[spml.MEMORY_STATE]['label'][:, 0]) != spml.EMPTY, axis=-1)
  print(f'  forward+backward median of {args.runs}: {seconds:.3f} s; segments per image '
        f'{used.tolist()} of 256 slots', flush=True)
  segments, _ = jax.jit(jax.vmap(functools.partial(
      spml.image_segments, num_classes=21, clusters_per_axis=6, kmeans_iterations=10,
      max_segments=4096)))(spml.normalize(embedding), inputs.fields[spml.REGIONS_FIELD],
                           spml.grid_labels(inputs.label))
  needed = np.sum(np.asarray(segments.label) != spml.EMPTY, axis=-1)
  print(f'  segments per image without a cap: {needed.tolist()}', flush=True)
  clicked = inputs._replace(label=jnp.asarray(clicks(rng, inputs.label)))
  segments, _ = jax.jit(jax.vmap(functools.partial(
      spml.image_segments, num_classes=21, clusters_per_axis=6, kmeans_iterations=10,
      max_segments=256)))(spml.normalize(embedding), clicked.fields[spml.REGIONS_FIELD],
                          spml.grid_labels(clicked.label))
  used = np.sum(np.asarray(segments.label) != spml.EMPTY, axis=-1)
  real = np.sum(np.asarray(spml.grid_labels(clicked.label)) != spml.EMPTY, axis=(1, 2))
  kept = np.sum(np.asarray(segments.pixel_in_segment), axis=-1) / real
  print(f'  with {CLICKS} clicks per image instead: segments per image {used.tolist()}, '
        f'real grid pixels kept at 256 slots {np.round(kept, 3).tolist()}', flush=True)
  if args.skip_model:
    return
  step = bench_losses.bench_model_step(inputs, args.model_depth, args.model_runs,
                                       args.max_step_memory_gb, step_presets=('pce_only',))
  if step:
    print(f'  spml term / ResNet-{args.model_depth} OS8 pce_only step: '
          f'{seconds / step["pce_only"]:.1%}', flush=True)


if __name__ == '__main__':
  main()
