"""Soft self-labeling (agmm_jax.methods.soft_self_labeling) against
independent float64 references written here: every cross-entropy variant
per pixel, every Potts relaxation as a loop over all neighbour pairs (grid)
or all ordered pixel pairs (dense N x N kernel); the solver's invariants and
closed-form minimizers; the network-side gradient against finite
differences; the preset training two steps with the tiny config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax import methods
from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib
from agmm_jax.methods import soft_self_labeling as ssl
from agmm_jax.train import run_spec
from agmm_jax.train import trainer
from configs import camvid_clicks
from configs import presets
from configs import tiny
from tests.train import test_trainer

NUM_CLASSES = 3


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ref_ce(y, p, ce):
  """One pixel's ``c(y, sigma)``, float64, by its definition."""
  if ce == 'standard':
    return -sum(y[k] * math.log(p[k]) for k in range(len(y)))
  if ce == 'reverse':
    return -sum(p[k] * math.log(y[k]) for k in range(len(y)))
  return -math.log(sum(y[k] * p[k] for k in range(len(y))))


def _ref_pair(a, b, potts):
  """One pair's ``p(a, b)``, float64, by its definition; the logarithmic
  forms at the module's floor (two different one-hot seeds: -ln 0)."""
  dot = float(a @ b)
  cos = dot / (np.linalg.norm(a) * np.linalg.norm(b))
  if potts == 'bilinear':
    return 1.0 - dot
  if potts == 'quadratic':
    return 0.5 * float(((a - b) ** 2).sum())
  if potts == 'normalized_quadratic':
    return 1.0 - cos
  if potts == 'log_quadratic':
    return -math.log(max(1.0 - 0.5 * float(((a - b) ** 2).sum()),
                         ssl.PSEUDO_LABEL_FLOOR))
  return -math.log(max(dot if potts == 'collision' else cos,
                       ssl.PSEUDO_LABEL_FLOOR))


def _ref_grid_energy(rgb, valid, y, neighbourhood, sigma_rgb, potts):
  """Per-image sum over every unordered pair of real neighbours."""
  b, h, w, _ = y.shape
  out = np.zeros(b)
  pixels = [(i, j) for i in range(h) for j in range(w)]
  for n in range(b):
    for s, (i, j) in enumerate(pixels):
      for (u, v) in pixels[s + 1:]:
        dy, dx = abs(u - i), abs(v - j)
        near = (dy + dx == 1) if neighbourhood == 'grid4' else max(dy, dx) == 1
        if not near or not (valid[n, i, j] and valid[n, u, v]):
          continue
        c2 = float(((rgb[n, i, j] - rgb[n, u, v]) ** 2).sum())
        weight = math.exp(-c2 / (2 * sigma_rgb ** 2)) / math.hypot(dy, dx)
        out[n] += weight * _ref_pair(y[n, i, j], y[n, u, v], potts)
  return out


def _ref_dense_energy(rgb, valid, y, sigma_xy, sigma_rgb, potts):
  """Per-image sum over every ordered pair of real pixels (diagonal
  included) of the RGBXY Gaussian kernel, over the mean degree."""
  b, h, w, _ = y.shape
  out = np.zeros(b)
  for n in range(b):
    real = [(i, j) for i in range(h) for j in range(w) if valid[n, i, j]]
    kern = np.array([[math.exp(
        -((i - u) ** 2 + (j - v) ** 2) / (2 * sigma_xy ** 2)
        - float(((rgb[n, i, j] - rgb[n, u, v]) ** 2).sum()) / (2 * sigma_rgb ** 2))
        for (u, v) in real] for (i, j) in real])
    mean_degree = kern.sum() / len(real)
    out[n] = sum(kern[s, t] * _ref_pair(y[n][p], y[n][q], potts)
                 for s, p in enumerate(real) for t, q in enumerate(real))
    out[n] /= mean_degree
  return out


def _batch(rng, b=2, h=5, w=6):
  """``(rgb seen by the loss, valid, label, LossInputs)``, float64."""
  rgb = rng.integers(0, 256, (b, h, w, 3)).astype(np.uint8)
  label = np.where(rng.uniform(size=(b, h, w)) < 0.2,
                   rng.integers(0, NUM_CLASSES, (b, h, w)), labels_lib.UNLABELED)
  label[0, -1] = labels_lib.PADDING
  label[1, :, -2:] = labels_lib.PADDING
  logits = rng.normal(size=(b, h, w, NUM_CLASSES))
  with jax.enable_x64(True):
    inputs = methods.LossInputs(
        logits=jnp.asarray(logits), decoder_features=jnp.zeros((b, 2, 2, 4)),
        label=jnp.asarray(label, jnp.int32),
        class_present=jnp.ones((b, NUM_CLASSES)),
        image=jnp.asarray(augment.normalize(rgb), jnp.float64))
    rgb_seen = np.asarray(inputs.rgb(), np.float64)
  return rgb_seen, label != labels_lib.PADDING, label, inputs


