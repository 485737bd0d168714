"""Tests of the AGMM and pCE terms (agmm_jax.methods) against independent references.

References: naive NumPy loops (prototypes, the paper GMM), finite differences
(float64), a PyTorch port of the official AGMM-SASS loss functions
(``references/torch_agmm_loss.py``; released preset, values and gradients) and hand-computed values.
"""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agmm_jax.data import labels as labels_lib
from agmm_jax import methods
from agmm_jax.model import resample
from agmm_jax.methods import agmm
from agmm_jax.methods import pce
from configs import presets
from references.torch_agmm_loss import to_official_mask
from references.torch_agmm_loss import torch_half_pixel_resize
from references.torch_agmm_loss import torch_official_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Label 13 x 17 with stride-4 features 4 x 5, as 321 -> 81 ((H - 1) / 4 + 1).
BATCH, HEIGHT, WIDTH, FEAT_H, FEAT_W, CHANNELS, NUM_CLASSES = 2, 13, 17, 4, 5, 6, 5


def make_batch(rng, *, batch=BATCH, height=HEIGHT, width=WIDTH, feat_h=FEAT_H,
               feat_w=FEAT_W, channels=CHANNELS, num_classes=NUM_CLASSES,
               labeled_fraction=0.15, padding_rows=3, dtype=np.float32):
  """Random batch: sparse labels of a few classes, bottom rows padded.

  class_present marks the labeled classes plus one class that only occurs
  outside the crop, as pre-crop presence can.
  """
  label = np.full((batch, height, width), labels_lib.UNLABELED, np.int32)
  present = np.zeros((batch, num_classes), np.float32)
  for b in range(batch):
    classes = rng.choice(num_classes, size=min(3, num_classes), replace=False)
    labeled = rng.random((height, width)) < labeled_fraction
    label[b][labeled] = rng.choice(classes, size=labeled.sum())
    present[b, np.unique(label[b][label[b] >= 0])] = 1.0
    present[b, rng.integers(num_classes)] = 1.0
  if padding_rows:
    label[:, -padding_rows:, :] = labels_lib.PADDING
  logits = rng.normal(size=(batch, height, width, num_classes)).astype(dtype)
  features = rng.normal(size=(batch, feat_h, feat_w, channels)).astype(dtype)
  return methods.LossInputs(logits, features, label, present)


def as_jax(inputs):
  return methods.LossInputs(*(jnp.asarray(x) for x in inputs[:4]))


def numpy_paper_gmm(inputs, sigma_eps=1e-6, fixed_sigma=None, return_sigma=False):
  """Naive NumPy loops of the paper GMM term as documented in agmm_jax/methods/agmm.py;
  ``fixed_sigma`` ``[B, K]`` replaces the adaptive sigma^2."""
  logits, features, label, present = (np.asarray(x, np.float64) for x in inputs[:4])
  label = label.astype(np.int64)
  batch, height, width, k = logits.shape
  upsampled = torch_half_pixel_resize(features, (height, width))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  squared = np.zeros(features.shape[:3] + (k,))
  gate = np.zeros((batch, k))
  for b in range(batch):
    for c in range(k):
      selected = label[b] == c
      gate[b, c] = float(selected.any())
      mu = upsampled[b][selected].sum(0) / (selected.sum() + 1e-6)
      squared[b, :, :, c] = ((features[b] - mu) ** 2).sum(-1)
  cleaned = probs * present[:, None, None, :]
  unlabeled = (label == labels_lib.UNLABELED)[..., None]
  weights = cleaned * unlabeled
  upsampled_squared = torch_half_pixel_resize(squared, (height, width))
  sigma = (weights * upsampled_squared).sum((1, 2)) / (weights.sum((1, 2)) + sigma_eps)
  if fixed_sigma is not None:
    sigma = fixed_sigma
  response = torch_half_pixel_resize(
      np.exp(-squared / (2 * sigma[:, None, None, :] + 1e-6)), (height, width))
  response = response * gate[:, None, None, :]
  one_hot = (label[..., None] == np.arange(k)).astype(np.float64)

  def bce(t, q):
    value = -(t * np.log(q + 1e-6) + (1 - t) * np.log(1 - q + 1e-6)) / 2
    return (value * gate[:, None, None, :]).sum(-1) / (gate.sum(-1)[:, None, None] + 1e-6)

  real = label != labels_lib.PADDING
  labeled = label >= 0
  value = bce(response, probs)[real].mean() + bce(one_hot, response)[labeled].mean()
  return (value, sigma) if return_sigma else value


