"""Soft self-labeling with Potts relaxations (Zhang and Boykov, CVPR 2025,
"Soft Self-labeling and Potts Relaxations for Weakly-Supervised
Segmentation", arXiv 2507.01721).

Per batch, soft pseudo-labels ``y`` (a distribution over the K classes at
every real pixel, one-hot on the seeds) minimize, with the network's softmax
``sigma`` held fixed,

  ``E(y) = sum_{i unlabeled} c(y_i, sigma_i) + potts_weight * P(y)``

(the auxiliary loss of the paper with the network fixed: the seeds'
cross-entropy is a constant of ``y``), by :func:`solve_pseudo_labels` for
``iterations`` steps inside the jitted step. The network is then trained by
the term ``soft_self_labeling`` = ``mean_{i unlabeled} c(y_i, sigma_i)`` with
``y`` held fixed (``stop_gradient``); the seeds get the partial
cross-entropy (``pce``, weight 1 in the preset), so the network-side loss is
the paper's auxiliary loss with the term's config weight as ``eta``.

Prediction-to-pseudo-label term ``c`` (option ``ce``, ``CE_VARIANTS``):
``standard`` ``H(y, sigma) = -sum_k y_k ln sigma_k``; ``reverse``
``H(sigma, y) = -sum_k sigma_k ln y_k``; ``collision``
``H_2(y, sigma) = -ln sum_k y_k sigma_k`` (collision cross-entropy, Zhang and
Boykov, arXiv 2303.07321: 0 gradient for a uniform ``y``, Shannon's for a
one-hot one).

Potts relaxations ``P(y) = sum_{ij} w_ij p(y_i, y_j)`` (option ``potts``,
``POTTS_RELAXATIONS``), every form 0 for equal one-hot labels:
``bilinear`` ``1 - y_i.y_j`` (the CRF loss of Tang et al., non-convex);
``quadratic`` ``|y_i - y_j|^2 / 2`` (convex); ``normalized_quadratic``
``1 - y_i.y_j / (|y_i| |y_j|)`` (non-convex, scale-free);
``collision`` ``-ln y_i.y_j`` (the collision cross-entropy between
neighbours, non-convex, infinite for different one-hot labels),
``collision_divergence`` ``-ln (y_i.y_j / (|y_i| |y_j|))`` and
``log_quadratic`` ``-ln (1 - |y_i - y_j|^2 / 2)``: the six of the paper's
comparison (per the summary below).

Neighbourhoods (option ``neighbourhood``, ``NEIGHBOURHOODS``): ``grid4`` /
``grid8``, each unordered nearest-neighbour pair once, with the
contrast-sensitive weight ``w_ij = exp(-|I_i - I_j|^2 / (2 sigma_rgb^2)) /
|i - j|`` (0..255 rgb, both pixels real); ``dense``, the RGBXY Gaussian kernel
``W`` of :mod:`agmm_jax.methods.bilateral` over ordered pairs of real pixels,
diagonal included (as the ``densecrf`` Potts form), divided by the image's
mean degree ``mean_i (W m)_i`` so that one ``potts_weight`` means about the
same on every neighbourhood (a pixel's grid4 edges weigh at most 2 per
pixel). The dense kernel takes only the forms that are sums of products
(bilinear, quadratic, normalized quadratic): ``y^T W y`` costs one filtering
per solver step (custom VJP, the gradient ``2 W y`` reuses it; the degree is
filtered once); the logarithmic forms are not.

Solver: exponentiated-gradient (mirror) descent on the simplex,
``y <- y exp(-t grad E) / Z`` at the unlabeled real pixels, started at
``sigma``, with a per-image step ``t`` that grows by ``STEP_GROWTH`` after an
accepted step and halves after a rejected one (a step is accepted only if it
does not increase the image's ``E``), so ``E`` never increases and ``y`` stays
on the simplex; each step costs one energy and gradient. With
``step_scale='pixel'`` each pixel's centered gradient is first divided by its
range over the classes (a positive per-pixel factor: still a descent
direction, still the same step test), so that a step moves the pixels of
small gradients as far as those of large ones; with the default ``'image'``
the largest gradients of the image set its one step size (on CamVid at the
preset's setting 20 such steps reach about a quarter of the 1000-step
target's gain; docs/results_soft_self_labeling.md). ``y`` is floored at
``PSEUDO_LABEL_FLOOR`` (then renormalized) so that the logarithms stay finite.
Mirror descent converges fast to minimizers inside the simplex but slowly
(about ``1 / t``) to a component that vanishes at the minimizer, e.g. a class
absent from a pixel's neighbourhood under the quadratic relaxation: a fixed
small number of steps leaves such classes small, not zero.

Source and differences. The paper's own text could not be read here (the
stored copies of arXiv 2507.01721 stop after its abstract; its code, on
vision.cs.uwaterloo.ca/code, is not reachable). What this module follows
beyond the abstract comes from a third-party summary of the paper
(en.papernotes.org, "Soft Self-Labeling and Potts Relaxations for
Weakly-Supervised Segmentation", read 2026-12-06): the joint loss
``-sum_{i in S} ln sigma_i^{ybar_i} + eta sum_{i not in S} H(sigma_i, y_i) +
lambda sum_{ij in N} P(y_i, y_j)`` split by ADM into a network sub-problem
and a pseudo-label sub-problem (solved by gradient descent); the six
relaxations above, with the collision cross-entropy ``-ln sigma.y`` as
``H``; the best setting ``H`` = collision cross-entropy, ``P`` = collision
divergence on the nearest-neighbour system (better than a dense one: 71.1
against 67.9 mIoU), ``eta = 0.3``, ``lambda = 6``; a pCE warm-up, then 60
epochs, SGD at 0.0007 with poly decay, DeepLabV3+. The preset
``soft_self_labeling`` (configs/presets.py) takes that setting: the term's
weight is ``eta`` 0.3 (the network's loss: pCE's mean over the seeds + 0.3 x
the mean over the unlabeled pixels), and in ``E(y)`` above, where ``c`` has
weight 1, ``potts_weight`` is ``lambda / eta = 20``, reading the paper's
sums as written (a sum over pixels for ``H``, over neighbour pairs for
``P``). The preset's runs start with the pCE
warm-up (``config.warmup.fraction`` 0.25, ``agmm_jax/train/stages.py``: the
first quarter of the run's steps trains pCE alone, then this loss trains from
that network with a new optimizer state and poly schedule). Ours, not the
paper's (unknown from the summary): the neighbour weights
(contrast-sensitive, above), the solver (mirror descent, 20 steps), the
warm-up's length, and the term's own defaults (``potts_weight`` 1), which the
preset overrides. The first defaults of this module (``eta`` 1,
``potts_weight`` 1, chosen before the summary was found) left the solved
pseudo-labels within 0.4% of the prediction (docs/results_soft_self_labeling.md).
The dense kernel works at label resolution (no rloss downscaling).
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from agmm_jax.data import labels as labels_lib
from agmm_jax.methods import bilateral
from agmm_jax.methods import core
from agmm_jax.methods import regularized

CE_VARIANTS = ('standard', 'reverse', 'collision')
POTTS_RELAXATIONS = ('bilinear', 'quadratic', 'normalized_quadratic',
                     'collision', 'collision_divergence', 'log_quadratic')
# The relaxations that are sums of products y_i^T y_j (or of the normalized
# y), hence computable with the dense kernel by filtering.
DENSE_RELAXATIONS = ('bilinear', 'quadratic', 'normalized_quadratic')
NEIGHBOURHOODS = ('grid4', 'grid8', 'dense')
# How the solver scales a step (option step_scale; the first is the
# default): one step size for the whole image, or each pixel's centered
# gradient divided by its range first.
STEP_SCALES = ('image', 'pixel')
# (dy, dx) of the unordered nearest-neighbour pairs.
_GRID_OFFSETS = {'grid4': ((0, 1), (1, 0)),
                 'grid8': ((0, 1), (1, 0), (1, 1), (1, -1))}
# Contrast sensitivity of the grid weights, 0..255 rgb units.
GRID_SIGMA_RGB = 15.0
# Lower bound of y and of the arguments of logarithms: keeps ln finite.
PSEUDO_LABEL_FLOOR = 1e-8
# Step factor after an accepted solver step (a rejected one halves it).
STEP_GROWTH = 1.5


# ------------------------------------------------------------ pointwise forms


def _log(x):
  return jnp.log(jnp.maximum(x, PSEUDO_LABEL_FLOOR))


def _unit(y):
  return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True),
                         PSEUDO_LABEL_FLOOR)


def prediction_cross_entropy(y, probs, ce):
  """``c(y_i, sigma_i)`` per pixel, ``[...]`` of ``[..., K]`` inputs."""
  if ce == 'standard':
    return -jnp.sum(y * _log(probs), axis=-1)
  if ce == 'reverse':
    return -jnp.sum(probs * _log(y), axis=-1)
  if ce == 'collision':
    return -_log(jnp.sum(y * probs, axis=-1))
  raise ValueError(f'unknown ce {ce!r}')


def potts_pair(a, b, potts):
  """``p(a, b)`` per pixel pair, ``[...]`` of ``[..., K]`` inputs."""
  if potts == 'bilinear':
    return 1.0 - jnp.sum(a * b, axis=-1)
  if potts == 'quadratic':
    return 0.5 * jnp.sum((a - b) ** 2, axis=-1)
  if potts == 'normalized_quadratic':
    return 1.0 - jnp.sum(_unit(a) * _unit(b), axis=-1)
  if potts == 'collision':
    return -_log(jnp.sum(a * b, axis=-1))
  if potts == 'collision_divergence':
    return -_log(jnp.sum(_unit(a) * _unit(b), axis=-1))
  if potts == 'log_quadratic':
    return -_log(1.0 - 0.5 * jnp.sum((a - b) ** 2, axis=-1))
  raise ValueError(f'unknown potts {potts!r}')


# ----------------------------------------------------------- neighbourhoods


def _pair_slices(x, dy, dx):
  """``(x_i, x_j)`` over the pixels ``i`` whose neighbour ``j = i + (dy,
  dx)`` (``dy >= 0``) is inside the image; axes 1, 2 are the image's."""
  h, w = x.shape[1], x.shape[2]
  x0, x1 = max(0, -dx), w - max(0, dx)
  return x[:, :h - dy, x0:x1], x[:, dy:, x0 + dx:x1 + dx]


