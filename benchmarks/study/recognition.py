r"""Which classes are in an image? A finished run's recognition, apart from
where it puts them.

The MSRC report's question for the tags pipeline (docs/results_msrc.md): its
segmenter localizes as well as the CAM it learned from once each image's
classes are given (`--eval_given_classes`), so what does it miss? For each
workdir, on every image of `--split`, run whole:

* the run's final model (eval and predict's: the segmenter of a CAM run)
  says an image holds class k when it predicts k on at least `--min_share`
  of the image's labeled pixels;
* `--stage=cam_classifier`: a CAM run's classifier says so when its pooled
  class activation score (`agmm_jax.methods.cam.pooled_logits`, the logit
  its BCE trained) is positive, i.e. sigmoid > 0.5.

Against the classes of each image's dense label map: image-level precision
and recall over all (image, class) pairs, and the share of images whose set
is exactly right. Prints a Markdown table.

  python -m benchmarks.study.recognition --split=val \
      --workdirs=runs/msrc/tags_cam_seed0,runs/msrc/full_seed0
  python -m benchmarks.study.recognition --split=val --stage=cam_classifier \
      --workdirs=runs/msrc/tags_cam_seed0
"""

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.evaluation import modes
from agmm_jax.methods import cam
from agmm_jax.runtime import sharding as sharding_lib

DEFAULT_MIN_SHARE = 0.01


def set_counts(predicted: np.ndarray, truth: np.ndarray) -> dict[str, int]:
  """Counts of one image's class sets (bool ``[K]`` each): ``right`` (in
  both), ``extra`` (predicted only), ``missed`` (true only), ``exact`` (1
  when the sets are equal) and ``images`` (1)."""
  return {'right': int((predicted & truth).sum()),
          'extra': int((predicted & ~truth).sum()),
          'missed': int((~predicted & truth).sum()),
          'exact': int((predicted == truth).all()), 'images': 1}


def split_images(data_dir: str, split: str, num_classes: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(normalized image ``[1, H, W, 3]``, dense label ``[H, W]``) of every
  record of ``split``."""
  metadata = input_pipeline.read_metadata(data_dir)
  info = metadata['splits'][split]
  if not info.get('has_dense', True):
    raise ValueError(f'{data_dir}: split {split!r} stores no dense labels')
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, shard) for shard in info['shards']])
  for index in range(len(source)):
    image, dense, _ = input_pipeline.decode_record(
        source[index], num_classes=num_classes,
        label_key=input_pipeline.LABEL_KEYS['dense'])
    yield augment.normalize(np.asarray(image))[None], np.asarray(dense)


def recognition(workdir: str, split: str, *, stage_name: str | None = None,
                min_share: float = DEFAULT_MIN_SHARE) -> dict[str, int]:
  """The summed :func:`set_counts` of ``workdir``'s latest checkpoint of
  its final model (or of the training stage ``stage_name``, read by its CAM
  head) over ``split`` (module docstring), with ``step``."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.eval.checkpoint = 'latest'
  num_classes = int(input_pipeline.read_metadata(config.data.dir)['num_classes'])
  mesh = sharding_lib.create_mesh(config.mesh)
  state, model_defs, step = modes.restore_for_inference(
      config, workdir, num_classes, mesh, stage_name)

  @jax.jit
  def classes_of(params, model_state, image, labeled):
    model = nnx.merge(model_defs.eval, params, model_state)
    features, logits = model(image)
    if stage_name is None:
      shares = jnp.sum(jax.nn.one_hot(logits.argmax(-1), num_classes)
                       * labeled[..., None], axis=(1, 2))
      return shares >= min_share * jnp.maximum(labeled.sum(), 1)
    maps = model.extra_outputs(features)[cam.CAM_HEAD]
    return cam.pooled_logits(maps, jnp.ones(image.shape[:3], bool)) > 0

  totals = dict.fromkeys(('right', 'extra', 'missed', 'exact', 'images'), 0)
  for image, dense in split_images(config.data.dir, split, num_classes):
    labeled = (dense >= 0) & (dense < num_classes)
    truth = np.zeros(num_classes, bool)
    truth[np.unique(dense[labeled])] = True
    predicted = np.asarray(classes_of(state['params'], state['model_state'],
                                      jnp.asarray(image), jnp.asarray(labeled[None])))[0]
    for name, count in set_counts(predicted, truth).items():
      totals[name] += count
  return {**totals, 'step': int(step)}


def table_row(workdir: str, stage: str, totals: dict[str, int]) -> str:
  right = totals['right']
  precision = right / max(right + totals['extra'], 1)
  recall = right / max(right + totals['missed'], 1)
  return (f'| {workdir} | {stage} | {totals["step"]} | {100 * precision:.1f} | '
          f'{100 * recall:.1f} | {totals["exact"]} of {totals["images"]} |')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdirs', required=True,
                      help='comma-separated run folders')
  parser.add_argument('--split', default='val')
  parser.add_argument('--stage', default='',
                      help="a training stage by its CAM head (e.g. "
                      "'cam_classifier'); default: the final model")
  parser.add_argument('--min_share', type=float, default=DEFAULT_MIN_SHARE,
                      help="the share of an image's labeled pixels a "
                      'predicted class needs')
  args = parser.parse_args(argv)
  stage = args.stage or None
  lines = ['| run | model | step | precision (%) | recall (%) | exact sets |',
           '|---|---|---|---|---|---|']
  for workdir in args.workdirs.split(','):
    try:
      totals = recognition(workdir, args.split, stage_name=stage,
                           min_share=args.min_share)
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    lines.append(table_row(workdir, stage or 'final model', totals))
  print('\n'.join(lines))
  return 0


if __name__ == '__main__':
  sys.exit(main())
