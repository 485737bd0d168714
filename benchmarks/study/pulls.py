r"""Does a method's loss pull the prediction towards the truth? The pull diagnostic.

``benchmarks/study/targets.py`` asks whether a method's target map (AGMM's G,
TEL's, APro's, soft self-labeling's y) is more accurate than the prediction
it supervises. This one asks it of any loss term that acts on unlabeled
pixels, including the CRF and normalized-cut losses, which have no target
map: a term's gradient still has a direction. For a
term ``L_t`` (weighted as in the run) the pull on pixel ``i`` is
``-dL_t/dz_i``, ``z`` the logits: the change of the pixel's class scores one
step of gradient descent makes. Its target class is ``argmax_k pull_ik``.

  python -m benchmarks.study.pulls --images=64 \
      --workdirs=runs/study40/clicks20_pce_ncut_seed0,runs/study40/clicks20_pce_only_seed0 \
      --terms=ncut,densecrf

For each workdir (a run whose training split also stores dense labels) the
latest checkpoint (``--steps=all``: every checkpoint kept, e.g. by
``--config.keep_checkpoint_every_steps``: early, midway, end; or
``--steps=600,1200``: those) is restored
and the first ``--images`` training images are run whole, one at a time, in
eval mode, with their sparse labels (``targets.train_images``,
``targets.image_inputs``: as the loss sees one image of a batch). The terms are the run's own unlabeled
terms (every active term but ``pce``), or ``--terms`` with the run's options
and weights (weight 1 where the run does not use the term: a pCE run then
shows what a term would have pulled towards). On the unlabeled, non-void
pixels (the dense labels, never trained on, as the truth):

* ``toward truth``: ``sum_i pull_i[y_i] / sum_i |pull_i|_1 / 2``, in [-1, 1]:
  the share of the term's pull (its positive half; a softmax-invariant
  gradient sums to zero over classes) that raises the true class, pooled
  over pixels, so weighted by how hard each pixel is pulled;
* ``pulled %``: the pixels whose pull is at least 1% of the mean pull;
* ``acc target %`` / ``acc p %``: on the pulled pixels, how often the target
  class / the prediction's argmax is the true class;
* ``target right, p wrong %`` / ``target wrong, p right %``: where the term
  would correct the prediction / move it away from the truth.

Not supported (one-line error): terms that need a method state or batch
fields (SPML, whose terms read the training batch's superpixels). Prints a
Markdown table.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agmm_jax import methods
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.runtime import sharding as sharding_lib
from benchmarks.study import targets

# A pixel is pulled when its pull's L1 norm is at least this share of the
# mean over the candidate pixels (a term saturated on a pixel does not pull it).
PULLED_SHARE = 0.01
SUMS = ('pixels', 'pulled', 'toward', 'mass', 'target_right', 'p_right',
        'target_right_p_wrong', 'target_wrong_p_right')


def term_loss(loss_config: ml_collections.ConfigDict, term: str) -> methods.Loss:
  """The loss of ``term`` alone, with the run's options and weight (1 when
  the run does not weigh it); one-line ValueError for the unsupported."""
  config = loss_config.copy_and_resolve_references()
  weight = float(config.weights.get(term, 0.0)) or 1.0
  with config.unlocked():
    config.weights = ml_collections.ConfigDict({term: weight})
  loss = methods.build_loss(config)
  if loss.needs.state or loss.needs.batch_fields:
    raise ValueError(f'term {term!r} needs a method state or batch fields; '
                     'this diagnostic runs whole images without them')
  return loss


def unlabeled_terms(loss_config: ml_collections.ConfigDict) -> list[str]:
  """The run's active terms other than pCE."""
  return sorted(name for name, weight in loss_config.weights.items()
                if float(weight) and name != 'pce')


