r"""PASCAL VOC 2012, scribble supervision (ScribbleSup), official AGMM protocol.

Same protocol as voc_point.py (ResNet-101 deep stem, OS 8, ASPP 6/12/18, crop
321, lr 1e-3 with head x10, poly 0.9, 80 epochs, global batch 16, config
argument `method`); only the sparse labels differ.

  python -m data_prep.voc --root=VOCdevkit/VOC2012 --sparse_dir=scribble \
      --output=data/voc_scribble
  python main.py --config=configs/voc_scribble.py --workdir=runs/voc_scribble \
      --config.model.pretrained=weights/resnet101_deep
"""

import ml_collections

from configs import voc_point


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = voc_point.get_config(arg)
  config.data.dir = 'data/voc_scribble'
  return config
