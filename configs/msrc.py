r"""MSRC-v2 (21 classes, ~2.5 per image): the dataset of the coarse weak labels.

The data are read from ../shared/datasets/msrc (train 276 / val 59, void 255;
its README.md) and converted on first use into data/msrc_LABELS_lseedS, with
the weak labels of the project's seeded generator. Arguments:

  labels  tags (the image-level classes) | boxes (default: one box per
          8-connected region of each class of at least BOX_MIN_AREA pixels;
          boxes:min_area=A for another area) | points:N | clicks:N |
          scribbles (any generator spec, data_prep/sparse_labels.py) |
          dense (full supervision)
  method  a preset of configs/presets.py. With pixel labels: the loss
          (default agmm_released; pce_only for dense). With boxes, a box
          preset (box_pce, the default; box_pce_gatedcrf; boxinst;
          box_fill) trains the box losses in one stage. With tags, or boxes and a pixel preset,
          the method is the segmenter of the CAM stages
          (agmm_jax/methods/cam_stages.py; default pce_only): a classifier
          trained on the tags (config.cam.num_epochs, here the segmenter's
          40), its class activation maps restricted to the tags (or, with
          boxes, each class to its boxes: SPML's box seeds) turned into
          pseudo-labels by IRN's thresholds and dense CRF (their quality
          against the dense labels in WORKDIR/cam_pseudo_labels/quality.json),
          then the method trained on them, from the classifier's network.
          method=cam (presets.TAG_PRESETS) is the CAM stages with pCE,
          from tags or (each class to its boxes) from boxes.
          MSRC has no background class: the box terms leave pixels in no box
          out, and the CAM seeds leave unsure pixels unlabeled.
  size    cpu (ResNet-18 from scratch at full resolution, crop 161, batch 8,
          40 epochs)
  lseed   seed of the sparse-label generator (default 0; boxes and tags do
          not depend on it)

  python main.py --config=configs/msrc.py:labels=boxes,method=box_pce_gatedcrf \
      --workdir=runs/msrc_boxes --config.seed=1
  python main.py --config=configs/msrc.py:labels=tags,method=pce_only \
      --workdir=runs/msrc_tags
  python main.py --config=configs/msrc.py:labels=boxes,method=pce_only \
      --workdir=runs/msrc_box_cams
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
  if labels in ('dense', 'tags'):
    return {'dense': '', 'tags': 'tags'}[labels]
  if labels == 'boxes':
    return f'boxes:min_area={BOX_MIN_AREA}'
  return str(sparse_labels.parse_spec(labels))


def _method(labels: str, method: str) -> str:
  """The preset, checked against the kind of labels."""
  is_boxes = labels.startswith('boxes')
  if not method:
    return {'dense': 'pce_only', 'tags': 'pce_only'}.get(
        labels, 'box_pce' if is_boxes else 'agmm_released')
  if method in presets.TAG_PRESETS:
    if labels != 'tags' and not is_boxes:
      raise ValueError(f'method={method} needs labels=tags or boxes, got '
                       f'labels={labels}')
    return presets.TAG_SEGMENTERS[method]
  if method == common.FULL and (is_boxes or labels == 'tags'):
    raise ValueError(f'method={method} trains on dense labels; use labels=dense')
  if not is_boxes and method in BOX_METHODS:
    raise ValueError(f'method={method} needs labels=boxes, got labels='
                     f'{labels}')
  return method


def _uses_cams(labels: str, method: str) -> bool:
  """Tags, and boxes with a pixel-label method, train on CAM pseudo-labels."""
  return labels == 'tags' or (labels.startswith('boxes') and method not in BOX_METHODS)


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
  # MSRC has no background class (every class has boxes).
  config.loss.background_class = boxes.NO_BACKGROUND
  if _uses_cams(args['labels'], method):
    config.cam.enabled = True
    config.cam.restrict = 'tags' if args['labels'] == 'tags' else 'boxes'
    config.cam.num_epochs = config.num_epochs
    # The segmenter starts from the CAM classifier's network
    # (cam.segmenter_init), not from a pCE warm-up on the pseudo-labels.
    config.warmup.fraction = 0.0
  return config
