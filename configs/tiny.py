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
from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # The demo's run, shrunk: the demo's data at a quarter of its size, a few
  # steps, small crops; only what differs from the demo is set here.
  config = demo.get_config(arg)
  config.num_epochs = common.base_config().num_epochs
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.image_summary_every_steps = 2

  config.data.prepare.sparse = 'clicks:10'
  config.data.prepare.downscale = 4
  config.data.crop_size = 33
  config.data.scale_range = (0.75, 1.25)
  config.data.num_threads = 1
  config.data.prefetch = 1

  config.model.aspp_rates = (1, 2, 3)
  config.optimizer.head_lr_multiplier = common.base_config().optimizer.head_lr_multiplier

  config.eval.scales = (0.75, 1.0)
  config.predict.input_dir = ''
  return config