def pull_sums(pull: np.ndarray, probs: np.ndarray, sparse: np.ndarray,
              dense: np.ndarray) -> dict[str, float]:
  """Sums of :data:`SUMS` over the unlabeled, non-void pixels (module
  docstring), for ``pull`` and ``probs`` ``[B, H, W, K]``, ``sparse`` and
  ``dense`` int ``[B, H, W]``."""
  candidates = (sparse == labels_lib.UNLABELED) & (dense >= 0)
  norm = np.abs(pull).sum(-1)
  mean = norm[candidates].mean() if candidates.any() else 0.0
  pulled = candidates & (norm >= PULLED_SHARE * mean) & (norm > 0)
  truth = np.maximum(dense, 0)
  toward = np.take_along_axis(pull, truth[..., None], axis=-1)[..., 0]
  target_right = (np.argmax(pull, -1) == dense) & pulled
  p_right = (np.argmax(probs, -1) == dense) & pulled
  return {'pixels': float(candidates.sum()), 'pulled': float(pulled.sum()),
          'toward': float(toward[candidates].sum()),
          'mass': float(norm[candidates].sum() / 2),
          'target_right': float(target_right.sum()), 'p_right': float(p_right.sum()),
          'target_right_p_wrong': float((target_right & ~p_right).sum()),
          'target_wrong_p_right': float((~target_right & p_right & pulled).sum())}


def make_pulls(model_defs, losses: dict[str, methods.Loss], num_classes: int):
  """Jitted ``(params, model_state, images, sparse) -> (probs, {term: pull})``."""
  needs = methods.Needs(image=True)
  for term, loss in losses.items():
    needs = needs.merge(loss.needs, term)

  def pulls(params, model_state, images, sparse):
    model = nnx.merge(model_defs.eval, params, model_state)
    inputs = targets.image_inputs(model, images, sparse, num_classes, needs)

    def pull(loss):
      return -jax.grad(lambda logits: loss(inputs._replace(logits=logits))[0])(inputs.logits)

    return (jax.nn.softmax(inputs.logits, axis=-1),
            {term: pull(loss) for term, loss in losses.items()})

  return jax.jit(pulls)


def diagnose(workdir: str, terms: Sequence[str], num_images: int,
             which: str = 'latest') -> dict[int, dict[str, dict[str, float]]]:
  """``{step: {term: pooled pull_sums}}`` of ``workdir``'s checkpoints."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  num_classes = int(input_pipeline.read_metadata(config.data.dir)['num_classes'])
  mesh = sharding_lib.create_mesh(config.mesh)
  terms = list(terms) or unlabeled_terms(config.loss)
  losses = {term: term_loss(config.loss, term) for term in terms}
  model_defs, states = targets.kept_states(config, workdir, num_classes, mesh, which)
  pulls = make_pulls(model_defs, losses, num_classes)
  images = list(targets.train_images(config.data.dir, num_images, num_classes))
  by_step = {}
  for step, state in states:
    totals = by_step[step] = {term: dict.fromkeys(SUMS, 0.0) for term in terms}
    for image, sparse, dense in images:
      probs, by_term = pulls(state['params'], state['model_state'],
                             jnp.asarray(image), jnp.asarray(sparse))
      for term, pull in by_term.items():
        for name, value in pull_sums(np.asarray(pull), np.asarray(probs),
                                     sparse, dense).items():
          totals[term][name] += value
  return by_step


def format_row(workdir: str, step: int, term: str, sums: dict[str, float]) -> str:
  pulled = max(sums['pulled'], 1.0)
  share = lambda name: f'{100 * sums[name] / pulled:.1f}'
  return (f'| {os.path.basename(os.path.normpath(workdir))} | {step} | {term} | '
          f'{sums["toward"] / max(sums["mass"], 1e-30):+.3f} | '
          f'{100 * sums["pulled"] / max(sums["pixels"], 1.0):.1f} | {share("target_right")} | '
          f'{share("p_right")} | {share("target_right_p_wrong")} | '
          f'{share("target_wrong_p_right")} |')


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  split = lambda text: [item for item in text.split(',') if item]
  parser.add_argument('--workdirs', required=True, type=split)
  parser.add_argument('--terms', type=split, default=[],
                      help="Terms to diagnose (default: each run's own but pce).")
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--steps', default='latest',
                      help='latest, all (every checkpoint kept), or steps: 600,1200.')
  args = parser.parse_args(argv)
  print('| run | step | term | toward truth | pulled % | acc target % | acc p % | '
        'target right, p wrong % | target wrong, p right % |')
  print('|---|---|---|---|---|---|---|---|---|')
  for workdir in args.workdirs:
    try:
      by_step = diagnose(workdir, args.terms, args.images, args.steps)
    except ValueError as error:
      sys.exit(f'{workdir}: {error}')
    for step, totals in by_step.items():
      for term, sums in totals.items():
        print(format_row(workdir, step, term, sums), flush=True)


if __name__ == '__main__':
  main()
