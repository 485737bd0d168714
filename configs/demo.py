r"""The demo: bundled CamVid subset, click labels, ResNet-18, CPU, minutes.

Runs on a fresh machine with no download: on first use it converts
demo_data/camvid_mini (48 train / 16 val street photos, 240x180, 11 classes)
with data_prep, synthesizing 50 clicks per training image with the seeded
generator, into WORKDIR/data; then trains AGMM (released form) from scratch,
evaluates, writes prediction PNGs and prints the final mIoU.

  python main.py --config=configs/demo.py --workdir=runs/demo

The config argument `method` picks the loss preset, e.g.
`--config=configs/demo.py:method=pce_only` for the partial cross-entropy
baseline. Its wall time and mIoU: `python -m benchmarks.demo_figures`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {'method': 'agmm_released'})
  config = common.base_config()
  common.set_method(config, args['method'])
  config.global_batch_size = 8
  config.num_epochs = -1
  config.num_train_steps = 320
  config.log_every_steps = 20
  config.eval_every_steps = 160
  config.checkpoint_every_steps = 80
  config.image_summary_every_steps = 80

  config.data.prepare.converter = 'folder'
  config.data.prepare.root = 'demo_data/camvid_mini'
  config.data.prepare.sparse = 'clicks:50'
  config.data.prepare.void_value = 11
  config.data.crop_size = 129
  config.data.augment = 'basic'
  config.data.num_threads = 2

  config.model.depth = 18
  config.model.stem = 'torchvision'
  config.model.output_stride = 16

  config.optimizer.lr = 1e-2
  config.optimizer.head_lr_multiplier = 1.0

  config.predict.input_dir = 'demo_data/camvid_mini/val/images'
  return config
