"""APro, affinity propagation (Li et al., NeurIPS 2023), as the ``apro`` term.

APro's released code (CircleRadon/APro) is the box-supervised instance
segmentation variant; the paper's point- and scribble-supervised semantic
segmentation variant was never released. This is that variant derived from
the paper and the released kernels (:mod:`spanning_tree` documents the
kernels' reference details), with the semantic-segmentation frame of TEL,
on which the paper builds its semantic experiments (:mod:`tel`: the tree grid,
the unlabeled-pixel L1 and its normalization).

On the tree grid (``tree_stride``, shared with ``tel``), with
``p = softmax(logits)`` ``[B, h, w, K]`` and ``I`` the mean/std-normalized
image (APro's MST and local affinities use the normalized image, as
``LossInputs.image`` is):

* global pseudo-label: ``T`` = the MST of ``I``;
  ``y1 = GP(sg(p); T, d_I, zeta_global_image)``, then
  ``y_g = GP(y1; T, d_y1, zeta_global_prediction)``, where
  ``GP(v; T, d, zeta)_i = (sum_{j != i} A_ij v_j + v_i) / (sum_{j != i} A_ij + 1)``,
  ``A_ij = exp(-max_{e in path_T(i, j)} d_e / zeta^2)`` and ``d_e`` the squared
  distance across edge ``e`` of the embedding (``I``, then ``y1``) -- APro's
  two passes on the same image tree (:func:`spanning_tree.global_propagation`);
* local pseudo-label: ``y_l = LP(sg(p); I, zeta_local, local_radius,
  local_iterations)``, ``local_iterations`` rounds of the normalized
  ``(2r + 1)^2``-window affinity average ``a_ij = exp(-||I_i - I_j||^2 /
  zeta_local^2)`` (:func:`spanning_tree.local_propagation`);
* ``apro = L1(p, y_g) + L1(p, y_l)`` with
  ``L1(p, y) = sum_{b, x, k} U(x) |p_k(x) - y_k(x)| / N_U`` over the unlabeled
  real pixels (``tel.unlabeled_l1``); both pseudo-labels are detached
  (``sg``), the gradient reaches the logits through ``p`` only.

Choices the paper leaves open, and what is taken here:

* the class probabilities play the role of APro's per-instance mask
  probabilities: one channel per class, softmax instead of sigmoid, so the
  propagation runs over the ``K`` class channels together;
* the loss region is TEL's, the unlabeled real pixels (APro: the box); the
  labeled ones are pCE's;
* the normalization is TEL's, summed over classes and averaged over the
  unlabeled pixels of the batch (APro divides by the box area per instance
  channel, i.e. averages over channels too; with softmax that would shrink
  the term by ``K``);
* the two L1 terms have weight 1 each (APro's Box2Mask), and the preset
  weighs their sum 0.4 next to pCE, TEL's weight in the framework the paper
  reuses;
* no padding mask in the local propagation (APro multiplies by the box mask;
  here padding takes part as in the trees, and ``U`` leaves it out of the
  loss);
* the defaults are the released code's (``zeta`` 0.01 and 0.07 for the two
  global passes, 0.15 locally, a 5x5 window, 20 iterations), tuned for
  instance masks at stride 4, not for semantic segmentation; they are
  options.
"""

import jax

from agmm_jax.methods import core
from agmm_jax.methods import spanning_tree
from agmm_jax.methods import tel


def pseudo_labels(inputs: core.LossInputs, *, zeta_global_image: float,
                  zeta_global_prediction: float, zeta_local: float,
                  local_radius: int, local_iterations: int, tree_stride: int
                  ) -> tuple[tel.TreeGrid, jax.Array, jax.Array]:
  """``(grid, y_global, y_local)``: the grid inputs and the two detached
  pseudo-labels ``[B, h, w, K]`` (module docstring)."""
  tel.require_image(inputs, 'apro')
  grid = tel.tree_grid(inputs, tree_stride)
  p = jax.lax.stop_gradient(grid.probabilities)
  image = tel.sample_grid(jax.lax.stop_gradient(core.upcast(inputs.image)),
                          tree_stride).astype(p.dtype)
  tree = spanning_tree.minimum_spanning_tree(image)
  first = spanning_tree.global_propagation(
      p, tree, spanning_tree.parent_sq_distances(image, tree), zeta_global_image)
  y_global = spanning_tree.global_propagation(
      first, tree, spanning_tree.parent_sq_distances(first, tree), zeta_global_prediction)
  y_local = spanning_tree.local_propagation(
      p, image, zeta_s=zeta_local, radius=local_radius, num_iter=local_iterations)
  return grid, y_global, y_local


def global_response(inputs: core.LossInputs, **options) -> jax.Array:
  """The summary map: the global pseudo-label at label resolution,
  ``[B, H, W, K]`` in [0, 1]."""
  _, y_global, _ = pseudo_labels(inputs, **options)
  return tel.to_label_resolution(y_global, inputs)


def _check_options(*, zeta_global_image: float, zeta_global_prediction: float,
                   zeta_local: float, local_radius: int, local_iterations: int,
                   tree_stride: int) -> None:
  tel.check_positive('apro', zeta_global_image=zeta_global_image,
                     zeta_global_prediction=zeta_global_prediction, zeta_local=zeta_local)
  for option, value, least in (('local_radius', local_radius, 1),
                               ('local_iterations', local_iterations, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f'loss_config.apro.{option} must be an int >= {least}, got {value!r}')
  tel.check_tree_stride(tree_stride)


@core.register_term('apro', needs=core.Needs(image=True), summary=global_response,
                    check=_check_options, shared=('tree_stride',))
def affinity_propagation_loss(inputs: core.LossInputs, *, zeta_global_image: float = 0.01,
                              zeta_global_prediction: float = 0.07, zeta_local: float = 0.15,
                              local_radius: int = 2, local_iterations: int = 20,
                              tree_stride: int = tel.TREE_STRIDE) -> jax.Array:
  """``L1(p, y_global) + L1(p, y_local)`` over the unlabeled pixels of the
  tree grid (module docstring).

  Options: the global bandwidths ``zeta_global_image`` (first pass, image
  tree distances) and ``zeta_global_prediction`` (second pass, distances of
  the first pass's output); the local bandwidth ``zeta_local``, window radius
  ``local_radius`` and ``local_iterations``; ``tree_stride`` (loss level).
  """
  grid, y_global, y_local = pseudo_labels(
      inputs, zeta_global_image=zeta_global_image,
      zeta_global_prediction=zeta_global_prediction, zeta_local=zeta_local,
      local_radius=local_radius, local_iterations=local_iterations, tree_stride=tree_stride)
  return (tel.unlabeled_l1(grid.probabilities, y_global, grid.unlabeled)
          + tel.unlabeled_l1(grid.probabilities, y_local, grid.unlabeled))
