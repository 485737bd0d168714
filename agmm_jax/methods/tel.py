"""TEL, the tree energy loss (Liang et al., CVPR 2022), as the ``tel`` term.

On the tree grid (below), with ``p = softmax(logits)`` ``[B, h, w, K]``:

* low-level tree: the minimum spanning tree of the RGB image in [0, 1]
  (``rgb / 255``), edge weights ``exp(-||I_u - I_v||^2 / sigma)``; no gradient
  reaches these weights (the image has none);
* high-level tree: the minimum spanning tree of the ``tel_embedding`` head
  (1x1 conv + BatchNorm + ReLU on the decoder features, 256 channels, as
  TEL's ``embedding_layer``), edge weights ``exp(-||e_u - e_v||^2)``, which
  DO receive gradients (into the head); the tree itself is discrete;
* ``AS = F_high(F_low(p))`` with ``F(v)_i = sum_j S_ij v_j / sum_j S_ij`` and
  ``S_ij`` the product of the edge weights on the tree path
  (:func:`spanning_tree.tree_filter`); AS is not detached;
* ``tel = sum_{b, x, k} U(x) |p_k(x) - AS_k(x)| / N_U`` with ``U`` the
  unlabeled real pixels of the grid and ``N_U`` their number over the batch
  (no division when ``N_U = 0``), TEL's ``TreeEnergyLoss``; the preset weighs
  it 0.4 next to pCE, TEL's ``tree_loss.params.weight``.

The tree grid. TEL works at the logits' native resolution (the decoder grid of
its DeepLabV3+, stride 4). Here the logits arrive upsampled to the label
resolution ``H x W`` (align corners) and the loss subsamples them back: the
grid is every ``tree_stride``-th label pixel, ``x[:, ::s, ::s]``, of size
``((H - 1) // s + 1) x ((W - 1) // s + 1)``. With the default ``s = 4`` this is
the decoder grid, and where ``s`` divides ``H - 1`` (321 -> 81) the samples are
exactly the native logits (align-corners upsampling keeps its nodes), so
``softmax`` of them is TEL's ``prob``. The image and the label are sampled at
the same pixels (the label by nearest neighbour, as TEL's mask; TEL resizes
the image bilinearly, which at these ratios is the same kind of point
sampling). The embedding head lives on the decoder grid; where its size
differs from the tree grid (another ``tree_stride``) it is resized there
(align corners, differentiable). An MST over the full 321 x 321 grid would
cost ``16x`` the sequential tree passes for no gain over TEL's own resolution.

Padding pixels take part in the trees (TEL pads with the ignore label and
builds its trees over the whole crop too) but not in ``U``.

``tree_stride`` is an option both tree methods (``tel`` and ``apro``) share
at the loss level: ``config.loss.tree_stride``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from agmm_jax.data import labels as labels_lib
from agmm_jax.model import deeplab
from agmm_jax.model import resample
from agmm_jax.methods import core
from agmm_jax.methods import spanning_tree

EMBEDDING_HEAD = 'tel_embedding'
# TEL's ``embedding_layer``: Conv2d(256, 256, 1, bias=False) + BNReLU.
EMBEDDING_CHANNELS = 256
# The decoder grid: the tree loss works at the logits' native resolution.
TREE_STRIDE = 4


class EmbeddingHead(deeplab.ConvBNReLU):
  """TEL's embedding layer: ``relu(bn(conv_1x1(f)))``, 256 channels."""

  def __init__(self, in_features: int, *, num_classes: int, dtype: Any, rngs: nnx.Rngs):
    del num_classes  # The embedding's width does not depend on the classes.
    super().__init__(in_features, EMBEDDING_CHANNELS, 1, dtype=dtype, rngs=rngs)


class TreeGrid(NamedTuple):
  """The loss inputs sampled on the tree grid (module docstring).

  Attributes:
    probabilities: ``[B, h, w, K]`` softmax of the sampled logits, in the
      compute dtype, differentiable.
    unlabeled: ``[B, h, w]`` 1.0 on the unlabeled real pixels, else 0.0.
  """
  probabilities: jax.Array
  unlabeled: jax.Array


def require_image(inputs: core.LossInputs, term: str) -> None:
  """Raises a one-line ValueError naming ``term`` when the image is absent."""
  if inputs.image is None:
    raise ValueError(f'loss term {term!r} needs the input image but '
                     'LossInputs.image is None (declare Needs(image=True))')


def check_tree_stride(tree_stride: Any) -> None:
  """``tree_stride`` must be a positive int (a loss-level option)."""
  if isinstance(tree_stride, bool) or not isinstance(tree_stride, int) or tree_stride < 1:
    raise ValueError(f'loss_config.tree_stride must be an int >= 1, got {tree_stride!r}')


def check_positive(term: str, **values: float) -> None:
  """Raises a ValueError naming ``loss_config.<term>.<option>`` for a
  non-positive (or non-finite) value."""
  for option, value in values.items():
    if not 0 < float(value) < float('inf'):
      raise ValueError(f'loss_config.{term}.{option} must be a finite number > 0, '
                       f'got {value!r}')


