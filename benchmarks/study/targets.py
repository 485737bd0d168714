r"""Is a method's target more accurate than the prediction it supervises?

Issue 33's diagnostic, for every loss whose terms build an explicit target
map from the image or the features: the map a term registers as its summary
(`agmm_jax.methods.core.register_term(summary=...)`, the map
`Loss.summary` returns): AGMM's GMM response G, TEL's tree-filtered
prediction AS, APro's globally propagated pseudo-label, soft
self-labeling's solved y. SPML's target is its pass (the walk's
pseudo-labels), measured against the dense labels by
benchmarks/study/pass_quality.py and kept in the record; the CRF and
normalized-cut losses are regularizers with no target map: what their
gradient pulls towards is benchmarks/study/pulls.py.

  python -m benchmarks.study.targets --workdirs=runs/study/clicks20_tel_seed0,...
  python -m benchmarks.study.targets --steps=all \
      --workdirs=runs/study40/clicks20_tel_seed0

For each workdir (its config.json and latest checkpoint, eval-mode model;
`--steps=all`: every checkpoint kept, e.g. by
`--config.keep_checkpoint_every_steps`: early, midway, end; or
`--steps=600,1200`: those)
the first `--images` training images are run whole, one at a time (the
sizes may differ, MSRC's do), and benchmarks/gmm_diagnostic.target_quality
compares the target's and the softmax's choices and errors with the dense
labels, which the weak-label runs never saw, on the unlabeled non-void pixels
whose class is labeled in the image. Prints a Markdown table (the columns of
gmm_diagnostic's, the target named by the loss's summary name).
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agmm_jax import methods
from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.train import stages
from agmm_jax.train import steps
from benchmarks import gmm_diagnostic


def train_images(data_dir: str, num_images: int, num_classes: int):
  """Yields (normalized image [1, H, W, 3], sparse [1, H, W], dense
  [1, H, W]) of the first `num_images` training records."""
  metadata = input_pipeline.read_metadata(data_dir)
  split = metadata['splits']['train']
  if not (split.get('has_sparse') and split.get('has_dense')):
    raise ValueError(f'{data_dir}: the train split must store sparse and '
                     'dense labels')
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, shard) for shard in split['shards']])
  for index in range(min(num_images, len(source))):
    labels = {}
    for kind in ('sparse', 'dense'):
      image, labels[kind], _ = input_pipeline.decode_record(
          source[index], num_classes=num_classes,
          label_key=input_pipeline.LABEL_KEYS[kind])
    yield (augment.normalize(np.asarray(image))[None], labels['sparse'][None],
           labels['dense'][None])


def image_inputs(model: Any, image: jax.Array, sparse: jax.Array, num_classes: int,
                 needs: methods.Needs) -> methods.LossInputs:
  """The loss inputs of one training image run whole (``[1, H, W, 3]``)
  with its sparse labels, as a training batch gives them (no method state)."""
  present = jax.nn.one_hot(sparse, num_classes).max(axis=(1, 2))
  return steps.loss_inputs(
      model, {'image': image, 'label': sparse, 'class_present': present}, needs)


def chosen_steps(which: str, kept: Sequence[int]) -> list[int]:
  """The checkpoint steps ``which`` names among the ``kept`` ones:
  ``latest``, ``all`` (ascending) or a comma list of steps; a one-line
  ValueError for a step that is not kept."""
  if not kept:
    raise ValueError('no checkpoint')
  if which == 'latest':
    return [max(kept)]
  if which == 'all':
    return sorted(kept)
  items = [item for item in which.split(',') if item]
  missing = [item for item in items if not item.isdigit() or int(item) not in kept]
  if missing or not items:
    raise ValueError(f'--steps={which}: no checkpoint of step {", ".join(missing) or "?"}; '
                     f'kept: {", ".join(map(str, sorted(kept)))}')
  return [int(item) for item in items]


def kept_states(config: ml_collections.ConfigDict, workdir: str, num_classes: int,
                mesh: jax.sharding.Mesh, which: str):
  """``(model defs, [(step, state)])``: the final model's checkpoints that
  ``which`` names (:func:`chosen_steps`; ``keep_checkpoint_every_steps``
  keeps some through a run)."""
  class_names = [f'class_{i}' for i in range(num_classes)]
  state, model_defs, folder = stages.inference_state(config, workdir, class_names, mesh)
  checkpointer = checkpoint_lib.Checkpointer(folder, keep=int(config.keep_checkpoints),
                                             read_only=True)
  try:
    try:
      chosen = chosen_steps(which, checkpointer.all_steps())
    except ValueError as error:
      raise ValueError(f'{folder}: {error}') from None
    abstract = checkpoint_lib.abstract_like(state)
    return model_defs, [(step, checkpointer.restore_step(abstract, step)) for step in chosen]
  finally:
    checkpointer.close()


def diagnose_steps(workdir: str, num_images: int, which: str = 'latest'
                   ) -> tuple[str, dict[int, dict[str, float]]]:
  """`(target name, {step: pooled target_quality sums})` of `workdir`'s
  checkpoints that `which` names (:func:`chosen_steps`).

  Raises:
    ValueError: the run's loss has no target map, or needs batch fields
      (boxes, tags) this diagnostic does not build, or no such checkpoint.
  """
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  loss = methods.build_loss(config.loss)
  if loss.summary is None:
    raise ValueError(f'{workdir}: its loss ({", ".join(loss.terms)}) has no '
                     'target map (no term registers a summary)')
  if loss.needs.batch_fields:
    raise ValueError(f'{workdir}: its loss needs batch fields '
                     f'{sorted(loss.needs.batch_fields)}')
  num_classes = int(input_pipeline.read_metadata(config.data.dir)[
      'num_classes'])
  mesh = sharding_lib.create_mesh(config.mesh)
  model_defs, states = kept_states(config, workdir, num_classes, mesh, which)

  @jax.jit
  def maps(params, model_state, image, sparse):
    model = nnx.merge(model_defs.eval, params, model_state)
    # The target terms carry no method state (AGMM's prototypes do, and
    # its G does not read them).
    inputs = image_inputs(model, image, sparse, num_classes, loss.needs)
    return jax.nn.softmax(inputs.logits, axis=-1), loss.summary(inputs)

  images = list(train_images(config.data.dir, num_images, num_classes))
  by_step = {}
  for step, state in states:
    totals = by_step[step] = dict.fromkeys(
        gmm_diagnostic.COUNTS + gmm_diagnostic.ERRORS, 0.0)
    for image, sparse, dense in images:
      probs, target = maps(state['params'], state['model_state'],
                           jnp.asarray(image), jnp.asarray(sparse))
      quality = gmm_diagnostic.target_quality(
          np.asarray(target), np.asarray(probs), sparse, dense)
      for name, value in quality.items():
        totals[name] += value
  return loss.summary_name, by_step


def diagnose(workdir: str, num_images: int) -> tuple[str, dict[str, float]]:
  """`(target name, pooled target_quality sums with 'step')` of `workdir`'s
  latest checkpoint (:func:`diagnose_steps`)."""
  name, by_step = diagnose_steps(workdir, num_images, 'latest')
  (step, totals), = by_step.items()
  return name, {**totals, 'step': step}


def record_of(workdir: str, num_images: int) -> dict[str, Any]:
  """What a study record keeps of `diagnose`: `{'target', 'images', 'step',
  COUNTS and ERRORS sums}`, or `{'error': message}` where the run's loss
  has no target map (or needs batch fields)."""
  try:
    name, totals = diagnose(workdir, num_images)
  except ValueError as e:
    return {'error': str(e)}
  return {'target': name, 'images': num_images, **totals}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdirs', required=True,
                      type=lambda text: [w for w in text.split(',') if w])
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--steps', default='latest',
                      help='latest, all (every checkpoint kept), or steps: 600,1200.')
  args = parser.parse_args(argv)
  print('| run | step | target | coverage % | acc target % | acc p % | '
        'target right, p wrong % | target wrong, p right % | '
        '\\|target - y\\| | \\|p - y\\| |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for workdir in args.workdirs:
    try:
      name, by_step = diagnose_steps(workdir, args.images, args.steps)
    except (OSError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    for step, totals in by_step.items():
      print(gmm_diagnostic.format_row(workdir, name, {**totals, 'step': step}),
            flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