def _random_simplex(rng, shape):
  return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


@pytest.mark.parametrize('ce', ssl.CE_VARIANTS)
def test_each_cross_entropy_variant_matches_its_definition(ce):
  rng = np.random.default_rng(0)
  y = _random_simplex(rng, (7, NUM_CLASSES))
  p = _random_simplex(rng, (7, NUM_CLASSES))
  with jax.enable_x64(True):
    got = np.asarray(ssl.prediction_cross_entropy(jnp.asarray(y), jnp.asarray(p), ce))
  np.testing.assert_allclose(got, [_ref_ce(y[i], p[i], ce) for i in range(7)],
                             rtol=1e-12)


@pytest.mark.parametrize('potts', ssl.POTTS_RELAXATIONS)
@pytest.mark.parametrize('neighbourhood', ['grid4', 'grid8'])
def test_grid_relaxations_match_the_loop_over_all_neighbour_pairs(
    potts, neighbourhood):
  rng = np.random.default_rng(1)
  rgb, valid, _, _ = _batch(rng)
  y = _random_simplex(rng, valid.shape + (NUM_CLASSES,))
  with jax.enable_x64(True):
    weights = ssl.grid_weights(jnp.asarray(rgb), jnp.asarray(valid),
                               neighbourhood, 30.0)
    got = np.asarray(ssl.grid_potts(jnp.asarray(y), weights, neighbourhood, potts))
  want = _ref_grid_energy(rgb, valid, y, neighbourhood, 30.0, potts)
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize('potts', ssl.DENSE_RELAXATIONS)
def test_dense_relaxations_match_all_pixel_pairs_with_their_gradient(potts):
  rng = np.random.default_rng(2)
  rgb, valid, _, _ = _batch(rng, b=2, h=4, w=5)
  y = _random_simplex(rng, valid.shape + (NUM_CLASSES,))
  options = (3.0, 60.0, 'exact', 0.5, 0.8)
  with jax.enable_x64(True):
    kernel = ssl.dense_kernel(jnp.asarray(rgb), jnp.asarray(valid), options)
    energy = lambda z: ssl.dense_potts(z, kernel, potts)
    got = np.asarray(energy(jnp.asarray(y)))
    grad = np.asarray(jax.grad(lambda z: jnp.sum(energy(z)))(jnp.asarray(y)))
  want = _ref_dense_energy(rgb, valid, y, 3.0, 60.0, potts)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  eps = 1e-6
  for idx in [(0, 0, 0, 1), (0, 2, 3, 0), (1, 1, 2, 2), (1, 3, 0, 1)]:
    yp, ym = y.copy(), y.copy()
    yp[idx] += eps
    ym[idx] -= eps
    numeric = (_ref_dense_energy(rgb, valid, yp, 3.0, 60.0, potts).sum()
               - _ref_dense_energy(rgb, valid, ym, 3.0, 60.0, potts).sum()) / (2 * eps)
    np.testing.assert_allclose(grad[idx], numeric, rtol=1e-6, atol=1e-9)
  assert np.abs(grad[~valid]).max() == 0.0


def _problem(probs, label, potts_fn, ce):
  labeled = label >= 0
  seeds = np.eye(probs.shape[-1])[np.where(labeled, label, 0)] * labeled[..., None]
  return ssl.SubProblem(jnp.asarray(probs), jnp.asarray(seeds),
                        jnp.asarray(labeled),
                        jnp.asarray(label == labels_lib.UNLABELED), potts_fn, ce)


@pytest.mark.parametrize('ce, potts, neighbourhood, step_scale', [
    ('collision', 'collision_divergence', 'grid4', 'image'),
    ('collision', 'collision_divergence', 'grid4', 'pixel'),
    ('standard', 'bilinear', 'grid8', 'image'),
    ('reverse', 'collision', 'grid4', 'pixel'),
    ('reverse', 'quadratic', 'dense', 'image'),
    ('collision', 'normalized_quadratic', 'dense', 'pixel'),
    ('collision', 'log_quadratic', 'grid8', 'image')])
