"""The regularized-loss terms (agmm_jax.methods.regularized) through
``methods.build_loss``, against independent references written here from the
formulas (dense N x N kernels, PyTorch's nearest / bilinear / area resizing
by explicit loops, the gated CRF window as a naive loop), plus their presets
training two steps with the tiny config."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib
from agmm_jax import methods
from agmm_jax.train import run_spec
from agmm_jax.train import trainer
from agmm_jax.methods import regularized
from configs import presets
from configs import tiny
from configs import voc_point
from tests.methods import test_bilateral
from tests.train import test_trainer

NUM_CLASSES = 4


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _torch_nearest(x, scale):
  """``F.interpolate(mode='nearest', scale_factor=scale)`` on axes 1, 2."""
  h, w = x.shape[1:3]
  ho, wo = int(h * scale), int(w * scale)
  out = np.zeros((x.shape[0], ho, wo) + x.shape[3:])
  for i in range(ho):
    for j in range(wo):
      out[:, i, j] = x[:, min(int(i / scale), h - 1), min(int(j / scale), w - 1)]
  return out


def _torch_bilinear(x, scale):
  """``F.interpolate(mode='bilinear', align_corners=False,
  scale_factor=scale)`` on axes 1, 2."""
  def weights(n, i):
    src = max((i + 0.5) / scale - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n - 1)
    return i0, min(i0 + 1, n - 1), src - i0

  h, w = x.shape[1:3]
  ho, wo = int(h * scale), int(w * scale)
  out = np.zeros((x.shape[0], ho, wo) + x.shape[3:])
  for i in range(ho):
    y0, y1, ly = weights(h, i)
    for j in range(wo):
      x0, x1, lx = weights(w, j)
      out[:, i, j] = ((1 - ly) * (1 - lx) * x[:, y0, x0]
                      + (1 - ly) * lx * x[:, y0, x1]
                      + ly * (1 - lx) * x[:, y1, x0] + ly * lx * x[:, y1, x1])
  return out


def _ref_rloss(rgb, probs, valid, sigma_xy, sigma_rgb, scale):
  """``[rloss, potts, ncut]`` of a batch, dense float64 numpy."""
  if scale != 1.0:
    rgb, valid = _torch_nearest(rgb, scale), _torch_nearest(valid, scale)
    probs = _torch_bilinear(probs, scale)
  b, _, _, k = probs.shape
  out = np.zeros(3)
  for n in range(b):
    m = valid[n].reshape(-1).astype(np.float64)
    kern = test_bilateral.dense_kernel(rgb[n], sigma_xy * scale, sigma_rgb) * np.outer(m, m)
    s = probs[n].reshape(-1, k) * m[:, None]
    deg = kern @ m
    for c in range(k):
      assoc = s[:, c] @ kern @ s[:, c]
      cut = s[:, c] @ kern @ (m - s[:, c])
      out += [-assoc, cut, cut / (deg @ s[:, c]) if deg @ s[:, c] > 0 else 0.0]
  return out / b


def _ref_gated_crf(rgb, probs, valid, radius, sigma_xy, sigma_rgb, factor):
  """Area pooling by ``factor`` x ``factor`` blocks and the window, by loops;
  ImageNet-normalized colors, both ends gated."""
  b, big_h, big_w, _ = rgb.shape
  h, w = big_h // factor, big_w // factor
  color = np.zeros((b, h, w, 3))
  pooled = np.zeros((b, h, w, probs.shape[-1]))
  mask = np.zeros((b, h, w))
  for n in range(b):
    for i in range(h):
      for j in range(w):
        block = (n, slice(i * factor, (i + 1) * factor),
                 slice(j * factor, (j + 1) * factor))
        color[n, i, j] = rgb[block].mean((0, 1)) / (255.0 * augment.IMAGENET_STD)
        pooled[n, i, j] = probs[block].mean((0, 1))
        mask[n, i, j] = float(valid[block].all())
  total = 0.0
  for n, i, j in np.ndindex(b, h, w):
    for di in range(-radius, radius + 1):
      for dj in range(-radius, radius + 1):
        y, x = i + di, j + dj
        if (di, dj) == (0, 0) or not (0 <= y < h and 0 <= x < w):
          continue
        d2 = ((di ** 2 + dj ** 2) / sigma_xy ** 2
              + ((color[n, i, j] - color[n, y, x]) ** 2).sum() / sigma_rgb ** 2)
        total += mask[n, i, j] * mask[n, y, x] * math.exp(-0.5 * d2) * (
            1.0 - pooled[n, i, j] @ pooled[n, y, x])
  return total / max(mask.sum(), 1.0)


def _numeric_grad(fn, x, eps=1e-6):
  """Central differences of a vector-valued ``fn``: ``[len(fn(x))] + x.shape``."""
  grads = []
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    grads.append((fn(xp) - fn(xm)) / (2 * eps))
  return np.moveaxis(np.array(grads), 0, -1).reshape((-1,) + x.shape)


def _smooth_image(rng, b, h, w):
  """Piecewise-smooth random photo-like image, 0..255, integer valued."""
  coarse = rng.uniform(0, 255, (b, 3, 3, 3))
  ys, xs = np.linspace(0, 2, h), np.linspace(0, 2, w)
  y0 = np.minimum(ys.astype(int), 1)
  x0 = np.minimum(xs.astype(int), 1)
  ly, lx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
  out = ((1 - ly) * (1 - lx) * coarse[:, y0][:, :, x0]
         + (1 - ly) * lx * coarse[:, y0][:, :, x0 + 1]
         + ly * (1 - lx) * coarse[:, y0 + 1][:, :, x0]
         + ly * lx * coarse[:, y0 + 1][:, :, x0 + 1])
  return np.round(np.clip(out + rng.normal(0, 3, out.shape), 0, 255))


def _inputs(rgb, logits, label):
  """LossInputs of a batch; decoder features on the stride-4 grid."""
  b, h, w, k = logits.shape
  return methods.LossInputs(
      logits=jnp.asarray(logits),
      decoder_features=jnp.zeros((b, -(-h // 4), -(-w // 4), 8)),
      label=jnp.asarray(label, jnp.int32),
      class_present=jnp.ones((b, k)),
      image=jnp.asarray(augment.normalize(rgb)))


def _label(rng, b, h, w):
  """Sparse labels with padding: a few labeled pixels, a padded border."""
  label = np.where(rng.uniform(size=(b, h, w)) < 0.1,
                   rng.integers(0, NUM_CLASSES, (b, h, w)), labels_lib.UNLABELED)
  label[0, -3:] = labels_lib.PADDING
  label[1, :, -2:] = labels_lib.PADDING
  return label


def _value_and_grad(config):
  loss = methods.build_loss(config)

  def total(inputs, logits):
    value, terms = loss(inputs._replace(logits=logits))
    return value, terms

  return jax.jit(jax.value_and_grad(total, argnums=1, has_aux=True))


@pytest.mark.parametrize('scale', [1.0, 0.5])
def test_densecrf_and_ncut_exact_match_the_dense_reference(scale):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 8, 10, 3)).astype(np.uint8)
  logits = rng.normal(size=(2, 8, 10, NUM_CLASSES))
  label = _label(rng, 2, 8, 10)
  kernel = {'sigma_xy': 5.0, 'sigma_rgb': 40.0}
  with jax.enable_x64(True):
    inputs = _inputs(rgb, logits, label)
    rgb_seen = np.asarray(inputs.rgb(), np.float64)
    got = []
    for weights, form in (({'densecrf': 1.0}, 'rloss'),
                          ({'densecrf': 1.0}, 'potts'), ({'ncut': 1.0}, None)):
      exact = {**kernel, 'approx': 'exact', 'scale_factor': scale}
      config = methods.loss_config(
          weights, densecrf={**exact, 'form': form or 'rloss'}, ncut=exact)
      (value, terms), grad = _value_and_grad(config)(inputs, inputs.logits)
      assert set(terms) == set(weights)
      got.append((float(value), np.asarray(grad)))
  valid = label != labels_lib.PADDING

  def reference(z):
    return _ref_rloss(rgb_seen, _softmax(z), valid, 5.0, 40.0, scale)

  want = reference(logits)
  want_grad = _numeric_grad(reference, logits)
  for i, (value, grad) in enumerate(got):
    # float64 throughout but LossInputs.rgb(), a float32 round trip of the
    # normalization that XLA may round differently inside the jit (1e-8).
    np.testing.assert_allclose(value, want[i], rtol=1e-7)
    np.testing.assert_allclose(grad, want_grad[i], rtol=1e-5, atol=1e-8)
    if scale == 1.0:
      # (Downscaled, the bilinear softmax of a real pixel next to the padding
      # reads padded pixels, as in rloss.)
      assert np.abs(grad[~valid]).max() == 0.0


def test_densecrf_and_ncut_grid_within_tolerance_of_the_dense_reference():
  """The default cells at 16x16, sigma_xy 8 (scaled: 4) and 100 (50):
  relative error of the value under 5 % (CamVid figures: bilateral.py)."""
  rng = np.random.default_rng(1)
  rgb = _smooth_image(rng, 2, 16, 16).astype(np.uint8)
  logits = 3.0 * np.repeat(np.repeat(
      rng.normal(size=(2, 4, 4, NUM_CLASSES)), 4, axis=1), 4, axis=2)
  label = _label(rng, 2, 16, 16)
  inputs = _inputs(rgb, logits.astype(np.float32), label)
  rgb_seen = np.asarray(inputs.rgb(), np.float64)
  for sigma_xy in (8.0, 100.0):
    kernel = {'sigma_xy': sigma_xy, 'sigma_rgb': 15.0}
    config = methods.loss_config({'densecrf': 1.0, 'ncut': 1.0},
                                 densecrf=kernel, ncut=kernel)
    _, terms = jax.jit(methods.build_loss(config))(inputs)
    want = _ref_rloss(rgb_seen, _softmax(logits), label != labels_lib.PADDING,
                      sigma_xy, 15.0, regularized.RLOSS_SCALE_FACTOR)
    for name, i in (('densecrf', 0), ('ncut', 2)):
      assert abs(float(terms[name]) / want[i] - 1.0) < 0.05, (sigma_xy, name)


def test_gatedcrf_matches_the_naive_loop_and_finite_differences():
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (2, 12, 8, 3)).astype(np.uint8)
  logits = rng.normal(size=(2, 12, 8, NUM_CLASSES))
  label = _label(rng, 2, 12, 8)
  options = {'radius': 2, 'sigma_xy': 1.5, 'sigma_rgb': 0.5, 'downscale': 2}
  config = methods.loss_config({'gatedcrf': 1.0}, gatedcrf=options)
  with jax.enable_x64(True):
    inputs = _inputs(rgb, logits, label)
    (value, _), grad = _value_and_grad(config)(inputs, inputs.logits)
    rgb_seen = np.asarray(inputs.rgb(), np.float64)

  def reference(z):
    return np.array([_ref_gated_crf(rgb_seen, _softmax(z),
                                    label != labels_lib.PADDING, 2, 1.5, 0.5, 2)])

  np.testing.assert_allclose(float(value), reference(logits)[0], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), _numeric_grad(reference, logits)[0],
                             rtol=1e-5, atol=1e-9)


def test_entropy_is_the_mean_over_unlabeled_real_pixels():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 6, NUM_CLASSES)).astype(np.float32)
  label = _label(rng, 2, 5, 6)
  inputs = _inputs(np.zeros((2, 5, 6, 3)), logits, label)
  value, terms = jax.jit(methods.build_loss(
      methods.loss_config({'entropy': 0.5})))(inputs)
  probs = _softmax(logits.astype(np.float64))
  ent = -(probs * np.log(probs)).sum(-1)
  want = ent[label == labels_lib.UNLABELED].mean()
  np.testing.assert_allclose(float(terms['entropy']), want, rtol=1e-5)
  np.testing.assert_allclose(float(value), 0.5 * want, rtol=1e-5)
  assert not methods.build_loss(methods.loss_config({'entropy': 1.0})).needs.image


def test_terms_are_finite_without_labels_with_one_label_and_padding():
  rng = np.random.default_rng(4)
  rgb = rng.integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
  logits = jnp.asarray(rng.normal(size=(2, 12, 12, NUM_CLASSES)), jnp.float32)
  one = np.full((2, 12, 12), labels_lib.UNLABELED)
  one[0, 2, 3] = 1
  padded = np.full((2, 12, 12), labels_lib.PADDING)
  padded[0, :5, :7] = labels_lib.UNLABELED
  cases = {'no labels': np.full_like(one, labels_lib.UNLABELED),
           'one label': one, 'padding': padded,
           'all padding': np.full_like(one, labels_lib.PADDING)}
  config = methods.loss_config(
      {'pce': 1.0, 'densecrf': 1e-3, 'ncut': 1.0, 'gatedcrf': 1.0, 'entropy': 1.0},
      gatedcrf={'radius': 2})
  value_and_grad = _value_and_grad(config)
  for case, label in cases.items():
    inputs = _inputs(rgb, logits, label)
    (value, terms), grad = value_and_grad(inputs, logits)
    assert np.isfinite(float(value)), case
    assert np.isfinite(np.asarray(grad)).all(), case
    assert all(np.isfinite(float(v)) for v in terms.values()), (case, terms)
    if case == 'all padding':
      assert float(value) == 0.0 and np.abs(np.asarray(grad)).max() == 0.0


@pytest.mark.parametrize('overrides, key', [
    ({'densecrf': {'sigma_xy': 0.0}}, 'loss_config.densecrf.sigma_xy'),
    ({'ncut': {'sigma_rgb': -1.0}}, 'loss_config.ncut.sigma_rgb'),
    ({'densecrf': {'form': 'dense'}}, 'loss_config.densecrf.form'),
    ({'densecrf': {'cell_xy': 2.0}}, 'loss_config.densecrf.cell_xy'),
    ({'ncut': {'approx': 'lattice'}}, 'loss_config.ncut.approx'),
    ({'densecrf': {'scale_factor': 0.0}}, 'loss_config.densecrf.scale_factor'),
    ({'gatedcrf': {'radius': 0}}, 'loss_config.gatedcrf.radius'),
    ({'gatedcrf': {'sigma_rgb': 0.0}}, 'loss_config.gatedcrf.sigma_rgb'),
])
def test_a_bad_kernel_option_fails_at_build_with_one_line(overrides, key):
  config = methods.loss_config(
      {'densecrf': 1.0, 'ncut': 1.0, 'gatedcrf': 1.0}, **overrides)
  with pytest.raises(ValueError, match=key.replace('.', r'\.') + ' must be') as error:
    methods.build_loss(config)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('term, extra_channels', [('densecrf', 0), ('ncut', 1)])
def test_a_grid_over_the_memory_limit_fails_at_start_up_with_one_line(
    term, extra_channels):
  """The trainer's loss entry checks one grid buffer at the training shape:
  ``global_batch_size`` images x K (+ the degree for ncut) channels, float32,
  at the crop scaled by ``scale_factor``; nothing is traced."""
  config = tiny.get_config()  # global batch 8
  config.loss = methods.loss_config({term: 1.0})
  config.data.crop_size = 2000
  with pytest.raises(ValueError) as error:
    run_spec.training_loss(config, NUM_CLASSES)
  message = str(error.value)
  assert '\n' not in message
  for field in (f'loss_config.{term}.sigma_xy=100.0', 'config.data.crop_size=2000',
                f'loss_config.{term}.scale_factor=0.5',
                'config.global_batch_size=8',
                f'limit loss_config.{term}.max_grid_mib=2048.0'):
    assert field in message, (field, message)
  cells, images, channels, need = map(int, re.search(
      r'grid of (\d+) cells x (\d+) images x (\d+) channels = (\d+) bytes',
      message).groups())
  assert (images, channels) == (8, NUM_CLASSES + extra_channels)
  assert need == cells * images * channels * 4 > 2048 * 2 ** 20
  # The grid spans at least the scaled crop in cells of cell_xy * sigma_xy
  # (50 x 0.5 scaled pixels) and 0..255 in cells of cell_rgb * sigma_rgb.
  assert cells >= (1000 // 25) ** 2 * (255 // 12) ** 3
  config.loss[term].max_grid_mib = need / 2 ** 20
  run_spec.training_loss(config, NUM_CLASSES)
  config.loss[term].max_grid_mib = 2048.0
  config.loss[term].approx = 'exact'
  run_spec.training_loss(config, NUM_CLASSES)
  config.loss[term].approx = 'grid'
  config.data.crop_size = 321
  run_spec.training_loss(config, NUM_CLASSES)


def test_presets_and_the_method_argument():
  # rloss' --densecrfloss 2e-9 times its lattice's measured gain 0.55.
  weights = dict(presets.preset('pce_densecrf').weights)
  assert weights == {'pce': 1.0, 'densecrf': pytest.approx(2e-9 * 0.55, rel=1e-12)}
  assert dict(presets.preset('pce_ncut').weights) == {'pce': 1.0, 'ncut': 1.0}
  assert dict(presets.preset('pce_gatedcrf').weights) == {'pce': 1.0, 'gatedcrf': 0.1}
  config = voc_point.get_config('method=pce_gatedcrf')
  assert config.loss.gatedcrf.downscale == 4
  assert methods.build_loss(config.loss).needs.image


def test_the_presets_train_two_steps_and_record_their_terms(tiny_data_dir, tmp_path):
  """One training (one compile) with the union of the three presets' weights:
  each term reaches the step through its Needs and is recorded."""
  names = ('pce_densecrf', 'pce_ncut', 'pce_gatedcrf')
  weights = {}
  for name in names:
    weights.update(presets.preset(name).weights)
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.num_train_steps = 2
  config.image_summary_every_steps = 0
  config.eval.scales = (1.0,)
  config.eval.flip = False
  config.loss = methods.loss_config(weights)
  scores = trainer.train_and_evaluate(config, str(tmp_path))
  assert scores['step'] == 2 and np.isfinite(scores['miou'])
  tags = test_trainer.read_event_tags(str(tmp_path))
  for term in ('pce', 'densecrf', 'ncut', 'gatedcrf'):
    assert tags.get(f'train/{term}') == [1, 2], term
