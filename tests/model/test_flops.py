"""agmm_jax.model.flops against counts written by hand and PyTorch's FlopCounterMode."""

import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from agmm_jax.model import flops


class _Small(nnx.Module):
  """conv 3x3/2 (3->8) -> dilated grouped conv 3x3 (8->4, rate 2, 2 groups)
  -> mean over space -> dense 4->5 -> einsum with a [5, 6] matrix."""

  def __init__(self, rngs):
    self.strided = nnx.Conv(3, 8, (3, 3), strides=(2, 2),
                            padding=((1, 1), (1, 1)), rngs=rngs)
    self.dilated = nnx.Conv(8, 4, (3, 3), kernel_dilation=(2, 2),
                            feature_group_count=2, padding='VALID',
                            use_bias=False, rngs=rngs)
    self.dense = nnx.Linear(4, 5, rngs=rngs)
    self.mix = nnx.Param(jnp.ones((5, 6)))

  def __call__(self, x):
    x = self.dilated(nnx.relu(self.strided(x)))
    x = self.dense(jnp.mean(x, axis=(1, 2)))
    return jnp.einsum('bk,kn->bn', x, self.mix[...])


def test_small_model_matches_hand_count():
  model = _Small(nnx.Rngs(0))
  count = flops.model_forward_flops(model, (2, 11, 10, 3))
  # strided: output 2 x 6 x 5 x 8 (ceil(11/2), ceil(10/2)), 3*3*3 MACs each.
  strided = 2 * (2 * 6 * 5 * 8) * (3 * 3 * 3)
  # dilated: window 5 x 5, output 2 x 2 x 1 x 4, each sums 3*3 taps of 8/2 inputs.
  dilated = 2 * (2 * 2 * 1 * 4) * (3 * 3 * 4)
  dense = 2 * 2 * 4 * 5
  mix = 2 * 2 * 5 * 6
  assert count.convolution == strided + dilated
  assert count.first_convolution == strided
  assert count.matmul == dense + mix
  assert count.train == 3 * (strided + dilated + dense + mix)


def test_deeplab_convolutions_match_torch_flop_counter():
  """The model's convolutions equal PyTorch's count of the same architecture
  (references/torch_deeplab.py), forward and forward + backward (PyTorch skips
  the first conv's input gradient); the resizes are matmuls here, uncounted
  there. Meta tensors: nothing is computed."""
  torch = pytest.importorskip('torch')
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  from references import torch_deeplab  # pylint: disable=g-import-not-at-top

  model_config = ml_collections.ConfigDict({
      'depth': 18, 'stem': 'deep', 'output_stride': 8, 'multi_grid': True,
      'aspp_rates': (2, 3, 5), 'compute_dtype': 'float32',
      'dilated_conv': 'space_to_batch'})
  count = flops.architecture_forward_flops(model_config, 5, (2, 37, 30, 3))
  reference = torch_deeplab.TorchDeepLabV3Plus(5, 18, True, 8, True, (2, 3, 5))
  reference = reference.to('meta')
  images = torch.empty(2, 3, 37, 30, device='meta')
  with flop_counter.FlopCounterMode(display=False) as forward_counter:
    reference(images)
  with flop_counter.FlopCounterMode(display=False) as train_counter:
    _, logits = reference(images)
    logits.sum().backward()
  assert count.convolution == forward_counter.get_total_flops()
  assert (3 * count.convolution - count.first_convolution
          == train_counter.get_total_flops())
  assert count.matmul > 0
