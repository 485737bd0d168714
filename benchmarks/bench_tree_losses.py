"""Benchmark of the tree methods' losses (forward + backward); prints figures.

Usage (from the repository root):

    python benchmarks/bench_tree_losses.py [--runs 5] [--tree_stride 4]

VOC shapes (batch 4, 21 classes, 321 x 321 labels, decoder features and the
TEL embedding 81 x 81 x 256, the batch of ``bench_losses.sparse_batch`` plus a
random image): compile time and median wall time of jit(value_and_grad) of
the ``tel`` and ``apro`` terms alone and of the ``tel`` and ``apro`` presets
(with pCE), with respect to the logits (and the embedding for TEL); calls
alternate between the programs so that background load hits all alike.
"""

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import tel  # pylint: disable=g-import-not-at-top
from benchmarks import bench_losses  # pylint: disable=g-import-not-at-top
from configs import presets  # pylint: disable=g-import-not-at-top


def value_and_grad(loss_config):
  """jit(value_and_grad) of the loss total w.r.t. logits and embedding."""
  loss_fn = methods.build_loss(loss_config)

  def total(logits, embedding, inputs):
    return loss_fn(inputs._replace(
        logits=logits, outputs={tel.EMBEDDING_HEAD: embedding}))[0]

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--tree_stride', type=int, default=tel.TREE_STRIDE)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  inputs = bench_losses.sparse_batch(rng, 4, 321, 81, 256, 21)
  inputs = inputs._replace(
      image=jnp.asarray(rng.normal(size=(4, 321, 321, 3)), jnp.float32),
      outputs={tel.EMBEDDING_HEAD: jnp.asarray(
          np.maximum(rng.normal(size=(4, 81, 81, tel.EMBEDDING_CHANNELS)), 0), jnp.float32)})
  programs = {}
  for name, weights in (('tel term', {'tel': 1.0}), ('apro term', {'apro': 1.0}),
                        ('tel preset (pce + 0.4 tel)', None),
                        ('apro preset (pce + 0.4 apro)', None)):
    config = (methods.loss_config(weights) if weights
              else presets.preset(name.split()[0]))
    config.tree_stride = args.tree_stride
    fn = value_and_grad(config)
    call_args = (inputs.logits, inputs.outputs[tel.EMBEDDING_HEAD], inputs)
    start = time.perf_counter()
    jax.block_until_ready(fn(*call_args))
    print(f'{name}: compile + first call {time.perf_counter() - start:.1f} s', flush=True)
    programs[name] = fn
  times = bench_losses.time_interleaved(programs, call_args, args.runs)
  grid = (321 - 1) // args.tree_stride + 1
  print(f'\nforward + backward, batch 4 x 321, 21 classes, tree grid {grid} x {grid}, '
        f'median of {args.runs}:')
  for name, seconds in times.items():
    print(f'  {name}: {seconds:.3f} s')


if __name__ == '__main__':
  main()
