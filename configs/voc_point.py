r"""PASCAL VOC 2012, point supervision, the official AGMM protocol.

ResNet-101 (deep stem), output stride 8, ASPP rates 6/12/18, crop 321, SGD
(momentum 0.9, weight decay 1e-4), lr 1e-3 with the head at 10x, poly 0.9,
80 epochs, global batch 16 (all devices together).

The loss is the `agmm_released` preset; choose another with the config
argument `method`, e.g. `--config=configs/voc_point.py:method=agmm_paper`
(`agmm_released`, `agmm_paper`, `pce_only`, `tel`, `apro`).

Prepare the data once (see README; the official training list is the
10582-image augmented set, AGMM's dataset/splits/pascal/train.txt), convert the
ImageNet backbone, then:

  python -m data_prep.voc --root=VOCdevkit/VOC2012 --sparse_dir=point \
      --split_file=train=splits/pascal/train.txt --output=data/voc_point
  python -m data_prep.convert_torch_weights --input=resnet101.pth \
      --output=weights/resnet101_deep
  python main.py --config=configs/voc_point.py --workdir=runs/voc_point \
      --config.data.dir=data/voc_point \
      --config.model.pretrained=weights/resnet101_deep
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {'method': 'agmm_released'})
  config = common.base_config()
  common.set_method(config, args['method'])
  config.data.dir = 'data/voc_point'
  config.model.pretrained = 'weights/resnet101_deep'
  return config