def value_and_grads(loss_config):
  """jit(value_and_grad) of the total over (logits, features), with aux."""
  loss_fn = methods.build_loss(loss_config)

  def total(logits, features, label, present):
    return loss_fn(methods.LossInputs(logits, features, label, present))

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope='module')
def batch():
  return make_batch(np.random.default_rng(0))


def test_interpolation_matrix_matches_torch():
  rng = np.random.default_rng(1)
  for in_size, out_size in ((4, 13), (13, 4), (81, 321), (5, 5)):
    x = rng.normal(size=(1, in_size, 3, 1))
    expected = torch_half_pixel_resize(x, (out_size, 3))
    matrix = resample.half_pixel_interpolation_matrix(in_size, out_size)
    np.testing.assert_allclose(np.einsum('oh,bhwc->bowc', matrix, x), expected, atol=1e-12)


def test_resize_and_its_gradient_match_the_dense_matrices():
  """The gather-based resize equals torch's bilinear resize and its VJP is
  R_h^T y R_w."""
  rng = np.random.default_rng(5)
  for (in_h, in_w), (out_h, out_w) in (((4, 5), (13, 17)), ((13, 17), (4, 5)),
                                       ((21, 21), (81, 81)), ((5, 6), (5, 6))):
    x = rng.normal(size=(2, in_h, in_w, 3))
    y = rng.normal(size=(2, out_h, out_w, 3))
    rows = resample.half_pixel_interpolation_matrix(in_h, out_h)
    cols = resample.half_pixel_interpolation_matrix(in_w, out_w)
    with jax.enable_x64(True):
      resized, vjp = jax.vjp(lambda v: resample.resize_bilinear_half_pixel(v, (out_h, out_w)),
                             jnp.asarray(x))
      np.testing.assert_allclose(resized, torch_half_pixel_resize(x, (out_h, out_w)),
                                 atol=1e-12)
      np.testing.assert_allclose(vjp(jnp.asarray(y))[0],
                                 np.einsum('oh,pw,bopc->bhwc', rows, cols, y), atol=1e-12)


def test_row_chunk_resize_and_its_adjoint_match_the_dense_matrices():
  """Rows [start, start + rows) of the upsampling, and their pull-down onto
  the source grid, equal the same rows of R_h x R_w^T and R_h^T y R_w."""
  rng = np.random.default_rng(6)
  in_h, in_w, out_h, out_w = 4, 5, 13, 17
  rows_matrix = resample.half_pixel_interpolation_matrix(in_h, out_h)
  cols_matrix = resample.half_pixel_interpolation_matrix(in_w, out_w)
  x = rng.normal(size=(2, in_h, in_w, 3))
  with jax.enable_x64(True):
    for start, rows in ((0, 5), (3, 4), (8, 5), (0, 13)):
      y = rng.normal(size=(2, rows, out_w, 3))
      band = rows_matrix[start:start + rows]
      upsampled = resample.upsample_rows(resample.upsample_columns(jnp.asarray(x), out_w),
                                        jnp.asarray(start), rows, out_h)
      np.testing.assert_allclose(upsampled, np.einsum('oh,pw,bhwc->bopc', band, cols_matrix, x),
                                 atol=1e-12)
      accumulator = rng.normal(size=(2, in_h, out_w, 3))
      half_pulled = resample.add_pulled_rows(jnp.asarray(accumulator), jnp.asarray(y),
                                            jnp.asarray(start), out_h)
      np.testing.assert_allclose(
          half_pulled, accumulator + np.einsum('oh,bopc->bhpc', band, y), atol=1e-12)
      np.testing.assert_allclose(
          resample.pull_columns(half_pulled - accumulator, in_w),
          np.einsum('oh,pw,bopc->bhwc', band, cols_matrix, y), atol=1e-12)