def grid_weights(rgb, valid, neighbourhood, sigma_rgb):
  """``w_ij`` of each offset of ``neighbourhood``: ``[B, H - dy, W - |dx|]``
  arrays (module docstring), 0 unless both pixels are real."""
  m = valid.astype(rgb.dtype)
  weights = []
  for dy, dx in _GRID_OFFSETS[neighbourhood]:
    ca, cb = _pair_slices(rgb, dy, dx)
    ma, mb = _pair_slices(m, dy, dx)
    contrast = jnp.exp(-jnp.sum((ca - cb) ** 2, axis=-1) / (2 * sigma_rgb ** 2))
    weights.append(contrast * ma * mb / math.hypot(dy, dx))
  return tuple(weights)


# The scale-free relaxations as their scaled forms of the unit vectors.
_OF_UNIT_VECTORS = {'normalized_quadratic': 'bilinear',
                    'collision_divergence': 'collision'}


def grid_potts(y, weights, neighbourhood, potts):
  """Per-image ``sum_{ij} w_ij p(y_i, y_j)`` on the grid, ``[B]``."""
  if potts in _OF_UNIT_VECTORS:
    # Each pixel normalized once, not once per pair it is in.
    y, potts = _unit(y), _OF_UNIT_VECTORS[potts]
  total = 0.0
  for (dy, dx), w in zip(_GRID_OFFSETS[neighbourhood], weights):
    a, b = _pair_slices(y, dy, dx)
    total = total + jnp.sum(w * potts_pair(a, b, potts), axis=(1, 2))
  return total


