"""How good a run's pseudo-labels are: their IoU against the dense labels of
the same training records (which weak-label runs never train on).

  python -m benchmarks.pseudo_label_quality runs/study/clicks20_spml_seed0
  python -m benchmarks.pseudo_label_quality runs/msrc_tags

Prints the share of labeled (non-void) pixels the pass labeled, the seed
precision (the share of pseudo-labeled pixels that are right), the pixel
accuracy and the per-class and mean IoU of the run's pass folder: SPML's
`WORKDIR/spml_pseudo_labels` or the CAM stages' `WORKDIR/cam_pseudo_labels`
(the one that exists; `--folder NAME` picks one).

With `--regenerate OUT`, the pseudo-labels are first written anew into
`OUT/spml_pseudo_labels` (WORKDIR is only read) from WORKDIR's stage-1
checkpoint (its latest, the state the trainer's pass used) with
`--flip` / `--crf-iterations` (`config.spml_stage2.flip` /
`crf_iterations`), over the first `--limit` training records (0: all), and
those are measured; the time of the pass is printed with the machine:

  python -m benchmarks.pseudo_label_quality runs/study/clicks20_spml_seed0 \\
      --regenerate /tmp/pl_crf --crf-iterations 10 --limit 32 \\
      --data-dir /work/main/data/camvid_half_clicks20_lseed0
"""

import argparse
import json
import os
import platform
import time

import jax
import ml_collections
import numpy as np

from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.data import input_pipeline
from agmm_jax.data import pseudo_labels
from agmm_jax import methods
from agmm_jax.evaluation import metrics
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.methods import cam_stages
from agmm_jax.methods import spml_stage2
from agmm_jax.data import tfrecord
from agmm_jax.train import state as train_state_lib


# The measure lives in the library (the pseudo-label facility's).
confusion_of_pseudo_labels = pseudo_labels.confusion_with_dense
# The pass folders of the methods that write pseudo-labels.
PASS_FOLDERS = (spml_stage2.PSEUDO_LABEL_DIR, cam_stages.PSEUDO_LABEL_DIR)


def pass_folder(workdir: str, name: str = '') -> str:
  """``WORKDIR/NAME``, or the one of ``PASS_FOLDERS`` that exists in it;
  a one-line ValueError when none (or, without a name, several) exist."""
  names = [name] if name else [n for n in PASS_FOLDERS
                               if os.path.isdir(os.path.join(workdir, n))]
  if len(names) != 1 or not os.path.isdir(os.path.join(workdir, names[0])):
    raise ValueError(f'{workdir}: expected one pseudo-label folder of {PASS_FOLDERS} '
                     f'(--folder picks one), found {names}')
  return os.path.join(workdir, names[0])


def first_records(data_dir: str, split: str, limit: int, out_dir: str) -> str:
  """A prepared dataset in `out_dir` holding the first `limit` records of
  `data_dir`'s `split` (and only that split); returns `out_dir`."""
  metadata = input_pipeline.read_metadata(data_dir)
  info = metadata['splits'][split]
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, name) for name in info['shards']])
  count = min(limit, len(source))
  os.makedirs(out_dir, exist_ok=True)
  shard = f'{split}-00000-of-00001.tfrecord'
  with tfrecord.TFRecordWriter(os.path.join(out_dir, shard)) as writer:
    for i in range(count):
      writer.write(source[i].data)
  subset = dict(metadata, splits={split: dict(info, shards=[shard], num_examples=count)})
  with open(os.path.join(out_dir, input_pipeline.METADATA_FILE), 'w', encoding='utf-8') as f:
    json.dump(subset, f, indent=2)
  return out_dir


def regenerate(workdir: str, out: str, *, flip: bool, crf_iterations: int, limit: int,
               data_dir: str) -> str:
  """Writes `out/spml_pseudo_labels` from `workdir`'s latest stage-1
  checkpoint (read only) with the given stage-2 settings; returns its path."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.data.dir = data_dir or config.data.dir
  if limit > 0:
    config.data.dir = first_records(config.data.dir, str(config.data.train_split), limit,
                                    os.path.join(out, 'data'))
  config.spml_stage2.flip = flip
  config.spml_stage2.crf_iterations = crf_iterations
  spml_stage2.check_config(config)
  class_names = input_pipeline.class_names(input_pipeline.read_metadata(config.data.dir))
  num_classes = len(class_names)
  mesh = sharding_lib.create_mesh(config.mesh)
  loss = methods.build_loss(config.loss)
  state, model_defs, _ = train_state_lib.create_train_state(
      config, num_classes, mesh, total_steps=1, extra_heads=loss.needs.heads,
      method_state=loss.init_state(int(config.global_batch_size), num_classes),
      load_pretrained=False)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    state, step = checkpointer.restore_latest(checkpoint_lib.abstract_like(state))
  finally:
    checkpointer.close()
  print(f'{workdir}: stage-1 step {step}, flip {flip}, CRF iterations {crf_iterations}')
  return spml_stage2.write_pseudo_labels(
      config, os.path.join(out, spml_stage2.PSEUDO_LABEL_DIR), state, model_defs, loss, mesh,
      int(config.eval.batch_size))


def machine() -> str:
  """The CPU's model name (/proc/cpuinfo) and count, and JAX's platform."""
  name = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    name = names[0] if names else name
  return f'{os.cpu_count()}-core {name}, {jax.devices()[0].platform}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir', help='the workdir of an spml run')
  parser.add_argument('--regenerate', default='', metavar='OUT',
                      help='write the pseudo-labels anew into OUT and measure those')
  parser.add_argument('--flip', action='store_true', help='with --regenerate: SPML\'s flip')
  parser.add_argument('--crf-iterations', type=int, default=0,
                      help='with --regenerate: SPML\'s CRF iterations (0: none)')
  parser.add_argument('--limit', type=int, default=0,
                      help='with --regenerate: the first LIMIT training records (0: all)')
  parser.add_argument('--data-dir', default='',
                      help='with --regenerate: the prepared data (default: the config\'s)')
  parser.add_argument('--folder', default='', choices=('',) + PASS_FOLDERS,
                      help='the pass folder in WORKDIR (default: the one that exists)')
  args = parser.parse_args()
  if args.regenerate:
    if os.path.exists(os.path.join(args.regenerate, spml_stage2.PSEUDO_LABEL_DIR)):
      parser.error(f'--regenerate: {args.regenerate}/{spml_stage2.PSEUDO_LABEL_DIR} exists')
    start = time.perf_counter()
    folder = regenerate(args.workdir, args.regenerate, flip=args.flip,
                        crf_iterations=args.crf_iterations, limit=args.limit,
                        data_dir=args.data_dir)
    print(f'pass: {time.perf_counter() - start:.0f} s (compile included) on {machine()}')
  else:
    try:
      folder = pass_folder(args.workdir, args.folder)
    except ValueError as error:
      parser.exit(1, f'error: {error}\n')
  confusion, pseudo_labeled, dense_labeled = confusion_of_pseudo_labels(folder)
  scores = metrics.segmentation_scores(confusion)
  classes = input_pipeline.class_names(input_pipeline.read_metadata(folder))
  print(f'{folder}: pseudo-labels on {100 * pseudo_labeled / dense_labeled:.1f}%'
        ' of the densely labeled training pixels, seed precision '
        f'{100 * np.trace(confusion) / max(pseudo_labeled, 1):.1f}%')
  print(metrics.format_iou_table(scores['per_class_iou'], classes,
                                 scores['miou'], scores['pixel_accuracy']))


if __name__ == '__main__':
  main()
