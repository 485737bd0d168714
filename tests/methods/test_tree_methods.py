"""The tree methods (agmm_jax.methods.tel and apro) against references written
here: scipy's MST of the grid, dense path products (shortest paths of
``-log w``) and path maxima (BFS) for the filters, a window loop for the
local propagation, then the L1 formula; finite differences in float64 for
TEL's gradient; two training steps of both terms with the tiny config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse
from scipy.sparse import csgraph

from agmm_jax.data import labels as labels_lib
from agmm_jax import methods
from agmm_jax.train import trainer
from agmm_jax.methods import apro
from agmm_jax.methods import tel
from configs import presets
from configs import tiny
from tests.train import test_trainer
from tests.methods.test_spanning_tree import _naive_local
from tests.methods.test_spanning_tree import _path_stats

_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])
# A 9 x 9 crop at tree stride 2: a 5 x 5 tree grid.
BATCH, SIZE, STRIDE, GRID, NUM_CLASSES, EMBED = 2, 9, 2, 5, 3, 4
APRO_OPTIONS = dict(zeta_global_image=0.5, zeta_global_prediction=0.3, zeta_local=0.8,
                    local_radius=1, local_iterations=3, tree_stride=STRIDE)
TEL_OPTIONS = dict(sigma=0.5, tree_stride=STRIDE)


def _inputs(seed, label=None, dtype=np.float32):
  rng = np.random.default_rng(seed)
  if label is None:
    label = np.full((BATCH, SIZE, SIZE), labels_lib.UNLABELED, np.int32)
    label[:, 0, 2] = 1
    label[0, 4, 4] = 2
    label[:, -2:] = labels_lib.PADDING
  return methods.LossInputs(
      logits=jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, NUM_CLASSES)), dtype),
      decoder_features=jnp.zeros((BATCH, GRID, GRID, 8), dtype),
      label=jnp.asarray(label), class_present=jnp.zeros((BATCH, NUM_CLASSES), np.float32),
      image=jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, 3)), np.float32),
      outputs={tel.EMBEDDING_HEAD: jnp.asarray(
          0.5 * rng.normal(size=(BATCH, GRID, GRID, EMBED)), dtype)})


def _grid_mst(x):
  """The sorted-pair edge list of the MST of ``x`` ``[h, w, D]`` (scipy; random
  inputs, so no equal costs)."""
  h, w, _ = x.shape
  ids = np.arange(h * w).reshape(h, w)
  src = np.concatenate([ids[:-1].ravel(), ids[:, :-1].ravel()])
  dst = np.concatenate([ids[1:].ravel(), ids[:, 1:].ravel()])
  flat = x.reshape(h * w, -1)
  cost = np.sum((flat[src] - flat[dst])**2, axis=-1) + 1.0  # scipy drops zeros
  mst = csgraph.minimum_spanning_tree(
      sparse.coo_matrix((cost, (src, dst)), shape=(h * w, h * w))).tocoo()
  return [tuple(sorted(e)) for e in zip(mst.row.tolist(), mst.col.tolist())]


def _path_products(edges, num_nodes, weight):
  """``S_ij``: the product of ``weight[e]`` over the tree path, all pairs."""
  rows, cols = np.array(edges).T
  lengths = np.array([-np.log(weight[e]) for e in edges])
  graph = sparse.coo_matrix((lengths, (rows, cols)), shape=(num_nodes, num_nodes))
  return np.exp(-csgraph.shortest_path(graph, directed=False))


def _softmax_grid(inputs):
  logits = np.asarray(inputs.logits, np.float64)[:, ::STRIDE, ::STRIDE]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).reshape(BATCH, GRID * GRID, NUM_CLASSES)


def _unlabeled_l1(p, target, inputs):
  unlabeled = (np.asarray(inputs.label)[:, ::STRIDE, ::STRIDE] == -1).reshape(BATCH, -1)
  return np.sum(unlabeled[..., None] * np.abs(p - target)) / max(unlabeled.sum(), 1)


def _reference_tel(inputs, sigma):
  image = np.asarray(inputs.image, np.float64)[:, ::STRIDE, ::STRIDE]
  rgb = image * _STD + _MEAN  # = rgb / 255
  embedding = np.asarray(inputs.outputs[tel.EMBEDDING_HEAD], np.float64)
  p = _softmax_grid(inputs)
  filtered = np.zeros_like(p)
  for b in range(BATCH):
    x = p[b]
    for features, bandwidth in ((rgb[b], sigma), (embedding[b], 1.0)):
      flat = features.reshape(GRID * GRID, -1)
      edges = _grid_mst(features)
      s = _path_products(edges, GRID * GRID, {
          (u, v): np.exp(-np.sum((flat[u] - flat[v])**2) / bandwidth) for u, v in edges})
      x = s @ x / s.sum(1, keepdims=True)
    filtered[b] = x
  return _unlabeled_l1(p, filtered, inputs), filtered


def _reference_apro(inputs, options):
  image = np.asarray(inputs.image, np.float64)[:, ::STRIDE, ::STRIDE]
  p = _softmax_grid(inputs)
  y_global = np.zeros_like(p)
  for b in range(BATCH):
    edges = _grid_mst(image[b])
    x = p[b]
    for embedding, zeta in ((image[b].reshape(GRID * GRID, 3), options['zeta_global_image']),
                            (None, options['zeta_global_prediction'])):
      embedding = x if embedding is None else embedding
      distance = {(u, v): np.sum((embedding[u] - embedding[v])**2) for u, v in edges}
      affinity = np.exp(-_path_stats(edges, GRID * GRID, distance, max, 0.0) / zeta**2)
      x = affinity @ x / affinity.sum(1, keepdims=True)  # A_ii = 1
    y_global[b] = x
  y_local = _naive_local(
      p.reshape(BATCH, GRID, GRID, NUM_CLASSES), image, options['zeta_local'],
      options['local_radius'], options['local_iterations'], None).reshape(p.shape)
  return (_unlabeled_l1(p, y_global, inputs) + _unlabeled_l1(p, y_local, inputs),
          y_global, y_local)


def _tel_loss(logits, embedding, inputs):
  return tel.tree_energy_loss(
      inputs._replace(logits=logits, outputs={tel.EMBEDDING_HEAD: embedding}), **TEL_OPTIONS)


@pytest.fixture(scope='module')
def tel_value_and_grad():
  return jax.jit(jax.value_and_grad(_tel_loss, argnums=(0, 1)))


@pytest.fixture(scope='module')
def apro_value_and_grad():
  return jax.jit(jax.value_and_grad(
      lambda logits, inputs: apro.affinity_propagation_loss(
          inputs._replace(logits=logits), **APRO_OPTIONS)))


def test_tel_matches_the_reference(tel_value_and_grad):
  inputs = _inputs(0)
  value, _ = tel_value_and_grad(inputs.logits, inputs.outputs[tel.EMBEDDING_HEAD], inputs)
  expected, expected_filtered = _reference_tel(inputs, TEL_OPTIONS['sigma'])
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  # The summary map is AS at label resolution, so AS on the grid's pixels.
  response = jax.jit(functools.partial(tel.filtered_response, **TEL_OPTIONS))(inputs)
  assert response.shape == inputs.logits.shape
  np.testing.assert_allclose(
      np.asarray(response[:, ::STRIDE, ::STRIDE]).reshape(expected_filtered.shape),
      expected_filtered, atol=1e-5)


def test_apro_matches_the_reference_and_its_pseudo_labels_are_detached(apro_value_and_grad):
  inputs = _inputs(1)
  value, grad = apro_value_and_grad(inputs.logits, inputs)
  expected, expected_global, expected_local = _reference_apro(inputs, APRO_OPTIONS)
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  grid, y_global, y_local = jax.jit(functools.partial(apro.pseudo_labels, **APRO_OPTIONS))(inputs)
  np.testing.assert_allclose(np.asarray(y_global).reshape(expected_global.shape),
                             expected_global, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_local).reshape(expected_local.shape),
                             expected_local, atol=1e-5)
  # No gradient through the pseudo-labels: the gradient is that of the L1
  # terms with the pseudo-labels held fixed.
  def fixed_targets(logits):
    p = tel.tree_grid(inputs._replace(logits=logits), STRIDE).probabilities
    return (tel.unlabeled_l1(p, y_global, grid.unlabeled)
            + tel.unlabeled_l1(p, y_local, grid.unlabeled))
  np.testing.assert_allclose(grad, jax.grad(fixed_targets)(inputs.logits), atol=1e-7)


def test_tel_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    inputs = _inputs(2, dtype=np.float64)
    embedding = inputs.outputs[tel.EMBEDDING_HEAD]
    value_and_grad = jax.jit(jax.value_and_grad(_tel_loss, argnums=(0, 1)))
    _, grads = value_and_grad(inputs.logits, embedding, inputs)
    assert grads[0].dtype == np.float64
    assert np.abs(grads[1]).max() > 1e-6  # the embedding does get a gradient
    rng = np.random.default_rng(3)
    eps = 1e-6
    for argnum, x in enumerate((inputs.logits, embedding)):
      for _ in range(3):
        direction = jnp.asarray(rng.normal(size=x.shape))
        shifted = [list((inputs.logits, embedding)) for _ in range(2)]
        shifted[0][argnum] = x + eps * direction
        shifted[1][argnum] = x - eps * direction
        numeric = (value_and_grad(*shifted[0], inputs)[0]
                   - value_and_grad(*shifted[1], inputs)[0]) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grads[argnum], direction), numeric,
                                   rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('case', ['no_labeled_pixel', 'one_labeled_pixel', 'all_padding'])
def test_finite_without_labels_or_pixels(case, tel_value_and_grad, apro_value_and_grad):
  label = np.full((BATCH, SIZE, SIZE), labels_lib.UNLABELED, np.int32)
  if case == 'one_labeled_pixel':
    label[0, 2, 2] = 0
  if case == 'all_padding':
    label[:] = labels_lib.PADDING
  inputs = _inputs(4, label=label)
  tel_value, tel_grads = tel_value_and_grad(
      inputs.logits, inputs.outputs[tel.EMBEDDING_HEAD], inputs)
  apro_value, apro_grad = apro_value_and_grad(inputs.logits, inputs)
  for x in (tel_value, apro_value, apro_grad) + tuple(tel_grads):
    assert np.all(np.isfinite(x))
  if case == 'all_padding':
    assert tel_value == 0 and apro_value == 0
    assert not np.any(apro_grad) and not np.any(tel_grads[0])


def test_missing_inputs_and_bad_options_fail_with_one_line():
  inputs = _inputs(5)
  for term, options in (('tel', TEL_OPTIONS), ('apro', APRO_OPTIONS)):
    with pytest.raises(ValueError, match=f"loss term '{term}' needs the input image"):
      methods.get_term(term).fn(inputs._replace(image=None), **options)
  with pytest.raises(ValueError, match="'tel' needs the head output 'tel_embedding'"):
    tel.tree_energy_loss(inputs._replace(outputs=None), **TEL_OPTIONS)
  for preset, override, key in (
      ('tel', {'tel': {'sigma': 0.0}}, 'loss_config.tel.sigma'),
      ('tel', {'tree_stride': 0}, 'loss_config.tree_stride'),
      ('apro', {'apro': {'zeta_local': -1.0}}, 'loss_config.apro.zeta_local'),
      ('apro', {'apro': {'local_radius': 0}}, 'loss_config.apro.local_radius'),
      ('apro', {'tree_stride': -1}, 'loss_config.tree_stride')):
    config = presets.preset(preset)
    for name, value in override.items():
      if isinstance(value, dict):
        config[name].update(value)
      else:
        config[name] = value
    with pytest.raises(ValueError, match=key.replace('.', r'\.')) as error:
      methods.build_loss(config)
    assert '\n' not in str(error.value)


def test_presets_declare_what_the_terms_need():
  tel_loss = methods.build_loss(presets.preset('tel'))
  assert tel_loss.terms == ('pce', 'tel') and tel_loss.needs.image
  assert dict(tel_loss.needs.heads) == {tel.EMBEDDING_HEAD: tel.EmbeddingHead}
  assert tel_loss.summary_name == 'tel_response'
  apro_loss = methods.build_loss(presets.preset('apro'))
  assert apro_loss.needs.image and not apro_loss.needs.heads
  assert apro_loss.summary_name == 'apro_response'
  # tree_stride is shared by both terms: one loss-level option.
  assert presets.preset('tel').tree_stride == tel.TREE_STRIDE
  assert 'tree_stride' not in presets.preset('tel').tel


def test_both_terms_train_two_steps(tiny_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.num_train_steps = 2
  config.eval.scales = (1.0,)
  config.eval.flip = False
  # One run for both terms: one compilation.
  config.loss = methods.loss_config({'pce': 1.0, 'tel': 0.4, 'apro': 0.4})
  scores = trainer.train_and_evaluate(config, str(tmp_path))
  assert scores['step'] == 2
  tags = test_trainer.read_event_tags(str(tmp_path))
  assert tags.get('train/tel') == [1, 2] and tags.get('train/apro') == [1, 2]
  summary_name = methods.build_loss(config.loss).summary_name
  assert summary_name in ('tel_response', 'apro_response')
  assert f'train/{summary_name}' in tags, sorted(tags)
