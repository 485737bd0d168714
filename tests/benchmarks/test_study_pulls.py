"""benchmarks/study/pulls.py: the pooled sums against a pixel loop, the
pull against central finite differences of the weighted term, the terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax import methods
from agmm_jax.data import labels as labels_lib
from benchmarks.study import pulls
from configs import common
from configs import tiny


def naive_sums(pull, probs, sparse, dense):
  sums = dict.fromkeys(pulls.SUMS, 0.0)
  candidates = [index for index in np.ndindex(dense.shape)
                if sparse[index] == labels_lib.UNLABELED and dense[index] >= 0]
  mean = np.mean([np.abs(pull[index]).sum() for index in candidates])
  for index in candidates:
    vector, truth = pull[index], dense[index]
    sums['pixels'] += 1
    sums['toward'] += vector[truth]
    sums['mass'] += np.abs(vector).sum() / 2
    if np.abs(vector).sum() < pulls.PULLED_SHARE * mean:
      continue
    sums['pulled'] += 1
    target_right = int(np.argmax(vector)) == truth
    p_right = int(np.argmax(probs[index])) == truth
    sums['target_right'] += target_right
    sums['p_right'] += p_right
    sums['target_right_p_wrong'] += target_right and not p_right
    sums['target_wrong_p_right'] += p_right and not target_right
  return sums


def test_pull_sums_match_a_pixel_loop():
  rng = np.random.default_rng(0)
  shape = (2, 7, 9)
  pull = rng.normal(size=(*shape, 4))
  pull -= pull.mean(-1, keepdims=True)
  pull[0, :2] *= 1e-4   # hardly pulled: below the share
  probs = rng.dirichlet(np.ones(4), size=shape)
  dense = rng.integers(-1, 4, size=shape)
  sparse = np.where(rng.random(shape) < 0.2, dense, labels_lib.UNLABELED)
  got = pulls.pull_sums(pull, probs, sparse, dense)
  expected = naive_sums(pull, probs, sparse, dense)
  assert expected['pulled'] < expected['pixels']
  for name in pulls.SUMS:
    assert got[name] == pytest.approx(expected[name], rel=1e-9), name


def _inputs(num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(1, 6, 8, num_classes)).astype(np.float32)
  label = np.full((1, 6, 8), labels_lib.UNLABELED, np.int32)
  label[0, 1, 2], label[0, 4, 6] = 0, 2
  return methods.LossInputs(
      logits=jnp.asarray(logits), decoder_features=jnp.zeros((1, 2, 2, 4)),
      label=jnp.asarray(label), class_present=jnp.asarray([[1.0, 0.0, 1.0]]),
      image=jnp.asarray(rng.normal(size=(1, 6, 8, 3)).astype(np.float32)))


@pytest.mark.parametrize('method, term', [('pce_ncut', 'ncut'), ('pce_densecrf', 'densecrf'),
                                          ('pce_only', 'entropy')])
def test_the_pull_is_minus_the_gradient_of_the_weighted_term(method, term):
  config = tiny.get_config(f'method={method}')
  loss = pulls.term_loss(config.loss, term)
  assert loss.terms == (term,)
  inputs = _inputs()
  value = lambda logits: float(loss(inputs._replace(logits=logits))[0])
  pull = np.asarray(-jax.grad(lambda z: loss(inputs._replace(logits=z))[0])(inputs.logits))
  weight = float(config.loss.weights.get(term, 0.0)) or 1.0
  single = methods.build_loss(methods.loss_config({term: 1.0}))
  assert value(inputs.logits) == pytest.approx(
      weight * float(single(inputs)[0]), rel=1e-5)
  base = np.asarray(inputs.logits, np.float64)
  for index in [(0, 0, 0, 0), (0, 3, 5, 1), (0, 5, 7, 2), (0, 2, 4, 0)]:
    step = np.zeros_like(base)
    step[index] = 1e-2
    difference = (value(jnp.asarray(base + step, jnp.float32))
                  - value(jnp.asarray(base - step, jnp.float32))) / 2e-2
    assert -difference == pytest.approx(pull[index], rel=0.05, abs=1e-4 * max(
        1.0, np.abs(pull).max())), index


def test_unlabeled_terms_are_every_active_term_but_pce():
  config = tiny.get_config('method=agmm_released')
  assert 'pce' not in pulls.unlabeled_terms(config.loss)
  assert set(pulls.unlabeled_terms(config.loss)) == {
      name for name, weight in config.loss.weights.items() if weight and name != 'pce'}


def test_terms_that_read_the_batch_are_one_line_errors():
  config = tiny.get_config()
  common.set_method(config, 'spml')
  with pytest.raises(ValueError, match="term 'spml' needs a method state or batch fields"):
    pulls.term_loss(config.loss, 'spml')