class DenseKernel(NamedTuple):
  """The dense kernel of one batch: image, mask, filter options, the degree
  ``d = W m`` ``[B, H, W]`` and the normalizer ``mean_i d_i`` ``[B]``."""
  rgb: jax.Array
  valid: jax.Array
  options: tuple  # (sigma_xy, sigma_rgb, approx, cell_xy, cell_rgb)
  degree: jax.Array
  mean_degree: jax.Array


def _filter(kernel_options, rgb, values, valid):
  sigma_xy, sigma_rgb, approx, cell_xy, cell_rgb = kernel_options
  return bilateral.bilateral_filter(rgb, values, sigma_xy, sigma_rgb, valid,
                                    approx=approx, cell_xy=cell_xy,
                                    cell_rgb=cell_rgb)


def dense_kernel(rgb, valid, options) -> DenseKernel:
  """:class:`DenseKernel` of ``options`` (sigma_xy, sigma_rgb, approx,
  cell_xy, cell_rgb); one filtering of the mask."""
  m = valid.astype(rgb.dtype)
  degree = _filter(options, rgb, m[..., None], valid)[..., 0] * m
  mean = jnp.sum(degree, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1)
  return DenseKernel(rgb, valid, tuple(options), degree,
                     jnp.maximum(mean, PSEUDO_LABEL_FLOOR))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_quadratic(kernel_options, rgb, values, valid):
  """Per-image ``sum_c v_c^T W v_c`` over real pixels, ``[B]``."""
  return _kernel_quadratic_fwd(kernel_options, rgb, values, valid)[0]


