r"""Cityscapes with 20, 50 or 100 clicks per image, official AGMM protocol.

ResNet-50 (deep stem) with multi-grid (2, 2, 4), output stride 8, ASPP rates
12/24/36, crop 721, no colour augmentation, lr 5e-3 with the head at 1x, poly
0.9, 240 epochs, global batch 16, sliding-window evaluation. The argument
after the colon selects the click density (default clicks=20) and the loss
preset (method=agmm_released | agmm_paper | pce_only | tel | apro; TEL takes
its Cityscapes bandwidth sigma=0.002):

  python -m data_prep.cityscapes --root=cityscapes --clicks=50 \
      --output=data/cityscapes_50clicks
  python main.py --config=configs/cityscapes_clicks.py:clicks=50 \
      --workdir=runs/cityscapes_50clicks \
      --config.model.pretrained=weights/resnet50_deep
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {'clicks': '20', 'method': 'agmm_released'})
  if args['clicks'] not in ('20', '50', '100'):
    raise ValueError(f'clicks must be 20, 50 or 100, got {args["clicks"]}')
  config = common.base_config()
  common.set_method(config, args['method'])
  config.loss.tel.sigma = 0.002
  config.num_epochs = 240
  config.data.dir = f'data/cityscapes_{args["clicks"]}clicks'
  config.data.crop_size = 721
  config.data.augment = 'basic'
  config.data.eval_canvas = (1024, 2048)
  config.model.depth = 50
  config.model.multi_grid = True
  config.model.aspp_rates = (12, 24, 36)
  config.model.pretrained = 'weights/resnet50_deep'
  config.optimizer.lr = 5e-3
  config.optimizer.head_lr_multiplier = 1.0
  config.eval.mode = 'sliding_window'
  config.eval.batch_size = 2
  return config
