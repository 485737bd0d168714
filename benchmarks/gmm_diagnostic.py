r"""Is the GMM target better than the network's own prediction? A diagnostic.

AGMM trains the softmax prediction ``p`` towards the GMM response ``G`` on every
unlabeled pixel. That can only help where ``G`` knows more than ``p``. This
script measures both against the dense ground truth, which the sparse runs
never saw, on the unlabeled pixels of training images:

  python -m benchmarks.gmm_diagnostic --workdirs=runs/study/clicks20_pce_only_seed0,...

For each workdir (any run of ``configs/camvid_clicks.py`` or another config
whose training split also stores dense labels) the latest checkpoint is
restored and the first ``--images`` training images are run whole, in eval
mode. With the image's sparse labels (class means from its labeled pixels, as
in training) the responses of both GMM forms are computed, and on the pixels
that are unlabeled, not void, and whose true class is among the classes labeled
in the image (the only classes the GMM covers):

* ``acc G``: how often ``argmax_k G_k`` is the true class;
* ``acc p``: how often ``argmax_k p_k`` over the same classes is;
* ``G right, p wrong`` / ``G wrong, p right``: where the GMM target would move
  the prediction towards / away from the truth;
* ``|G - y|``, ``|p - y|``: mean absolute error against the one-hot truth over
  those classes (what the BCE between them pulls on);
* ``coverage``: the share of unlabeled, non-void pixels whose class is labeled
  somewhere in the image at all.

Prints a Markdown table; figures are pooled over the images' pixels.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from agmm_jax.data import augment  # pylint: disable=g-import-not-at-top
from agmm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from agmm_jax.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
from agmm_jax.evaluation import modes  # pylint: disable=g-import-not-at-top
from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import agmm  # pylint: disable=g-import-not-at-top

COUNTS = ('pixels', 'covered', 'g_right', 'p_right', 'g_right_p_wrong',
          'g_wrong_p_right')
ERRORS = ('g_error', 'p_error')


def target_quality(response: np.ndarray, probs: np.ndarray, sparse: np.ndarray,
                   dense: np.ndarray) -> dict[str, float]:
  """Counts and error sums comparing ``G`` and ``p`` with the dense truth.

  Args:
    response: ``[B, H, W, K]`` GMM response (0 for classes not labeled in the
      image).
    probs: ``[B, H, W, K]`` softmax prediction.
    sparse: int ``[B, H, W]`` sparse labels (``agmm_jax.data.labels`` convention).
    dense: int ``[B, H, W]`` dense labels (void as ``UNLABELED``).

  Returns:
    ``{name: sum}`` for :data:`COUNTS` and :data:`ERRORS` (error sums are over
    pixels of the mean over labeled classes of ``|x - onehot(y)|``).
  """
  num_classes = probs.shape[-1]
  labeled_classes = np.stack([
      np.isin(np.arange(num_classes), image[image >= 0]) for image in sparse])
  candidates = (sparse == labels_lib.UNLABELED) & (dense >= 0)
  images = np.arange(len(dense))[:, None, None]
  covered = candidates & labeled_classes[images, np.maximum(dense, 0)]
  mask = labeled_classes[:, None, None, :]
  g_choice = np.argmax(np.where(mask, response, -np.inf), axis=-1)
  p_choice = np.argmax(np.where(mask, probs, -np.inf), axis=-1)
  g_right = (g_choice == dense) & covered
  p_right = (p_choice == dense) & covered
  one_hot = dense[..., None] == np.arange(num_classes)
  num_labeled_classes = np.maximum(mask.sum(-1), 1)
  g_error = (np.abs(response - one_hot) * mask).sum(-1) / num_labeled_classes
  p_error = (np.abs(probs - one_hot) * mask).sum(-1) / num_labeled_classes
  return {
      'pixels': float(candidates.sum()), 'covered': float(covered.sum()),
      'g_right': float(g_right.sum()), 'p_right': float(p_right.sum()),
      'g_right_p_wrong': float((g_right & ~p_right).sum()),
      'g_wrong_p_right': float((~g_right & p_right).sum()),
      'g_error': float(g_error[covered].sum()), 'p_error': float(p_error[covered].sum()),
  }


def load_train_images(data_dir: str, num_images: int, num_classes: int):
  """The first ``num_images`` training images, normalized, with both labels."""
  metadata = input_pipeline.read_metadata(data_dir)
  split = metadata['splits']['train']
  if not (split.get('has_sparse') and split.get('has_dense')):
    raise ValueError(f'{data_dir}: the train split must store sparse and dense labels')
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, shard) for shard in split['shards']])
  images, sparse, dense = [], [], []
  for index in range(min(num_images, len(source))):
    record = source[index]
    image, sparse_label, _ = input_pipeline.decode_record(
        record, num_classes=num_classes, label_key=input_pipeline.LABEL_KEYS['sparse'])
    _, dense_label, _ = input_pipeline.decode_record(
        record, num_classes=num_classes, label_key=input_pipeline.LABEL_KEYS['dense'])
    images.append(augment.normalize(np.asarray(image)))
    sparse.append(sparse_label)
    dense.append(dense_label)
  shapes = {image.shape for image in images}
  if len(shapes) != 1:
    raise ValueError(f'{data_dir}: training images differ in size {sorted(shapes)}')
  return np.stack(images), np.stack(sparse), np.stack(dense)


def diagnose(workdir: str, num_images: int, batch_size: int) -> dict[str, dict[str, float]]:
  """Pooled :func:`target_quality` sums for each GMM form of ``workdir``."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.eval.checkpoint = 'latest'
  metadata = input_pipeline.read_metadata(config.data.dir)
  num_classes = int(metadata['num_classes'])
  mesh = sharding_lib.create_mesh(config.mesh)
  state, model_defs, step = modes.restore_for_inference(
      config, workdir, num_classes, mesh)
  images, sparse, dense = load_train_images(config.data.dir, num_images, num_classes)

  @jax.jit
  def responses(params, model_state, batch_images, batch_sparse):
    features, logits = nnx.merge(model_defs.eval, params, model_state)(batch_images)
    present = jax.nn.one_hot(batch_sparse, num_classes).max(axis=(1, 2))
    inputs = methods.LossInputs(logits, features, batch_sparse, present)
    return (jax.nn.softmax(logits, axis=-1),
            {form: agmm.gmm_response(inputs, form=form, sigma_stop_gradient=True)
             for form in agmm.GMM_FORMS})

  totals = {form: dict.fromkeys(COUNTS + ERRORS, 0.0) for form in agmm.GMM_FORMS}
  for start in range(0, len(images), batch_size):
    stop = start + batch_size
    probs, by_form = responses(state['params'], state['model_state'],
                               jnp.asarray(images[start:stop]), jnp.asarray(sparse[start:stop]))
    for form, response in by_form.items():
      quality = target_quality(np.asarray(response), np.asarray(probs),
                               sparse[start:stop], dense[start:stop])
      for name, value in quality.items():
        totals[form][name] += value
  for form in totals:
    totals[form]['step'] = step
  return totals


def format_row(workdir: str, form: str, totals: dict[str, float]) -> str:
  covered = max(totals['covered'], 1.0)
  return (f'| {os.path.basename(os.path.normpath(workdir))} | {int(totals["step"])} | {form} | '
          f'{100 * totals["covered"] / max(totals["pixels"], 1.0):.1f} | '
          f'{100 * totals["g_right"] / covered:.1f} | {100 * totals["p_right"] / covered:.1f} | '
          f'{100 * totals["g_right_p_wrong"] / covered:.1f} | '
          f'{100 * totals["g_wrong_p_right"] / covered:.1f} | '
          f'{totals["g_error"] / covered:.3f} | {totals["p_error"] / covered:.3f} |')


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdirs', required=True,
                      type=lambda text: [w for w in text.split(',') if w])
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args(argv)
  print('| run | step | G form | coverage % | acc G % | acc p % | G right, p wrong % | '
        'G wrong, p right % | \\|G - y\\| | \\|p - y\\| |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for workdir in args.workdirs:
    for form, totals in diagnose(workdir, args.images, args.batch_size).items():
      print(format_row(workdir, form, totals), flush=True)


if __name__ == '__main__':
  main()