def _kernel_quadratic_fwd(kernel_options, rgb, values, valid):
  wv = _filter(kernel_options, rgb, values, valid)
  return jnp.sum(values * wv, axis=(1, 2, 3)), wv


def _kernel_quadratic_bwd(kernel_options, wv, g):
  # W is symmetric (exact, and P^T B P for the grid): the gradient 2 W v is
  # the forward's product, no second filtering.
  del kernel_options
  return None, 2.0 * g[:, None, None, None] * wv, None


_kernel_quadratic.defvjp(_kernel_quadratic_fwd, _kernel_quadratic_bwd)


def dense_potts(y, kernel: DenseKernel, potts):
  """Per-image ``sum_{ij} W_ij m_i m_j p(y_i, y_j) / mean degree``, ``[B]``,
  from ``sum_ij W_ij (g(y_i) - v_i.v_j) = d.g - v^T W v``."""
  m = kernel.valid.astype(y.dtype)[..., None]
  if potts == 'bilinear':
    v, g = y, jnp.ones(y.shape[:-1], y.dtype)
  elif potts == 'quadratic':
    v, g = y, jnp.sum(y * y, axis=-1)
  elif potts == 'normalized_quadratic':
    v, g = _unit(y), jnp.ones(y.shape[:-1], y.dtype)
  else:
    raise ValueError(f'potts {potts!r} has no dense form; one of '
                     f'{DENSE_RELAXATIONS}')
  linear = jnp.sum(kernel.degree * g, axis=(1, 2))
  quad = _kernel_quadratic(kernel.options, kernel.rgb, v * m, kernel.valid)
  return (linear - quad) / kernel.mean_degree


# ------------------------------------------------------------------- solver


class SubProblem(NamedTuple):
  """The pseudo-label sub-problem of one batch.

  Attributes:
    probs: ``[B, H, W, K]`` the network's softmax (held fixed).
    seeds: ``[B, H, W, K]`` one-hot of the labeled pixels (0 elsewhere).
    labeled: ``[B, H, W]`` bool, the seeds.
    unlabeled: ``[B, H, W]`` bool, the real unlabeled pixels (they move).
    potts: per-image ``lambda P(y)``, ``[B]``, of ``y`` ``[B, H, W, K]``.
    ce: one of ``CE_VARIANTS``.
  """
  probs: jax.Array
  seeds: jax.Array
  labeled: jax.Array
  unlabeled: jax.Array
  potts: Callable[[jax.Array], jax.Array]
  ce: str

  def energy(self, y):
    """Per-image ``E(y)`` (module docstring), ``[B]``."""
    c = prediction_cross_entropy(y, self.probs, self.ce)
    return jnp.sum(jnp.where(self.unlabeled, c, 0.0), axis=(1, 2)) + self.potts(y)

  def clamp(self, y):
    """``y`` with the seeds one-hot and padding uniform (it never counts)."""
    y = jnp.where(self.labeled[..., None], self.seeds, y)
    free = self.unlabeled[..., None] | self.labeled[..., None]
    return jnp.where(free, y, 1.0 / y.shape[-1])


def _on_simplex(y):
  y = jnp.maximum(y / jnp.sum(y, axis=-1, keepdims=True), PSEUDO_LABEL_FLOOR)
  return y / jnp.sum(y, axis=-1, keepdims=True)


