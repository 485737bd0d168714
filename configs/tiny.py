r"""A tiny configuration for tests and smoke runs (CPU, seconds per step).

ResNet-18 (torchvision stem) at output stride 16, 33x33 crops, global batch 8
(divisible by 1, 2, 4 or 8 devices), 4 steps with an evaluation at step 2 and
at the end. On first use it prepares its own data like the demo: the bundled
CamVid subset shrunk 4x (45x60 images, 10 clicks per training image) into
WORKDIR/data; or point ``data.dir`` at any prepared folder (the tests do):

  python main.py --config=configs/tiny.py --workdir=/tmp/agmm_tiny

The argument after the colon is that of the other configs:
``method=NAME`` (default agmm_released; configs/common.py METHODS), e.g.
``--config=configs/tiny.py:method=pce_only``.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {'method': 'agmm_released'})
  config = common.base_config()
  common.set_method(config, args['method'])
  config.global_batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.image_summary_every_steps = 2

  config.data.dir = ''
  config.data.prepare.converter = 'folder'
  config.data.prepare.root = 'demo_data/camvid_mini'
  config.data.prepare.sparse = 'clicks:10'
  config.data.prepare.void_value = 11
  config.data.prepare.downscale = 4
  config.data.crop_size = 33
  config.data.scale_range = (0.75, 1.25)
  config.data.augment = 'basic'
  config.data.num_threads = 1
  config.data.prefetch = 1

  config.model.depth = 18
  config.model.stem = 'torchvision'
  config.model.output_stride = 16
  config.model.aspp_rates = (1, 2, 3)
  config.model.pretrained = ''

  config.optimizer.lr = 1e-2

  config.eval.batch_size = 8
  config.eval.mode = 'whole'
  config.eval.scales = (0.75, 1.0)
  config.eval.flip = True
  return config
