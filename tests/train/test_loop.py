"""The shared training loop (``agmm_jax.train.loop.run``) with a stand-in step,
checkpointer and writer: which steps it logs, evaluates and saves (against a
naive enumeration of the schedule), the logged means (against the step
losses averaged by hand), NaN checks before saves, SIGTERM, a step offset.
The real step and checkpointer run through it in test_train, test_resume,
test_faults and test_spml_stage2."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agmm_jax.train import loop
from agmm_jax.runtime import sharding

CLASS_NAMES = ['a', 'b']


class Means:
  """clu-like metrics: ``merge`` concatenates, ``compute`` averages."""

  def __init__(self, values: dict[str, list[float]]):
    self.values = values

  def merge(self, other: 'Means') -> 'Means':
    return Means({k: v + other.values[k] for k, v in self.values.items()})

  def compute(self) -> dict[str, jax.Array]:
    return {k: jnp.asarray(np.mean(v)) for k, v in self.values.items()}


class RecordingCheckpointer:
  latest_dir = '/work/run/stage/checkpoints'

  def __init__(self):
    self.saved, self.best, self.closed = [], [], False

  def save(self, step, state, train_iter):
    del train_iter
    assert int(state['step']) == step
    self.saved.append(step)

  def save_best(self, step, state, miou):
    del state, miou
    self.best.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def close(self):
    self.closed = True


class RecordingWriter:

  def __init__(self):
    self.scalars, self.closed = {}, False

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def flush(self):
    pass

  def close(self):
    self.closed = True


def make_train_step(loss_at, nan_params_at=None, sigterm_at=None, sigterm=None):
  """Step s (1-based) has loss ``loss_at(s)``; parameters count the steps."""
  def train_step(state, batch):
    assert batch['x'].shape[0] == jax.device_count()
    step = int(state['step']) + 1
    params = state['params'] + 1.0
    if step == nan_params_at:
      params = params * jnp.nan
    if step == sigterm_at:
      sigterm.received = True
    loss = loss_at(step)
    metrics = Means({'loss': [loss], 'grad_norm': [1.0],
                     'finite': [float(np.isfinite(loss))]})
    return {'step': jnp.asarray(step), 'params': params}, metrics
  return train_step


def batches():
  while True:
    yield {'x': np.zeros((jax.device_count(), 2), np.float32)}


def run(train_step, schedule, *, start_step=0, sigterm=None, step_offset=10,
        checkpointer=None):
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1}))
  checkpointer = checkpointer or RecordingCheckpointer()
  writer = RecordingWriter()
  evaluated = []

  def evaluate(state):
    evaluated.append(int(state['step']))
    return {'miou': 0.25 * int(state['step']), 'pixel_accuracy': 0.5,
            'per_class_iou': [0.1, 0.2]}

  state = {'step': jnp.asarray(start_step), 'params': jnp.zeros((3,)) + start_step}
  reporting = loop.Reporting(name='stage two: ', scalar_prefix='stage2',
                             step_offset=step_offset,
                             class_names=CLASS_NAMES)
  outcome = {'checkpointer': checkpointer, 'writer': writer, 'evaluated': evaluated}
  try:
    outcome['state'], outcome['scores'] = loop.run(
        state, train_step, batches(), mesh, schedule, checkpointer, writer, evaluate,
        sigterm or loop.SigtermFlag(), global_batch_size=jax.device_count(),
        reporting=reporting)
  finally:
    assert checkpointer.closed and writer.closed
  return outcome


@pytest.mark.parametrize('start_step', [0, 4])
def test_logs_evaluates_and_saves_on_schedule(start_step):
  schedule = loop.Schedule(total_steps=7, log_every=3, eval_every=2, checkpoint_every=5)
  outcome = run(make_train_step(lambda s: float(s) ** 2), schedule, start_step=start_step)

  trained = range(start_step + 1, 8)
  log_steps = [s for s in trained if s % 3 == 0 or s == 7]
  eval_steps = [s for s in trained if s % 2 == 0 or s == 7]
  save_steps = [s for s in trained if s % 5 == 0 or s == 7]
  assert outcome['evaluated'] == eval_steps
  assert outcome['checkpointer'].best == eval_steps
  assert outcome['checkpointer'].saved == save_steps
  scalars = outcome['writer'].scalars
  period_start = start_step
  for step in log_steps:
    expected = np.mean([s ** 2 for s in range(period_start + 1, step + 1)])
    assert scalars[10 + step]['stage2/loss'] == pytest.approx(expected)
    assert 'stage2/finite' not in scalars[10 + step]
    period_start = step
  for step in eval_steps:
    assert scalars[10 + step]['eval/miou'] == 0.25 * step
    assert scalars[10 + step]['eval/iou/b'] == pytest.approx(0.2)
  assert sorted(scalars) == sorted({10 + s for s in log_steps + eval_steps})
  assert int(outcome['state']['step']) == 7
  assert float(outcome['state']['params'][0]) == 7.0
  assert outcome['scores']['miou'] == 0.25 * 7


def test_finished_run_trains_and_evaluates_nothing():
  schedule = loop.Schedule(total_steps=3, log_every=1, eval_every=1, checkpoint_every=1)
  outcome = run(make_train_step(float), schedule, start_step=3)
  assert outcome['scores'] == {} and outcome['evaluated'] == []
  assert outcome['checkpointer'].saved == [] and outcome['writer'].scalars == {}


def test_non_finite_loss_stops_before_the_next_save():
  # Logged at 3; the NaN of step 4 is caught by the save at 4, not the log at 6.
  schedule = loop.Schedule(total_steps=7, log_every=3, eval_every=100, checkpoint_every=2)
  checkpointer = RecordingCheckpointer()
  with pytest.raises(loop.NonFiniteError) as error:
    run(make_train_step(lambda s: np.nan if s == 4 else 1.0), schedule,
        checkpointer=checkpointer)
  assert checkpointer.saved == [2]
  message = str(error.value)
  assert message.startswith('stage two: loss nan')
  assert 'steps 4..4' in message and '\n' not in message
  assert 'last good checkpoint: 2 in /work/run/stage/checkpoints' in message


def test_non_finite_parameters_are_never_saved():
  schedule = loop.Schedule(total_steps=7, log_every=1, eval_every=100, checkpoint_every=2)
  checkpointer = RecordingCheckpointer()
  with pytest.raises(loop.NonFiniteError, match='parameters are NaN/inf at step 4'):
    run(make_train_step(float, nan_params_at=3), schedule, checkpointer=checkpointer)
  assert checkpointer.saved == [2]


def test_sigterm_saves_the_step_and_raises_preempted_after_the_offset():
  sigterm = loop.SigtermFlag()
  schedule = loop.Schedule(total_steps=7, log_every=2, eval_every=100,
                           checkpoint_every=100)
  checkpointer = RecordingCheckpointer()
  with pytest.raises(loop.Preempted) as stopped:
    run(make_train_step(float, sigterm_at=3, sigterm=sigterm), schedule,
        sigterm=sigterm, step_offset=20, checkpointer=checkpointer)
  assert stopped.value.step == 23
  assert checkpointer.saved == [3]
