r"""CamVid (11 classes, real street photos) with synthesized sparse labels.

The real-data benchmark of this project (docs/results.md). The data are read
from ../shared/datasets/camvid (or --config.data.prepare.root) and converted on
first use into --config.data.dir, with sparse labels from the project's seeded
generator. The argument after the colon selects the cell of the study:

  labels  generator spec: clicks:20 (default), clicks:100, points:1, ...
  method  agmm_released (default) | agmm_paper | pce_only | tel | apro | full
          (dense labels)
  size    cpu (default: ResNet-18 from scratch at half resolution, 2-core
          friendly) | gpu (ResNet-50 deep stem, OS 8, full resolution) |
          gpu_r18 (the cpu model at full resolution, batch 16: the GPU
          study's backbone, chosen so its grid fits the fewest device calls;
          see benchmarks/camvid_study.py --plan --preset=gpu)
  lseed   seed of the sparse-label generator (default 0)

  python main.py --config=configs/camvid_clicks.py:labels=clicks:20,method=pce_only \
      --workdir=runs/camvid_clicks20_pce --config.seed=1
"""

import ml_collections

from configs import common

_DEFAULTS = {'labels': 'clicks:20', 'method': 'agmm_released', 'size': 'cpu',
             'lseed': '0'}
SIZES = ('cpu', 'gpu', 'gpu_r18')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, _DEFAULTS)
  if args['size'] not in SIZES:
    raise ValueError(f'size must be one of {SIZES}, got {args["size"]!r}')
  config = common.base_config()
  labels_tag = args['labels'].replace(':', '').replace('=', '')
  resolution = 'half' if args['size'] == 'cpu' else 'full'
  config.data.dir = f'data/camvid_{resolution}_{labels_tag}_lseed{args["lseed"]}'
  config.data.prepare.converter = 'folder'
  config.data.prepare.root = '../shared/datasets/camvid'
  config.data.prepare.sparse = args['labels']
  config.data.prepare.void_value = 11
  config.data.prepare.seed = int(args['lseed'])
  config.data.prepare.downscale = 2 if args['size'] == 'cpu' else 1
  config.data.augment = 'basic'
  config.optimizer.lr = 1e-2
  config.optimizer.head_lr_multiplier = 1.0
  config.checkpoint_every_steps = 200
  config.log_every_steps = 20

  common.set_method(config, args['method'])

  if args['size'] == 'cpu':
    config.model.depth = 18
    config.model.stem = 'torchvision'
    config.model.output_stride = 16
    config.data.crop_size = 161
    config.global_batch_size = 8
    config.num_epochs = 40
  elif args['size'] == 'gpu_r18':
    config.model.depth = 18
    config.model.stem = 'torchvision'
    config.model.output_stride = 16
    config.data.crop_size = 353
    config.data.eval_canvas = (360, 480)
    config.global_batch_size = 16
  else:
    config.model.depth = 50
    config.model.output_stride = 8
    config.data.crop_size = 353
    config.global_batch_size = 16
    config.num_epochs = 200
  return config