def test_the_solver_keeps_the_simplex_and_the_seeds_and_never_increases_e(
    ce, potts, neighbourhood, step_scale):
  rng = np.random.default_rng(3)
  rgb, valid, label, inputs = _batch(rng)
  probs = _softmax(3.0 * np.asarray(inputs.logits))
  with jax.enable_x64(True):
    potts_fn = ssl._potts_energy(  # pylint: disable=protected-access
        inputs, jnp.asarray(probs), potts=potts, neighbourhood=neighbourhood,
        potts_weight=2.0, grid_sigma_rgb=40.0,
        kernel_options=(3.0, 60.0, 'exact', 0.5, 0.8))
    problem = _problem(probs, label, potts_fn, ce)
    energies, solutions = [], []
    for iterations in (0, 1, 2, 5, 15):
      y, energy = ssl.solve_pseudo_labels(problem, jnp.asarray(probs),
                                          iterations=iterations, step=1.0,
                                          step_scale=step_scale)
      energies.append(np.asarray(energy))
      solutions.append(np.asarray(y))
  energies = np.array(energies)
  assert np.all(np.diff(energies, axis=0) <= 1e-12), energies
  assert np.all(energies[-1] < energies[0] - 1e-3), energies
  y = solutions[-1]
  assert np.all(y >= 0) and np.allclose(y.sum(-1), 1.0, atol=1e-12)
  labeled = label >= 0
  np.testing.assert_array_equal(y[labeled], np.eye(NUM_CLASSES)[label[labeled]])
  # E recomputed by the references at the solution.
  unlabeled = label == labels_lib.UNLABELED
  data = np.array([sum(_ref_ce(y[n, i, j], probs[n, i, j], ce)
                       for i, j in zip(*np.nonzero(unlabeled[n])))
                   for n in range(y.shape[0])])
  if neighbourhood == 'dense':
    smooth = _ref_dense_energy(rgb, valid, y, 3.0, 60.0, potts)
  else:
    smooth = _ref_grid_energy(rgb, valid, y, neighbourhood, 40.0, potts)
  np.testing.assert_allclose(energies[-1], data + 2.0 * smooth, rtol=1e-9)


@pytest.mark.parametrize('step_scale', ssl.STEP_SCALES)
def test_the_solver_reaches_the_closed_form_minimizers(step_scale):
  rng = np.random.default_rng(4)
  probs = _softmax(rng.normal(size=(1, 2, 3, NUM_CLASSES)))
  label = np.full((1, 2, 3), labels_lib.UNLABELED)
  uniform = np.full(probs.shape, 1.0 / NUM_CLASSES)
  no_potts = lambda y: jnp.zeros(y.shape[0], y.dtype)
  with jax.enable_x64(True):
    # Reverse cross-entropy alone: Gibbs' inequality, y = sigma.
    y, _ = ssl.solve_pseudo_labels(_problem(probs, label, no_potts, 'reverse'),
                                   jnp.asarray(uniform), iterations=200, step=1.0,
                                   step_scale=step_scale)
    np.testing.assert_allclose(np.asarray(y), probs, atol=1e-6)
    # Standard and collision cross-entropy alone (linear, resp. -ln of a
    # linear function of y): the vertex at argmax sigma.
    for ce in ('standard', 'collision'):
      y, _ = ssl.solve_pseudo_labels(_problem(probs, label, no_potts, ce),
                                     jnp.asarray(uniform), iterations=200, step=1.0,
                                     step_scale=step_scale)
      np.testing.assert_allclose(np.asarray(y), np.eye(NUM_CLASSES)[
          probs.argmax(-1)], atol=1e-5)
    # Quadratic Potts on a uniform chain between seeds 0 and 1, two classes,
    # uniform sigma (collision CE then a constant): the harmonic
    # interpolation, inside the simplex.
    chain = np.array([[[0, -1, -1, -1, 1]]])
    flat = np.full((1, 1, 5, 2), 0.5)
    weights = (jnp.ones((1, 1, 4)), jnp.zeros((1, 0, 5)))
    potts_fn = lambda y: ssl.grid_potts(y, weights, 'grid4', 'quadratic')
    y, _ = ssl.solve_pseudo_labels(_problem(flat, chain, potts_fn, 'collision'),
                                   jnp.asarray(flat), iterations=300, step=1.0,
                                   step_scale=step_scale)
  t = np.arange(5)[:, None] / 4.0
  np.testing.assert_allclose(np.asarray(y)[0, 0], np.hstack([1 - t, t]),
                             atol=1e-6)