def test_class_prototypes_match_naive_loop(batch):
  prototypes, counts = jax.jit(agmm.class_prototypes, static_argnums=2)(
      batch.decoder_features, batch.label, NUM_CLASSES)
  upsampled = torch_half_pixel_resize(batch.decoder_features, (HEIGHT, WIDTH))
  for b in range(BATCH):
    for k in range(NUM_CLASSES):
      selected = batch.label[b] == k
      expected = upsampled[b][selected].sum(0) / (selected.sum() + 1e-6)
      assert counts[b, k] == selected.sum()
      np.testing.assert_allclose(prototypes[b, k], expected, rtol=1e-5, atol=1e-6)


def test_mean_abs_distance_gradient_matches_autodiff_of_naive_form():
  """Images with different numbers of active classes (none, some, all)."""
  rng = np.random.default_rng(2)
  features = jnp.asarray(rng.normal(size=(4, 7, 4)))
  prototypes = jnp.asarray(rng.normal(size=(4, 3, 4)))
  weights = jnp.asarray(rng.normal(size=(4, 7, 3)))
  active = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])

  def naive(f, mu):
    distance = jnp.mean(jnp.abs(f[:, :, None] - mu[:, None]), -1) * active[:, None, :]
    return jnp.sum(weights * distance)

  def custom(f, mu):
    return jnp.sum(weights * agmm.mean_abs_distance(f, mu, active))

  np.testing.assert_allclose(custom(features, prototypes), naive(features, prototypes),
                             rtol=1e-6)

  expected = jax.grad(naive, argnums=(0, 1))(features, prototypes)
  actual = jax.grad(custom, argnums=(0, 1))(features, prototypes)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_paper_moments_gradient_matches_autodiff_of_naive_form():
  """The written-out VJP of the paper form's (prototypes, squared distances)
  against autodiff of the direct [B, P, K, C] difference, with cotangents on
  both outputs; image 1's class 0 is one grid point's feature, so its distance
  there is 0 (the clamp)."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    features = jnp.asarray(rng.normal(size=(2, 3, 4, 5)))
    pulled = rng.uniform(size=(2, 3, 4, 3)) * (rng.uniform(size=(2, 3, 4, 3)) < 0.5)
    pulled[1, :, :, 0] = 0.0
    pulled[1, 2, 1, 0] = 1.0
    pulled[0, :, :, 2] = 0.0  # a class without labels: mu = 0
    pulled = jnp.asarray(pulled)
    inverse_counts = 1.0 / (jnp.sum(pulled, axis=(1, 2)) + 1e-6)
    inverse_counts = inverse_counts.at[1, 0].set(1.0)
    prototypes_weights = jnp.asarray(rng.normal(size=(2, 3, 5)))
    distance_weights = jnp.asarray(rng.normal(size=(2, 3, 4, 3)))

    def naive(f):
      mu = jnp.einsum('bhwk,bhwc->bkc', pulled, f) * inverse_counts[..., None]
      distance = jnp.sum(jnp.square(f[:, :, :, None, :] - mu[:, None, None]), axis=-1)
      return jnp.sum(prototypes_weights * mu) + jnp.sum(distance_weights * distance)

    def custom(f):
      mu, distance = agmm._prototypes_and_squared_distances(f, pulled, inverse_counts)
      return jnp.sum(prototypes_weights * mu) + jnp.sum(distance_weights * distance)

    mu, distance = agmm._prototypes_and_squared_distances(features, pulled, inverse_counts)
    assert abs(float(distance[1, 2, 1, 0])) < 1e-12
    np.testing.assert_allclose(custom(features), naive(features), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(custom)(features), jax.grad(naive)(features),
                               rtol=1e-8, atol=1e-10)


def test_released_preset_matches_torch_port(batch):
  torch = pytest.importorskip('torch')
  with jax.enable_x64(True):
    inputs64 = methods.LossInputs(batch.logits.astype(np.float64),
                                 batch.decoder_features.astype(np.float64),
                                 batch.label, batch.class_present.astype(np.float64))
    (total, values), (logits_grad, features_grad) = value_and_grads(
        presets.preset('agmm_released'))(*as_jax(inputs64)[:4])
    total, logits_grad, features_grad = (np.asarray(x) for x in (total, logits_grad, features_grad))
    values = {name: float(v) for name, v in values.items()}
  logits = torch.tensor(inputs64.logits.transpose(0, 3, 1, 2), requires_grad=True)
  features = torch.tensor(inputs64.decoder_features.transpose(0, 3, 1, 2), requires_grad=True)
  expected = torch_official_loss(
      logits, features, torch.from_numpy(to_official_mask(batch.label, NUM_CLASSES)),
      torch.from_numpy(inputs64.class_present), NUM_CLASSES)
  expected_total = sum(expected.values())
  expected_total.backward()
  assert set(values) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(values[name], value.item(), rtol=1e-10, err_msg=name)
  np.testing.assert_allclose(total, expected_total.item(), rtol=1e-10)
  np.testing.assert_allclose(logits_grad, logits.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(features_grad, features.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-8, atol=1e-12)


def test_paper_gmm_matches_naive_numpy(batch):
  with jax.enable_x64(True):
    inputs64 = as_jax(methods.LossInputs(batch.logits.astype(np.float64),
                                        batch.decoder_features.astype(np.float64),
                                        batch.label, batch.class_present.astype(np.float64)))
    value = float(jax.jit(lambda x: agmm.gmm_loss(x, form='paper'))(inputs64))
  np.testing.assert_allclose(value, numpy_paper_gmm(batch), rtol=1e-9)


def test_paper_gradient_with_stopped_sigma_matches_finite_differences(batch):
  """The default paper form stops sigma's gradient, and its sigma weights come
  from the softmax pass that the label-grid terms share: its gradient must be
  that of the NumPy reference with sigma^2 frozen at its value."""
  with jax.enable_x64(True):
    inputs64 = as_jax(methods.LossInputs(batch.logits.astype(np.float64),
                                        batch.decoder_features.astype(np.float64),
                                        batch.label, batch.class_present.astype(np.float64)))

    def loss(logits, features):
      return agmm.gmm_loss(inputs64._replace(logits=logits, decoder_features=features),
                             form='paper')

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs64.logits, inputs64.decoder_features)
  _, sigma = numpy_paper_gmm(batch, return_sigma=True)
  rng = np.random.default_rng(8)
  step = 1e-6
  for _ in range(3):
    directions = [rng.normal(size=batch.logits.shape),
                  rng.normal(size=batch.decoder_features.shape)]

    def frozen(sign, directions=directions):
      return numpy_paper_gmm(batch._replace(
          logits=batch.logits.astype(np.float64) + sign * step * directions[0],
          decoder_features=batch.decoder_features.astype(np.float64)
          + sign * step * directions[1]), fixed_sigma=sigma)

    numeric = (frozen(1.0) - frozen(-1.0)) / (2 * step)
    analytic = sum(float(np.vdot(g, d)) for g, d in zip(grads, directions))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_values_and_gradients_do_not_depend_on_the_row_chunks(batch):
  """The label-resolution loops give the same values and gradients for one
  chunk, chunks that divide the height, and chunks that do not (HEIGHT = 13:
  rows 5 leave a last chunk overlapping the previous one), with and without
  a gradient through the paper's sigma (the released form's sigma is fixed:
  one setting)."""
  for preset, sigma_stop_gradient in (('agmm_released', True),
                                      ('agmm_paper', True),
                                      ('agmm_paper', False)):
    results = {}
    for rows in (1, 5, HEIGHT, 64):
      config = presets.preset(preset)
      config.rows_per_chunk = rows
      config.gmm.sigma_stop_gradient = sigma_stop_gradient
      results[rows] = value_and_grads(config)(*as_jax(batch)[:4])
    (reference, reference_values), reference_grads = results[HEIGHT]
    for rows, ((total, values), grads) in results.items():
      message = f'{preset} sigma_stop_gradient={sigma_stop_gradient} rows={rows}'
      np.testing.assert_allclose(total, reference, rtol=1e-6, err_msg=message)
      for name in values:
        np.testing.assert_allclose(values[name], reference_values[name], rtol=1e-6,
                                   err_msg=f'{message} {name}')
      for grad, reference_grad in zip(grads, reference_grads):
        np.testing.assert_allclose(grad, reference_grad, rtol=1e-5, atol=1e-8,
                                   err_msg=message)


def test_combined_terms_equal_the_terms_one_by_one(batch):
  """build_loss evaluates pce, absent_class and gmm in one pass; each value and
  the gradient of the weighted total equal those of the registered terms
  called separately."""
  config = presets.preset('agmm_paper')
  config.weights.absent_class = 0.5
  config.weights.gmm = 2.0
  (total, values), grads = value_and_grads(config)(*as_jax(batch)[:4])
  terms = {'pce': pce.partial_cross_entropy, 'absent_class': pce.absent_class_loss,
           'gmm': functools.partial(agmm.gmm_loss, form='paper'),
           'prototype': functools.partial(agmm.prototype_loss, batch_reduction='mean')}

  def separate_total(logits, features):
    inputs = as_jax(batch)._replace(logits=logits, decoder_features=features)
    return sum(float(config.weights[name]) * term(inputs) for name, term in terms.items())

  inputs = as_jax(batch)
  for name, term in terms.items():
    np.testing.assert_allclose(values[name], term(inputs), rtol=1e-6, err_msg=name)
  expected_grads = jax.grad(separate_total, argnums=(0, 1))(inputs.logits,
                                                           inputs.decoder_features)
  np.testing.assert_allclose(total, separate_total(inputs.logits, inputs.decoder_features),
                             rtol=1e-6)
  for grad, expected in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_hand_computed_values():
  # Zero logits: softmax is 1/K everywhere.
  num_classes = 4
  label = np.array([[[0, labels_lib.UNLABELED], [2, labels_lib.PADDING]]], np.int32)
  present = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
  # Features on the label grid (identity resize), one channel pair per class.
  features = np.zeros((1, 2, 2, 2), np.float32)
  features[0, 0, 0] = [1.0, 3.0]   # class 0
  features[0, 1, 0] = [2.0, 0.0]   # class 2
  inputs = as_jax(methods.LossInputs(np.zeros((1, 2, 2, num_classes), np.float32),
                                    features, label, present))
  # pCE over the 2 labeled pixels: -log(1/4).
  np.testing.assert_allclose(pce.partial_cross_entropy(inputs), math.log(4), rtol=1e-6)
  # Absent classes 1, 3 on the 3 real pixels: -2 log(1 - 1/4 + 1e-6).
  np.testing.assert_allclose(pce.absent_class_loss(inputs),
                             -2 * math.log(0.75 + 1e-6), rtol=1e-6)
  # Prototypes [1, 3] (class 0) and [2, 0] (class 2), scaled by 1 / (1 + 1e-6)
  # (one pixel each) and by the batch factor n / (n + 1e-6) with n = 1; the
  # mean |difference| is (1 + 3) / 2 = 2 before scaling; one pair.
  scale = 1.0 / (1.0 + 1e-6) ** 2
  expected = math.exp(-(2.0 * scale) ** 2) / (1 + 1e-6)
  np.testing.assert_allclose(agmm.prototype_loss(inputs), expected, rtol=1e-6)


def test_permuting_classes_permutes_outputs_and_keeps_the_loss(batch):
  permutation = np.array([3, 0, 4, 1, 2])  # new class i is old class permutation[i]
  inverse = np.argsort(permutation)
  label = np.where(batch.label >= 0, inverse[np.maximum(batch.label, 0)], batch.label)
  permuted = methods.LossInputs(batch.logits[..., permutation], batch.decoder_features,
                               label.astype(np.int32), batch.class_present[:, permutation])
  prototypes_fn = jax.jit(agmm.class_prototypes, static_argnums=2)
  prototypes, counts = prototypes_fn(batch.decoder_features, batch.label, NUM_CLASSES)
  permuted_prototypes, permuted_counts = prototypes_fn(
      permuted.decoder_features, permuted.label, NUM_CLASSES)
  np.testing.assert_allclose(permuted_prototypes, prototypes[:, permutation], rtol=1e-6)
  np.testing.assert_array_equal(permuted_counts, counts[:, permutation])
  for form in agmm.GMM_FORMS:
    responses_fn = jax.jit(functools.partial(agmm.gmm_response, form=form,
                                                 sigma_stop_gradient=True))
    np.testing.assert_allclose(responses_fn(as_jax(permuted)),
                               responses_fn(as_jax(batch))[..., permutation],
                               rtol=1e-5, atol=1e-7, err_msg=form)
  for preset in ('agmm_released', 'agmm_paper'):
    loss_fn = jax.jit(methods.build_loss(presets.preset(preset)))
    total, values = loss_fn(as_jax(batch))
    permuted_total, permuted_values = loss_fn(as_jax(permuted))
    np.testing.assert_allclose(permuted_total, total, rtol=1e-5)
    for name in values:
      np.testing.assert_allclose(permuted_values[name], values[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize('preset', ['agmm_released', 'agmm_paper'])
def test_gradients_match_finite_differences(preset):
  config = presets.preset(preset)
  # Finite differences see sigma's dependence on the inputs.
  config.gmm.sigma_stop_gradient = False
  rng = np.random.default_rng(3)
  batch = make_batch(rng, batch=2, height=7, width=9, feat_h=2, feat_w=3, channels=3,
                     num_classes=4, labeled_fraction=0.3, padding_rows=2,
                     dtype=np.float64)
  with jax.enable_x64(True):
    batch = as_jax(batch._replace(class_present=batch.class_present.astype(np.float64)))
    loss_fn = methods.build_loss(config)

    def total(logits, features):
      return loss_fn(batch._replace(logits=logits, decoder_features=features))[0]

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(batch.logits, batch.decoder_features)
    total = jax.jit(total)
    step = 1e-6
    point = (batch.logits, batch.decoder_features)
    for _ in range(3):
      directions = [jnp.asarray(rng.normal(size=x.shape)) for x in point]
      plus = total(*(x + step * d for x, d in zip(point, directions)))
      minus = total(*(x - step * d for x, d in zip(point, directions)))
      numeric = float(plus - minus) / (2 * step)
      analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, directions))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def _edge_case(name):
  rng = np.random.default_rng(4)
  if name == 'image_without_labels':
    batch = make_batch(rng)
    batch.label[0][batch.label[0] >= 0] = labels_lib.UNLABELED
  elif name == 'batch_without_labels':
    batch = make_batch(rng, labeled_fraction=0.0)
  elif name == 'class_with_one_pixel':
    batch = make_batch(rng, labeled_fraction=0.0)
    batch.label[:, 2, 3] = 1
    batch.label[0, 5, 5] = 4
  elif name == 'almost_all_padding':
    batch = make_batch(rng, padding_rows=HEIGHT - 1)
    batch.label[:, :, 1:] = labels_lib.PADDING
    batch.label[:, 0, 0] = 2
  elif name == 'many_classes':
    batch = make_batch(rng, num_classes=150, labeled_fraction=0.5)
  else:
    raise ValueError(name)
  return batch


EDGE_CASES = ('image_without_labels', 'batch_without_labels', 'class_with_one_pixel',
              'almost_all_padding', 'many_classes')


@pytest.mark.parametrize('preset', ['agmm_released', 'agmm_paper'])
def test_edge_cases_give_finite_values_and_gradients(preset):
  step_fn = value_and_grads(presets.preset(preset))
  for case in EDGE_CASES:
    batch = _edge_case(case)
    (total, values), grads = step_fn(*as_jax(batch)[:4])
    assert np.isfinite(total), (case, values)
    for name, value in values.items():
      assert np.isfinite(value), (case, name)
    for grad in grads:
      assert np.all(np.isfinite(grad)), case
    if case == 'batch_without_labels':
      assert values['pce'] == 0.0
      assert values['prototype'] == 0.0
    if case == 'many_classes':
      assert np.any(np.asarray(grads[1]) != 0)


def test_bfloat16_inputs_compute_in_float32(batch):
  loss_fn = jax.jit(methods.build_loss(presets.preset('agmm_released')))
  low = methods.LossInputs(jnp.asarray(batch.logits, jnp.bfloat16),
                          jnp.asarray(batch.decoder_features, jnp.bfloat16),
                          jnp.asarray(batch.label), jnp.asarray(batch.class_present))
  total, _ = loss_fn(low)
  reference, _ = loss_fn(low._replace(logits=low.logits.astype(jnp.float32),
                                     decoder_features=low.decoder_features.astype(jnp.float32)))
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(total, reference, rtol=1e-6)


def test_presets_and_config_errors(batch):
  pce_only = methods.build_loss(presets.preset('pce_only'))
  total, values = pce_only(as_jax(batch))
  assert set(values) == {'pce'}
  np.testing.assert_allclose(total, pce.partial_cross_entropy(as_jax(batch)), rtol=1e-6)
  config = presets.preset('agmm_released')
  config.weights.prototype = 0.5
  total, values = jax.jit(methods.build_loss(config))(as_jax(batch))
  expected = (values['pce'] + values['absent_class'] + 0.5 * values['prototype']
              + values['gmm'])
  np.testing.assert_allclose(total, expected, rtol=1e-6)

  bad_overrides = [  # (config block, key, value, expected error)
      ('weights', 'crf', 1.0, 'loss_config.weights.crf'),
      ('gmm', 'form', 'cvpr', 'loss_config.gmm.form'),
      ('gmm', 'sigma', 2.0, 'loss_config.gmm'),
      (None, 'rows_per_chunk', 0, 'loss_config.rows_per_chunk'),
      ('prototype', 'moments', 'precomputed', 'loss_config.prototype.moments'),
  ]
  for block, key, value, message in bad_overrides:
    bad = presets.preset('agmm_released')
    setattr(bad if block is None else bad[block], key, value)
    with pytest.raises(ValueError, match=message):
      methods.build_loss(bad)
  inputs = as_jax(batch)
  released_moments = agmm.feature_moments(inputs.decoder_features, inputs.label,
                                            inputs.logits.shape[-1])
  with pytest.raises(ValueError, match='squared_distance=True'):
    agmm.gmm_feature_response(inputs, form='paper', sigma_stop_gradient=True,
                              moments=released_moments)
  with pytest.raises(ValueError, match='unknown loss preset'):
    presets.preset('agmm')
  with pytest.raises(ValueError, match='LossInputs.label'):
    pce.partial_cross_entropy(as_jax(batch._replace(label=batch.label[:, :-1])))


def test_registry_plugs_in_new_terms(batch):
  assert {'pce', 'absent_class', 'prototype', 'gmm'} <= set(methods.registered_terms())
  name = 'test_only_mean_logit'
  if name not in methods.registered_terms():
    @methods.register_term(name)
    def mean_logit(inputs, *, scale=1.0):
      return scale * jnp.mean(inputs.logits)
  with pytest.raises(ValueError, match='already registered'):
    methods.register_term(name)(lambda inputs: 0.0)
  config = ml_collections.ConfigDict({'weights': {name: 2.0}, name: {'scale': 3.0}})
  total, values = methods.build_loss(config)(as_jax(batch))
  np.testing.assert_allclose(values[name], 3.0 * batch.logits.mean(), rtol=1e-5)
  np.testing.assert_allclose(total, 6.0 * batch.logits.mean(), rtol=1e-5)


SHARDED_LOSS_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, '.')
from agmm_jax import methods
from configs import presets
from references.torch_agmm_loss import to_official_mask
from references.torch_agmm_loss import torch_half_pixel_resize
from references.torch_agmm_loss import torch_official_loss
from tests.methods.test_agmm import make_batch
inputs = make_batch(np.random.default_rng(0), batch=8, height=33, width=33, feat_h=9,
                    feat_w=9, channels=8)
mesh = Mesh(np.array(jax.devices()), ('data',))
for preset in ('agmm_released', 'agmm_paper'):
  loss_fn = methods.build_loss(presets.preset(preset))
  def total(logits, features, label, present):
    return loss_fn(methods.LossInputs(logits, features, label, present))[0]
  step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
  sharded = [jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec('data')))
             for x in inputs[:4]]
  hlo = step.lower(*sharded).compile().as_text()
  gathers = [line.strip() for line in hlo.splitlines() if ' all-gather(' in line]
  assert not gathers, (preset, gathers[:3])
  (value, grads) = step(*sharded)
  (expected, expected_grads) = step(*[jnp.asarray(x) for x in inputs[:4]])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
  print(preset, 'ok')
"""


def test_losses_stay_data_parallel_under_a_sharded_batch():
  """Batch sharded over 4 devices: the compiled loss gathers no device's
  images onto another (no all-gather; only scalar and [K, C] all-reduces) and
  equals the single-device loss and gradients."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-c', SHARDED_LOSS_SCRIPT], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert 'agmm_released ok' in result.stdout and 'agmm_paper ok' in result.stdout