def solve_pseudo_labels(problem: SubProblem, init, *, iterations: int,
                        step: float, step_scale: str = STEP_SCALES[0]):
  """Minimizes ``problem.energy`` over ``y`` on the simplex (module
  docstring: monotone exponentiated-gradient descent).

  Args:
    problem: the sub-problem.
    init: ``[B, H, W, K]`` starting distributions (clamped to the seeds).
    iterations: solver steps (static).
    step: initial step ``t``.
    step_scale: one of ``STEP_SCALES`` (module docstring).

  Returns:
    ``(y, energy)``: ``[B, H, W, K]`` and its per-image ``E``, ``[B]``.
  """

  def value_and_grad(y):
    value, vjp = jax.vjp(problem.energy, y)
    return value, vjp(jnp.ones_like(value))[0]

  y = problem.clamp(_on_simplex(init))
  value, grad = value_and_grad(y)
  steps = jnp.full(value.shape, step, value.dtype)

  def one_step(_, state):
    y, value, grad, steps = state
    # Centering per pixel changes nothing after normalization but keeps
    # exp() in range.
    g = grad - jnp.max(grad, axis=-1, keepdims=True)
    if step_scale == 'pixel':
      # A positive per-pixel factor keeps a descent direction; the step
      # test below keeps E monotone.
      g = g / jnp.maximum(-jnp.min(g, axis=-1, keepdims=True),
                          PSEUDO_LABEL_FLOOR)
    proposal = problem.clamp(_on_simplex(
        y * jnp.exp(-steps[:, None, None, None] * g)))
    new_value, new_grad = value_and_grad(proposal)
    accept = new_value <= value
    keep = lambda new, old: jnp.where(
        accept.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    return (keep(proposal, y), keep(new_value, value), keep(new_grad, grad),
            jnp.where(accept, steps * STEP_GROWTH, steps * 0.5))

  y, value, _, _ = jax.lax.fori_loop(0, iterations, one_step,
                                     (y, value, grad, steps))
  return y, value


# -------------------------------------------------------------------- terms


def _potts_energy(inputs, probs, *, potts, neighbourhood, potts_weight,
                  grid_sigma_rgb, kernel_options):
  """``y -> potts_weight P(y)`` per image for the batch of ``inputs``."""
  rgb = inputs.rgb().astype(probs.dtype)
  valid = inputs.valid
  if neighbourhood == 'dense':
    kernel = dense_kernel(rgb, valid, kernel_options)
    return lambda y: potts_weight * dense_potts(y, kernel, potts)
  weights = grid_weights(rgb, valid, neighbourhood, grid_sigma_rgb)
  return lambda y: potts_weight * grid_potts(y, weights, neighbourhood, potts)


def pseudo_labels(inputs: core.LossInputs, *, ce, potts, neighbourhood,
                  potts_weight, iterations, step, step_scale, grid_sigma_rgb,
                  kernel_options):
  """``(y, sigma, unlabeled)``: the solved pseudo-labels (no gradient), the
  softmax and the real unlabeled pixels."""
  logits = core.upcast(inputs.logits)
  probs = jax.nn.softmax(logits, axis=-1)
  fixed = jax.lax.stop_gradient(probs)
  labeled = labels_lib.labeled_mask(inputs.label)
  unlabeled = inputs.valid & ~labeled
  seeds = jax.nn.one_hot(jnp.where(labeled, inputs.label, 0),
                         probs.shape[-1], dtype=probs.dtype)
  problem = SubProblem(fixed, seeds, labeled, unlabeled, _potts_energy(
      inputs, fixed, potts=potts, neighbourhood=neighbourhood,
      potts_weight=potts_weight, grid_sigma_rgb=grid_sigma_rgb,
      kernel_options=kernel_options), ce)
  y, _ = solve_pseudo_labels(problem, fixed, iterations=iterations, step=step,
                             step_scale=step_scale)
  return jax.lax.stop_gradient(y), probs, unlabeled


def network_loss(probs, y, unlabeled, ce):
  """``mean_{i unlabeled} c(y_i, sigma_i)`` over the batch (0 without
  unlabeled pixels); the gradient reaches ``probs`` only."""
  c = prediction_cross_entropy(jax.lax.stop_gradient(y), probs, ce)
  m = unlabeled.astype(c.dtype)
  return jnp.sum(c * m) / jnp.maximum(jnp.sum(m), 1.0)


def _check(*, ce, potts, neighbourhood, potts_weight, iterations, step,
           step_scale, grid_sigma_rgb, sigma_xy, sigma_rgb, approx, cell_xy, cell_rgb,
           max_grid_mib):
  term = 'soft_self_labeling'
  require = functools.partial(regularized._require, term)  # pylint: disable=protected-access
  require('ce', ce, ce in CE_VARIANTS, f'one of {CE_VARIANTS}')
  require('potts', potts, potts in POTTS_RELAXATIONS,
          f'one of {POTTS_RELAXATIONS}')
  require('neighbourhood', neighbourhood, neighbourhood in NEIGHBOURHOODS,
          f'one of {NEIGHBOURHOODS}')
  if neighbourhood == 'dense':
    require('potts', potts, potts in DENSE_RELAXATIONS,
            f'one of {DENSE_RELAXATIONS} with neighbourhood=dense')
  require('iterations', iterations, isinstance(iterations, int)
          and not isinstance(iterations, bool) and iterations >= 0,
          'an integer >= 0')
  require('potts_weight', potts_weight, potts_weight >= 0, '>= 0')
  require('step_scale', step_scale, step_scale in STEP_SCALES,
          f'one of {STEP_SCALES}')
  for option, value in (('step', step), ('grid_sigma_rgb', grid_sigma_rgb)):
    require(option, value, value > 0, '> 0')
  regularized._check_rloss_options(  # pylint: disable=protected-access
      term, sigma_xy=sigma_xy, sigma_rgb=sigma_rgb, scale_factor=1.0,
      approx=approx, cell_xy=cell_xy, cell_rgb=cell_rgb,
      max_grid_mib=max_grid_mib)


def _shape_check(shape: core.TrainShape, *, neighbourhood, sigma_xy,
                 sigma_rgb, approx, cell_xy, cell_rgb, max_grid_mib,
                 **unused):
  """One grid buffer of the dense kernel at the training shape (K channels:
  the degree is filtered alone, before)."""
  del unused
  if neighbourhood != 'dense':
    return
  regularized._check_grid_memory(  # pylint: disable=protected-access
      'soft_self_labeling', shape, channels=shape.num_classes,
      sigma_xy=sigma_xy, sigma_rgb=sigma_rgb, scale_factor=1.0, approx=approx,
      cell_xy=cell_xy, cell_rgb=cell_rgb, max_grid_mib=max_grid_mib)


def _solve(inputs, options):
  kernel_keys = ('sigma_xy', 'sigma_rgb', 'approx', 'cell_xy', 'cell_rgb')
  kernel_options = (float(options['sigma_xy']), float(options['sigma_rgb']),
                    options['approx'], float(options['cell_xy']),
                    float(options['cell_rgb']))
  solver = {k: v for k, v in options.items()
            if k not in kernel_keys and k != 'max_grid_mib'}
  return pseudo_labels(inputs, kernel_options=kernel_options, **solver)


def _summary(inputs: core.LossInputs, **options) -> jax.Array:
  """The solved pseudo-labels, ``[B, H, W, K]`` in [0, 1]."""
  return _solve(inputs, options)[0]


@core.register_term('soft_self_labeling', needs=core.Needs(image=True),
                    summary=_summary, check=_check, shape_check=_shape_check)
def soft_self_labeling(
    inputs: core.LossInputs, *, ce: str = 'collision',
    potts: str = 'collision_divergence', neighbourhood: str = 'grid4',
    potts_weight: float = 1.0, iterations: int = 20, step: float = 1.0,
    step_scale: str = STEP_SCALES[0], grid_sigma_rgb: float = GRID_SIGMA_RGB,
    sigma_xy: float = regularized.RLOSS_SIGMA_XY,
    sigma_rgb: float = regularized.RLOSS_SIGMA_RGB, approx: str = 'grid',
    cell_xy: float = regularized.CELL_XY, cell_rgb: float = regularized.CELL_RGB,
    max_grid_mib: float = regularized.MAX_GRID_MIB) -> jax.Array:
  """The network's loss toward the solved soft pseudo-labels
  (:func:`network_loss` of :func:`pseudo_labels`; module docstring). The
  dense kernel's options (``sigma_xy`` .. ``max_grid_mib``, as the densecrf
  term's) count only with ``neighbourhood='dense'``."""
  options = dict(ce=ce, potts=potts, neighbourhood=neighbourhood,
                 potts_weight=potts_weight, iterations=iterations, step=step,
                 step_scale=step_scale, grid_sigma_rgb=grid_sigma_rgb, sigma_xy=sigma_xy,
                 sigma_rgb=sigma_rgb, approx=approx, cell_xy=cell_xy,
                 cell_rgb=cell_rgb, max_grid_mib=max_grid_mib)
  y, probs, unlabeled = _solve(inputs, options)
  return network_loss(probs, y, unlabeled, ce)