@pytest.mark.parametrize('ce', ssl.CE_VARIANTS)
def test_the_network_gradient_matches_finite_differences_with_y_fixed(ce):
  rng = np.random.default_rng(5)
  _, _, label, inputs = _batch(rng, b=2, h=3, w=4)
  options = dict(ce=ce, potts='bilinear', neighbourhood='grid4',
                 potts_weight=1.0, iterations=5, step=1.0, step_scale='image',
                 grid_sigma_rgb=30.0,
                 kernel_options=(3.0, 60.0, 'exact', 0.5, 0.8))
  unlabeled = label == labels_lib.UNLABELED
  logits = np.asarray(inputs.logits)
  with jax.enable_x64(True):
    y, _, _ = ssl.pseudo_labels(inputs, **options)
    y = np.asarray(y)
    term = lambda z: ssl.network_loss(jax.nn.softmax(z), *ssl.pseudo_labels(
        inputs._replace(logits=z), **options)[::2], ce)
    grad = np.asarray(jax.grad(term)(jnp.asarray(logits)))

  def reference(z):
    p = _softmax(z)
    values = [_ref_ce(y[idx], p[idx], ce) for idx in zip(*np.nonzero(unlabeled))]
    return sum(values) / len(values)

  numeric = np.zeros_like(logits)
  for idx in np.ndindex(logits.shape):
    zp, zm = logits.copy(), logits.copy()
    zp[idx] += 1e-6
    zm[idx] -= 1e-6
    numeric[idx] = (reference(zp) - reference(zm)) / 2e-6
  # The term's gradient is the one with y fixed: the solver gets none.
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)
  assert np.abs(grad[~unlabeled]).max() == 0.0


@pytest.mark.parametrize('overrides, key', [
    ({'ce': 'kl'}, 'ce'), ({'potts': 'tv'}, 'potts'),
    ({'neighbourhood': 'dense', 'potts': 'collision'}, 'potts'),
    ({'iterations': -1}, 'iterations'), ({'step': 0.0}, 'step'),
    ({'step_scale': 'class'}, 'step_scale'),
    ({'neighbourhood': 'dense', 'potts': 'quadratic', 'approx': 'lattice'},
     'approx')])
def test_a_bad_option_fails_at_build_with_one_line(overrides, key):
  config = methods.loss_config({'soft_self_labeling': 1.0},
                               soft_self_labeling=overrides)
  with pytest.raises(ValueError,
                     match=rf'loss_config\.soft_self_labeling\.{key} must be') as error:
    methods.build_loss(config)
  assert '\n' not in str(error.value)


def test_the_preset_and_the_camvid_config_accept_it():
  config = presets.preset('soft_self_labeling')
  # The paper's eta 0.3 and lambda 6 (module docstring): lambda / eta = 20.
  assert dict(config.weights) == {'pce': 1.0, 'soft_self_labeling': 0.3}
  assert config.soft_self_labeling.potts_weight == pytest.approx(20.0)
  assert config.soft_self_labeling.ce == 'collision'
  assert config.soft_self_labeling.potts == 'collision_divergence'
  assert config.soft_self_labeling.neighbourhood == 'grid4'
  camvid = camvid_clicks.get_config(
      'labels=clicks:20,method=soft_self_labeling,size=cpu')
  assert methods.build_loss(camvid.loss).needs.image
  # The trainer's start-up check at the training shape, both neighbourhoods.
  run_spec.training_loss(camvid, 11)
  camvid.loss.soft_self_labeling.neighbourhood = 'dense'
  camvid.loss.soft_self_labeling.potts = 'quadratic'
  run_spec.training_loss(camvid, 11)
  camvid.loss.soft_self_labeling.max_grid_mib = 1.0
  with pytest.raises(ValueError, match='soft_self_labeling.max_grid_mib'):
    run_spec.training_loss(camvid, 11)


def test_the_preset_trains_two_steps_and_records_its_terms(tiny_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.num_train_steps = 2
  config.image_summary_every_steps = 0
  config.eval.scales = (1.0,)
  config.eval.flip = False
  config.loss = presets.preset('soft_self_labeling')
  config.loss.soft_self_labeling.iterations = 3
  scores = trainer.train_and_evaluate(config, str(tmp_path))
  assert scores['step'] == 2 and np.isfinite(scores['miou'])
  tags = test_trainer.read_event_tags(str(tmp_path))
  for term in ('pce', 'soft_self_labeling'):
    assert tags.get(f'train/{term}') == [1, 2], term
