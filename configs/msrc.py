r"""MSRC-v2 (21 classes, ~2.5 per image): the dataset of the coarse weak labels.

The data are read from ../shared/datasets/msrc (train 276 / val 59, void 255;
its README.md) and converted on first use into data/msrc_LABELS_lseedS, with
the weak labels of the project's seeded generator. Arguments:

  labels  boxes (default: one box per 8-connected region of each class of at
          least BOX_MIN_AREA pixels; boxes:min_area=A for another area) |
          tags (needs the CAM stages, not yet landed) | points:N | clicks:N |
          scribbles (any generator spec, data_prep/sparse_labels.py) |
          dense (full supervision)
  method  a preset of configs/presets.py; default: box_pce for boxes,
          pce_only for dense, agmm_released otherwise. The box presets
          (box_pce, box_pce_gatedcrf, boxinst) need labels=boxes and the
          others need pixel labels. MSRC has no background class, so the box
          terms leave pixels in no box out (agmm_jax/methods/boxes.py).
  size    cpu (ResNet-18 from scratch at full resolution, crop 161, batch 8,
          40 epochs)
  lseed   seed of the sparse-label generator (default 0; boxes and tags do
          not depend on it)

  python main.py --config=configs/msrc.py:labels=boxes,method=box_pce_gatedcrf \
      --workdir=runs/msrc_boxes --config.seed=1
"""

import ml_collections

from agmm_jax.methods import boxes
from configs import common
from configs import presets
from data_prep import sparse_labels

_DEFAULTS = {'labels': 'boxes', 'method': '', 'size': 'cpu', 'lseed': '0'}
SIZES = ('cpu',)
# Regions smaller than this get no box (0.15% of a 320x213 image).
BOX_MIN_AREA = 100
BOX_METHODS = presets.BOX_PRESETS


def _labels_spec(labels: str) -> str:
  """The generator spec of the labels argument ('' for dense)."""
  if labels == 'dense':
    return ''
  if labels == 'tags':
    raise ValueError('labels=tags: tags need the CAM stages (not yet landed)')
  if labels == 'boxes':
    return f'boxes:min_area={BOX_MIN_AREA}'
  return str(sparse_labels.parse_spec(labels))


def _method(labels: str, method: str) -> str:
  """The preset, checked against the kind of labels."""
  is_boxes = labels.startswith('boxes')
  if not method:
    return 'box_pce' if is_boxes else (
        'pce_only' if labels == 'dense' else 'agmm_released')
  if is_boxes and method not in BOX_METHODS:
    raise ValueError(f'method={method} needs labeled pixels; with labels='
                     f'{labels} use one of {BOX_METHODS}')
  if not is_boxes and method in BOX_METHODS:
    raise ValueError(f'method={method} needs labels=boxes, got labels='
                     f'{labels}')
  return method


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, _DEFAULTS)
  if args['size'] not in SIZES:
    raise ValueError(f'size must be one of {SIZES}, got {args["size"]!r}')
  spec = _labels_spec(args['labels'])
  method = _method(args['labels'], args['method'])
  config = common.base_config()
  labels_tag = (spec or 'dense').replace(':', '').replace('=', '')
  config.data.dir = f'data/msrc_{labels_tag}_lseed{args["lseed"]}'
  config.data.prepare.converter = 'folder'
  config.data.prepare.root = '../shared/datasets/msrc'
  # Dense-only preparation still writes generated points the run ignores.
  config.data.prepare.sparse = spec or 'points:1'
  config.data.prepare.void_value = 255
  config.data.prepare.seed = int(args['lseed'])
  config.data.prepare.dense_train = True
  config.data.augment = 'basic'
  config.model.pretrained = ''
  config.model.depth = 18
  config.model.stem = 'torchvision'
  config.model.output_stride = 16
  config.model.aspp_rates = (6, 12, 18)
  config.optimizer.lr = 1e-2
  config.optimizer.head_lr_multiplier = 1.0
  config.data.crop_size = 161
  config.global_batch_size = 8
  config.num_epochs = 40
  config.eval.mode = 'whole'
  config.eval.batch_size = 8
  config.checkpoint_every_steps = 200
  config.log_every_steps = 20
  if args['labels'] == 'dense':
    config.data.train_labels = 'dense'
  common.set_method(config, method)
  if method in BOX_METHODS:
    # MSRC has no background class (every class has boxes).
    config.loss.background_class = boxes.NO_BACKGROUND
  return config
