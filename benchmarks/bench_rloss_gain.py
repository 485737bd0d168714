"""Gain of rloss' permutohedral lattice against the exact Gaussian kernel.

rloss (meng-tang/rloss, ``pytorch/wrapper/bilateralfilter``) computes its
dense CRF loss ``-(weight / N) sum_k S_k^T L S_k`` with ``L S`` the
unnormalized output of Kraehenbuehl's permutohedral lattice on features
``(x / s_xy, y / s_xy, rgb / s_rgb)``. ``L`` approximates ``g W`` with ``W``
the exact Gaussian kernel (diagonal included), so a weight tuned there is
``g`` times ours. This measures ``g = S^T L S / S^T W S`` (``E``: the loss
ratio, the factor our weight needs), ``1^T L 1 / 1^T W 1`` (``D``: degrees)
and the relative gradient mismatch ``|L S - g W S| / |g W S|`` on CamVid
crops rescaled as rloss does (nearest image, scale 0.5, ``s_xy = 100 x 0.5``,
``s_rgb = 15``), ``S`` a smoothed one-hot softmax of the crop's labels
(K = 11), and the same ratio for our bilateral grid (``G``) at the term's
default cells.

The lattice is not part of this repository: build it from an rloss checkout
with a 7-line ``extern "C"`` entry point (docs/benchmarks.md, "Dense CRF loss
weight: rloss' lattice gain"), then::

  python -m benchmarks.bench_rloss_gain --lattice /tmp/rloss_lattice/liblattice.so
      [--crops 8] [--crop 321]
"""

import argparse
import ctypes
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from agmm_jax.methods import bilateral
from agmm_jax.methods import regularized
from benchmarks.camvid_data import CAMVID_CLASSES, CAMVID_TRAIN


def _crops(crop: int, count: int, seed: int = 0):
  """``count`` (rgb 0..255 ``[crop, crop, 3]``, softmax ``[crop, crop, K]``)
  random crops of distinct CamVid training images."""
  rng = np.random.default_rng(seed)
  names = sorted(os.listdir(os.path.join(CAMVID_TRAIN, 'images')))
  for name in rng.choice(names, count, replace=False):
    rgb = np.asarray(Image.open(os.path.join(CAMVID_TRAIN, 'images', name))
                     .convert('RGB'), np.float32)
    lab = np.asarray(Image.open(os.path.join(CAMVID_TRAIN, 'labels',
                                             name[:-4] + '.png')))
    y = rng.integers(0, rgb.shape[0] - crop + 1)
    x = rng.integers(0, rgb.shape[1] - crop + 1)
    rgb, lab = rgb[y:y + crop, x:x + crop], lab[y:y + crop, x:x + crop]
    onehot = np.eye(CAMVID_CLASSES + 1)[np.minimum(lab, CAMVID_CLASSES)]
    onehot = onehot[..., :CAMVID_CLASSES]
    onehot[lab >= CAMVID_CLASSES] = 1.0 / CAMVID_CLASSES
    logits = 4.0 * ndimage.gaussian_filter(onehot, (2, 2, 0))
    yield name, rgb, np.asarray(jax.nn.softmax(
        logits + 0.5 * rng.normal(size=logits.shape)), np.float32)


def _lattice(lib, rgb: np.ndarray, values: np.ndarray, sigma_xy: float,
             sigma_rgb: float) -> np.ndarray:
  """rloss' unnormalized lattice filter of ``values`` ``[h, w, C]``."""
  h, w, c = values.shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  feats = np.concatenate([xx[..., None] / sigma_xy, yy[..., None] / sigma_xy,
                          rgb / sigma_rgb], -1).astype(np.float32)
  feats = np.ascontiguousarray(feats.reshape(h * w, 5))
  inp = np.ascontiguousarray(values.reshape(h * w, c), np.float32)
  out = np.zeros_like(inp)
  ptr = ctypes.POINTER(ctypes.c_float)
  lib.lattice_filter(feats.ctypes.data_as(ptr), 5, h * w,
                     inp.ctypes.data_as(ptr), out.ctypes.data_as(ptr), c)
  return out.reshape(h, w, c)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--lattice', required=True,
                      help='shared library with lattice_filter (docstring)')
  parser.add_argument('--crops', type=int, default=8)
  parser.add_argument('--crop', type=int, default=321)
  args = parser.parse_args()
  lib = ctypes.CDLL(args.lattice)
  scale = regularized.RLOSS_SCALE_FACTOR
  sxy, srgb = regularized.RLOSS_SIGMA_XY * scale, regularized.RLOSS_SIGMA_RGB
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'cores, jax {jax.__version__}; crop {args.crop} scaled by {scale}, '
        f'sigma_xy {sxy} (scaled), sigma_rgb {srgb}, K = {CAMVID_CLASSES}')
  exact = jax.jit(lambda r, v: bilateral.bilateral_exact(
      r, v, sxy, srgb, jnp.ones(r.shape[:3], bool)))
  grid = jax.jit(lambda r, v: bilateral.bilateral_grid(
      r, v, sxy, srgb, jnp.ones(r.shape[:3], bool),
      cell_xy=regularized.CELL_XY, cell_rgb=regularized.CELL_RGB))
  rows = []
  print(f'{"image":24s} {"E=SLS/SWS":>10s} {"D=1L1/1W1":>10s} '
        f'{"grad err":>9s} {"G=SGS/SWS":>10s} {"E/G":>8s}')
  for name, rgb, probs in _crops(args.crop, args.crops):
    # rloss' F.interpolate(scale_factor=0.5): nearest image (source 2i), the
    # softmax bilinear; the ratio is a property of the kernel, so S is built
    # at the scaled size from the nearest-sampled softmax.
    index = np.floor(np.arange(int(args.crop * scale)) / scale).astype(int)
    rgb_s = rgb[index][:, index]
    s = probs[index][:, index]
    values = np.concatenate([s, np.ones(s.shape[:2] + (1,), np.float32)], -1)
    start = time.perf_counter()
    ls = _lattice(lib, rgb_s, values, sxy, srgb)
    t_lattice = time.perf_counter() - start
    ws = np.asarray(exact(jnp.asarray(rgb_s[None]), jnp.asarray(values[None])))[0]
    gs = np.asarray(grid(jnp.asarray(rgb_s[None]), jnp.asarray(values[None])))[0]
    sws = float(np.sum(s * ws[..., :-1]))
    gain = float(np.sum(s * ls[..., :-1])) / sws
    degree = float(ls[..., -1].sum() / ws[..., -1].sum())
    grad = float(np.linalg.norm(ls[..., :-1] - gain * ws[..., :-1])
                 / np.linalg.norm(gain * ws[..., :-1]))
    grid_gain = float(np.sum(s * gs[..., :-1])) / sws
    rows.append((gain, degree, grad, grid_gain))
    print(f'{name:24s} {gain:10.4f} {degree:10.4f} {grad:9.4f} '
          f'{grid_gain:10.4f} {gain / grid_gain:8.4f}   lattice {t_lattice:.2f} s')
  rows = np.asarray(rows)
  for label, column in (('E', rows[:, 0]), ('D', rows[:, 1]),
                        ('grad err', rows[:, 2]), ('G', rows[:, 3]),
                        ('E/G', rows[:, 0] / rows[:, 3])):
    print(f'{label:9s} mean {column.mean():.4f}  std {column.std(ddof=1):.4f}  '
          f'min {column.min():.4f}  max {column.max():.4f}')


if __name__ == '__main__':
  main()
