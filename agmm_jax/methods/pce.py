"""Partial cross-entropy and the absent-class term.

* ``pce``: cross-entropy over the labeled pixels only, the baseline of every
  sparse-label method (``mean_{x labeled} -log p_{y(x)}(x)``);
* ``absent_class``: pushes down the classes absent from the image's sparse
  labels (``mean_{x real} sum_k -(1 - c_k) log(1 - p_k(x) + 1e-6)``, AGMM's
  ``get_cls_loss``).

Both are computed by the row-chunk loops of :mod:`agmm_jax.methods.label_grid`
(with AGMM's GMM term in the same pass when it is active, through the ``agmm``
group of :mod:`agmm_jax.methods.agmm`).
"""

import jax

from agmm_jax.methods import core
from agmm_jax.methods import label_grid


@core.register_term('pce', check=label_grid.check_rows_per_chunk,
                    shared=('rows_per_chunk',))
def partial_cross_entropy(inputs: core.LossInputs, *,
                          rows_per_chunk: int = label_grid.ROWS_PER_CHUNK) -> jax.Array:
  """Cross-entropy over labeled pixels only (:func:`label_grid.label_grid_losses`)."""
  return label_grid.label_grid_losses(inputs, ('pce',), rows_per_chunk=rows_per_chunk)['pce']


@core.register_term('absent_class', check=label_grid.check_rows_per_chunk,
                    shared=('rows_per_chunk',))
def absent_class_loss(inputs: core.LossInputs, *,
                      rows_per_chunk: int = label_grid.ROWS_PER_CHUNK) -> jax.Array:
  """``-log(1 - p_k)`` summed over the classes absent before cropping,
  averaged over real pixels (:func:`label_grid.label_grid_losses`)."""
  return label_grid.label_grid_losses(
      inputs, ('absent_class',), rows_per_chunk=rows_per_chunk)['absent_class']
