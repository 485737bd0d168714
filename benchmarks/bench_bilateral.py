"""Accuracy and speed of the bilateral-grid approximation of ``W @ S``.

On CamVid photos (halved to 240x180, top-left crops), against the exact dense
product: relative error of ``sum_k S_k^T W S_k`` and ``|W S - W_exact S| /
|W_exact S|`` with S a smoothed one-hot label softmax (K = 11), and the jitted
forward time after compilation (K = 21).

Usage::

  python -m benchmarks.bench_bilateral [--sizes 81,161] [--batches 1,4]
      [--cells 1.0:1.0,0.5:0.8,0.5:0.6] [--sigma_xy 50] [--sigma_rgb 15]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from agmm_jax.methods import bilateral
from benchmarks.camvid_data import CAMVID_TRAIN

NUM_CLASSES = 11


def _load(size, num_images):
  names = sorted(os.listdir(os.path.join(CAMVID_TRAIN, 'images')))[::120]
  rgbs, probs = [], []
  rng = np.random.default_rng(0)
  for name in names[:num_images]:
    rgb = Image.open(os.path.join(CAMVID_TRAIN, 'images', name)).convert('RGB')
    lab = Image.open(os.path.join(CAMVID_TRAIN, 'labels', name[:-4] + '.png'))
    rgb = np.asarray(rgb.resize((240, 180), Image.BILINEAR), np.float32)
    lab = np.asarray(lab.resize((240, 180), Image.NEAREST))
    onehot = np.eye(NUM_CLASSES + 1)[lab[:size, :size]][..., :NUM_CLASSES]
    onehot[lab[:size, :size] == NUM_CLASSES] = 1.0 / NUM_CLASSES
    logits = 4.0 * ndimage.gaussian_filter(onehot, (2, 2, 0))
    probs.append(jax.nn.softmax(logits + 0.5 * rng.normal(size=logits.shape)))
    rgbs.append(rgb[:size, :size])
  return jnp.asarray(np.stack(rgbs)), jnp.asarray(np.stack(probs), jnp.float32)


def _time(fn, *args, repeats=3):
  fn(*args).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    fn(*args).block_until_ready()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='81,161')
  parser.add_argument('--batches', default='1,4')
  parser.add_argument('--cells', default='1.0:1.0,0.5:0.8,0.5:0.6')
  parser.add_argument('--sigma_xy', type=float, default=50.0)
  parser.add_argument('--sigma_rgb', type=float, default=15.0)
  args = parser.parse_args()
  cells = [tuple(float(c) for c in pair.split(':'))
           for pair in args.cells.split(',')]
  sxy, srgb = args.sigma_xy, args.sigma_rgb
  for size in (int(s) for s in args.sizes.split(',')):
    rgb, probs = _load(size, 2)
    valid = jnp.ones(rgb.shape[:3], bool)
    exact = jax.jit(lambda r, p, v: bilateral.bilateral_exact(
        r, p, sxy, srgb, v))
    ws_exact = np.asarray(exact(rgb, probs, valid))
    energy = np.asarray((probs * ws_exact).sum((1, 2, 3)))
    configs = [('exact', None)] + [('grid', c) for c in cells]
    for name, cell in configs:
      if name == 'exact':
        fn, err_e, err_ws, mem = exact, 0.0, 0.0, 0
      else:
        fn = jax.jit(lambda r, p, v, c=cell: bilateral.bilateral_grid(
            r, p, sxy, srgb, v, cell_xy=c[0], cell_rgb=c[1]))
        ws = np.asarray(fn(rgb, probs, valid))
        err_e = np.abs((np.asarray(probs) * ws).sum((1, 2, 3)) - energy
                       ) / energy
        err_ws = np.linalg.norm((ws - ws_exact).reshape(2, -1), axis=1) / (
            np.linalg.norm(ws_exact.reshape(2, -1), axis=1))
        err_e, err_ws = err_e.max(), err_ws.max()
        spec = bilateral.grid_spec(size, size, sxy, srgb, *cell)
        mem = spec.memory_bytes(1, 21)
      times = []
      for batch in (int(b) for b in args.batches.split(',')):
        rgb_b = jnp.tile(rgb[:1], (batch, 1, 1, 1))
        vals = jnp.tile(jnp.pad(probs[:1], ((0, 0),) * 3 + ((0, 10),)),
                        (batch, 1, 1, 1))
        times.append(_time(fn, rgb_b, vals, jnp.ones(rgb_b.shape[:3], bool)))
      print(f'{size}x{size} {name:5s} cell={cell} grid/img={mem / 2**20:.1f}'
            f'MiB  max rel err E={err_e:.4f} WS={err_ws:.4f}  fwd ms '
            + ' '.join(f'B{b}:{t * 1e3:.1f}' for b, t in
                       zip(args.batches.split(','), times)), flush=True)


if __name__ == '__main__':
  main()
