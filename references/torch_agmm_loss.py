"""PyTorch port of the official AGMM-SASS loss (``train_voc.py``,
``model/tools.py`` of Luffy03/AGMM-SASS), written from the official code as an
independent reference: tests/methods/test_agmm.py checks the released preset
against it, benchmarks/bench_losses.py times it."""

import numpy as np

from agmm_jax.data import labels as labels_lib


def torch_half_pixel_resize(x_nhwc, size):
  """Independent resize reference: torch ``F.interpolate`` default bilinear."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float64))).permute(0, 3, 1, 2)
  return F.interpolate(x, size=size, mode='bilinear').permute(0, 2, 3, 1).numpy()


def to_official_mask(label, num_classes):
  """agmm_jax labels -> the official encoding (unlabeled K, padding 255)."""
  mask = np.array(label, np.int64)
  mask[label == labels_lib.UNLABELED] = num_classes
  mask[label == labels_lib.PADDING] = 255
  return mask


def torch_official_loss(logits, features, mask, class_present, num_classes):
  """PyTorch port of the official ``train_voc.py`` loss (model/tools.py).

  Args are NCHW torch tensors (logits, features), the official mask encoding
  and the pre-crop class labels. Returns the four terms as a dict of scalars.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  eps = 1e-6
  k = num_classes
  batch, channels = features.shape[:2]

  def one_hot(m):
    clipped = m.clone()
    clipped[m > k] = k
    return F.one_hot(clipped, k + 1).permute(0, 3, 1, 2)[:, :k].to(logits.dtype)

  # seg_loss: loss_calc(pred, mask, ignore_index=nclass).
  target = mask.clone()
  target[mask == k] = 255
  seg_loss = F.cross_entropy(logits, target, ignore_index=255)
  # cls_loss: get_cls_loss(pred, cls_label, mask).
  probs = torch.softmax(logits, dim=1)
  cls_loss = -(1 - class_present[:, :, None, None]) * torch.log(1 - probs + eps)
  cls_loss = cls_loss.sum(1)[mask != 255].mean()
  # build_cur_cls_label.
  crop_present = one_hot(mask).amax(dim=(2, 3))
  # cal_protypes + proto_loss: per-image class loops on upsampled features.
  upsampled = F.interpolate(features, size=mask.shape[-2:], mode='bilinear')
  prototypes = torch.zeros(batch, k, channels, dtype=features.dtype)
  for i in range(batch):
    for class_id in torch.unique(mask[i]).tolist():
      if class_id >= k:
        continue
      selected = mask[i] == class_id
      count = selected.to(features.dtype).sum()  # the official one-hot is float
      prototypes[i, class_id] = upsampled[i][:, selected].sum(-1) / (count + eps)
  images_with_class = crop_present.sum(0)[:, None]
  vecs = prototypes.sum(0) * images_with_class / (images_with_class + eps)
  negative = torch.zeros((), dtype=features.dtype)
  pairs = 0
  for i in range(k):
    for j in range(i + 1, k):
      if images_with_class[i] > 0 and images_with_class[j] > 0:
        pairs += 1
        distance = torch.abs(vecs[i] - vecs[j]).mean()
        negative = negative + torch.exp(-(distance * distance))
  proto_loss = negative / (pairs + eps)
  # GMM(feat, vecs, pred_cl, mask, cur_cls_label).
  preserve = F.interpolate((mask < 255).to(features.dtype)[:, None],
                           size=features.shape[-2:], mode='bilinear')
  distance = torch.abs(features[:, None] - prototypes[:, :, :, None, None]).mean(2)
  distance = distance * crop_present[:, :, None, None] * preserve
  response = F.interpolate(torch.exp(-(distance * distance)), size=mask.shape[-2:],
                           mode='bilinear') * crop_present[:, :, None, None]
  # cal_gmm_loss(pred.softmax(1), res, cur_cls_label, mask).
  gate = crop_present[:, :, None, None]
  loss1 = (-response * torch.log(probs + eps) - (1 - response) * torch.log(1 - probs + eps)) / 2
  loss1 = ((loss1 * gate).sum(1) / (gate.sum(1) + eps))[mask != 255].mean()
  targets = one_hot(mask)
  loss2 = (-targets * torch.log(response + eps)
           - (1 - targets) * torch.log(1 - response + eps)) / 2
  loss2 = ((loss2 * gate).sum(1) / (gate.sum(1) + eps))[mask < k].mean()
  return {'pce': seg_loss, 'absent_class': cls_loss, 'prototype': proto_loss,
          'gmm': loss1 + loss2}