def sample_grid(x: jax.Array, tree_stride: int) -> jax.Array:
  """``x[:, ::s, ::s]``: every ``s``-th pixel of ``[B, H, W, ...]``."""
  return x[:, ::tree_stride, ::tree_stride]


def tree_grid(inputs: core.LossInputs, tree_stride: int) -> TreeGrid:
  """The prediction and the unlabeled mask on the tree grid."""
  core.check_inputs(inputs)
  logits = sample_grid(core.upcast(inputs.logits), tree_stride)
  label = sample_grid(inputs.label, tree_stride)
  unlabeled = (label == labels_lib.UNLABELED).astype(logits.dtype)
  return TreeGrid(jax.nn.softmax(logits, axis=-1), unlabeled)


def unlabeled_l1(prediction: jax.Array, target: jax.Array,
                 unlabeled: jax.Array) -> jax.Array:
  """``sum_{b, x, k} U(x) |prediction_k(x) - target_k(x)| / max(N_U, 1)``.

  ``N_U = sum U`` over the batch; ``max(., 1)`` is TEL's "divide only when
  N_U > 0" (the sum is 0 when ``N_U = 0``). Shapes ``[B, h, w, K]`` and
  ``[B, h, w]``.
  """
  total = jnp.sum(unlabeled[..., None] * jnp.abs(prediction - target))
  return total / jnp.maximum(jnp.sum(unlabeled), 1.0)


def to_label_resolution(x: jax.Array, inputs: core.LossInputs) -> jax.Array:
  """A tree-grid map ``[B, h, w, K]`` at label resolution (align corners, the
  inverse of the sampling where ``s`` divides ``H - 1``), for summaries."""
  return resample.resize_bilinear_align_corners(x, inputs.label.shape[1:3])


def _embedding(inputs: core.LossInputs, grid_size: tuple[int, int]) -> jax.Array:
  """The ``tel_embedding`` output on the tree grid, ``[B, h, w, 256]``."""
  if not inputs.outputs or EMBEDDING_HEAD not in inputs.outputs:
    raise ValueError(f"loss term 'tel' needs the head output {EMBEDDING_HEAD!r} but "
                     'LossInputs.outputs has none (declare it in Needs(heads=...))')
  embedding = core.upcast(inputs.outputs[EMBEDDING_HEAD])
  return resample.resize_bilinear_align_corners(embedding, grid_size)


def filtered_prediction(inputs: core.LossInputs, *, sigma: float, tree_stride: int
                        ) -> tuple[TreeGrid, jax.Array]:
  """``(grid, AS)``: the grid inputs and the twice tree-filtered prediction
  ``AS`` ``[B, h, w, K]`` (module docstring), differentiable in the
  prediction and, through the high-level edge weights, in the embedding."""
  require_image(inputs, 'tel')
  grid = tree_grid(inputs, tree_stride)
  embedding = _embedding(inputs, grid.probabilities.shape[1:3])
  image = sample_grid(inputs.rgb(), tree_stride).astype(embedding.dtype) / 255.0
  low_tree = spanning_tree.minimum_spanning_tree(image)
  low_weights = jnp.exp(-spanning_tree.parent_sq_distances(image, low_tree) / sigma)
  filtered = spanning_tree.tree_filter(grid.probabilities, low_tree, low_weights)
  high_tree = spanning_tree.minimum_spanning_tree(jax.lax.stop_gradient(embedding))
  high_weights = jnp.exp(-spanning_tree.parent_sq_distances(embedding, high_tree))
  return grid, spanning_tree.tree_filter(filtered, high_tree, high_weights)


def filtered_response(inputs: core.LossInputs, *, sigma: float, tree_stride: int
                      ) -> jax.Array:
  """The summary map: ``AS`` at label resolution, ``[B, H, W, K]`` in [0, 1]."""
  _, filtered = filtered_prediction(inputs, sigma=sigma, tree_stride=tree_stride)
  return to_label_resolution(filtered, inputs)


def _check_options(*, sigma: float, tree_stride: int) -> None:
  check_positive('tel', sigma=sigma)
  check_tree_stride(tree_stride)


@core.register_term('tel', needs=core.Needs(image=True, heads={EMBEDDING_HEAD: EmbeddingHead}),
                    summary=filtered_response, check=_check_options,
                    shared=('tree_stride',))
def tree_energy_loss(inputs: core.LossInputs, *, sigma: float = 0.02,
                     tree_stride: int = TREE_STRIDE) -> jax.Array:
  """TEL's ``sum U |p - AS| / N_U`` on the tree grid (module docstring).

  Options: ``sigma``, the low-level bandwidth (TEL: 0.02 for VOC, 0.002 for
  Cityscapes and ADE20k); ``tree_stride`` (loss level), the grid's stride in
  label pixels.
  """
  grid, filtered = filtered_prediction(inputs, sigma=sigma, tree_stride=tree_stride)
  return unlabeled_l1(grid.probabilities, filtered, grid.unlabeled)
