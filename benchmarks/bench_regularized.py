"""Forward + backward time of the regularized-loss terms at VOC shapes.

Each term through ``methods.build_loss`` (its preset weight, default options
unless a cell variant is named), jitted ``value_and_grad`` with respect to the
logits; batch 4, 21 classes, 321x321 labels, a smooth random image and
random logits. Reports compile time and the mean of ``--repeats`` runs.

``--camvid``: instead, the relative error of the densecrf and ncut values and
gradients (grid cells vs the exact product) on 321x321 crops of CamVid
training photos with a smoothed label softmax (11 classes), rloss defaults.

Usage::

  python -m benchmarks.bench_regularized [--batch 4] [--size 321]
      [--classes 21] [--repeats 3] [--only SUBSTRING] [--camvid]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from agmm_jax.data import augment
from agmm_jax import methods
from agmm_jax.methods import regularized
from benchmarks.camvid_data import CAMVID_CLASSES, CAMVID_TRAIN

# (label, weights, overrides)
CASES = (
    ('densecrf (cells 0.5/0.8)', {'densecrf': regularized.DENSECRF_WEIGHT}, {}),
    ('densecrf (cells 1.0/1.0)', {'densecrf': regularized.DENSECRF_WEIGHT},
     {'densecrf': {'cell_xy': 1.0, 'cell_rgb': 1.0}}),
    ('ncut (cells 0.5/0.8)', {'ncut': 1.0}, {}),
    ('gatedcrf (stride 4)', {'gatedcrf': 0.1}, {}),
    ('entropy', {'entropy': 1.0}, {}),
    ('pce (for scale)', {'pce': 1.0}, {}),
    # Soft self-labeling: the solver's 20 steps (each one energy + gradient
    # of the relaxation) and the network term; pCE is not included.
    ('soft_self_labeling (default)', {'soft_self_labeling': 1.0}, {}),
    ('soft_self_labeling grid8', {'soft_self_labeling': 1.0},
     {'soft_self_labeling': {'neighbourhood': 'grid8'}}),
    ('soft_self_labeling dense', {'soft_self_labeling': 1.0},
     {'soft_self_labeling': {'neighbourhood': 'dense', 'potts': 'quadratic',
                             'sigma_xy': 50.0}}),
)


def _inputs(batch, size, classes):
  rng = np.random.default_rng(0)
  coarse = rng.uniform(0, 255, (batch, 6, 6, 3)).astype(np.float32)
  rgb = jax.image.resize(jnp.asarray(coarse), (batch, size, size, 3), 'linear')
  rgb = np.clip(np.asarray(rgb) + rng.normal(0, 4, rgb.shape), 0, 255)
  label = np.full((batch, size, size), -1, np.int32)
  label[:, ::40, ::40] = rng.integers(0, classes, label[:, ::40, ::40].shape)
  label[:, :, size - 30:] = -2  # crop padding
  return methods.LossInputs(
      logits=jnp.asarray(rng.normal(size=(batch, size, size, classes)),
                         jnp.float32),
      decoder_features=jnp.zeros((batch, -(-size // 4), -(-size // 4), 8)),
      label=jnp.asarray(label), class_present=jnp.ones((batch, classes)),
      image=jnp.asarray(augment.normalize(rgb.astype(np.uint8))))




def _camvid_inputs(batch, size):
  """Top-left crops of every 120th training photo; logits of the smoothed
  one-hot labels plus noise (void: uniform)."""
  names = sorted(os.listdir(os.path.join(CAMVID_TRAIN, 'images')))[::120][:batch]
  rng = np.random.default_rng(0)
  images, logits, labels = [], [], []
  for name in names:
    rgb = np.asarray(Image.open(os.path.join(CAMVID_TRAIN, 'images', name)).convert('RGB'))
    lab = np.asarray(Image.open(os.path.join(CAMVID_TRAIN, 'labels', name[:-4] + '.png')))
    lab = lab[:size, :size]
    onehot = np.eye(CAMVID_CLASSES + 1)[np.minimum(lab, CAMVID_CLASSES)][..., :-1]
    onehot[lab >= CAMVID_CLASSES] = 1.0 / CAMVID_CLASSES
    smooth = 4.0 * ndimage.gaussian_filter(onehot, (2, 2, 0))
    logits.append(smooth + 0.5 * rng.normal(size=smooth.shape))
    images.append(augment.normalize(rgb[:size, :size]))
    labels.append(np.full(lab.shape, -1, np.int32))
  return methods.LossInputs(
      logits=jnp.asarray(np.stack(logits), jnp.float32),
      decoder_features=jnp.zeros((batch, -(-size // 4), -(-size // 4), 8)),
      label=jnp.asarray(np.stack(labels)),
      class_present=jnp.ones((batch, CAMVID_CLASSES)),
      image=jnp.asarray(np.stack(images)))


def camvid_errors(batch, size):
  """Prints the relative errors of the grid terms against the exact ones."""
  inputs = _camvid_inputs(batch, size)
  print(f'CamVid: {batch} crops {size}x{size}, {CAMVID_CLASSES} classes, '
        'rloss defaults (sigma_xy 100 at scale 0.5, sigma_rgb 15)', flush=True)
  for term in ('densecrf', 'ncut'):
    results = {}
    for approx, cells in (('exact', {}), ('grid', {}),
                          ('grid', {'cell_xy': 1.0, 'cell_rgb': 1.0})):
      loss = methods.build_loss(methods.loss_config(
          {term: 1.0}, **{term: {'approx': approx, **cells}}))
      fn = jax.jit(jax.value_and_grad(
          lambda logits, loss=loss: loss(inputs._replace(logits=logits))[0]))
      start = time.perf_counter()
      value, grad = fn(inputs.logits)
      grad = np.asarray(grad)
      label = approx + (' cells ' + '/'.join(str(c) for c in cells.values())
                        if cells else (' cells 0.5/0.8' if approx == 'grid' else ''))
      results[label] = (float(value), grad, time.perf_counter() - start)
    value0, grad0, seconds0 = results.pop('exact')
    print(f'{term:9s} exact              value {value0:.5g}  (first call '
          f'{seconds0:.1f} s)', flush=True)
    for label, (value, grad, seconds) in results.items():
      print(f'{term:9s} {label:18s} value rel err '
            f'{abs(value / value0 - 1):.4f}  gradient rel err '
            f'{np.linalg.norm(grad - grad0) / np.linalg.norm(grad0):.4f}  '
            f'(first call {seconds:.1f} s)', flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=321)
  parser.add_argument('--classes', type=int, default=21)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', default='',
                      help='run the cases whose label contains this')
  parser.add_argument('--camvid', action='store_true')
  args = parser.parse_args()
  if args.camvid:
    camvid_errors(args.batch, args.size)
    return
  inputs = _inputs(args.batch, args.size, args.classes)
  print(f'batch {args.batch}, {args.classes} classes, {args.size}x{args.size}; '
        f'{jax.devices()[0].device_kind}', flush=True)
  for label, weights, overrides in CASES:
    if args.only not in label:
      continue
    loss = methods.build_loss(methods.loss_config(weights, **overrides))
    fn = jax.jit(jax.value_and_grad(
        lambda logits, loss=loss: loss(inputs._replace(logits=logits))[0]))
    start = time.perf_counter()
    value, grad = fn(inputs.logits)
    grad.block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.repeats):
      fn(inputs.logits)[1].block_until_ready()
    run_s = (time.perf_counter() - start) / args.repeats
    print(f'{label:26s} value {float(value):12.5g}  compile {compile_s:6.1f} s  '
          f'fwd+bwd {run_s * 1e3:8.0f} ms', flush=True)


if __name__ == '__main__':
  main()
