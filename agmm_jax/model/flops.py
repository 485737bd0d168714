"""FLOPs of a model counted from its own layer shapes (not XLA's cost analysis).

XLA's ``cost_analysis`` does not count convolutions that run as cuDNN custom
calls, so on GPU it reports a fraction of the real work (issue 17). Here the
model's forward pass is traced to a jaxpr (shapes only, nothing runs) and
every convolution and matrix product in it is counted:

* ``conv_general_dilated``: ``2 * prod(output shape) * k_h * k_w * C_in / groups``
  (the kernel's input-feature axis is already ``C_in / groups``); strides and
  dilations enter through the output shape and are otherwise free; padded
  positions count like any other, as in PyTorch's ``FlopCounterMode``.
* ``dot_general`` (einsums, matmuls, the bilinear resizes written as
  matmuls): ``2 * prod(output shape) * prod(contracted sizes)``.

A multiply-add is 2 FLOPs. Elementwise work (BatchNorm, ReLU, softmax) is not
counted, as in the usual convention.

Training: ``TRAIN_FLOPS_PER_FORWARD = 3``: the backward pass costs two
forwards, the input gradient and the weight gradient of every layer each
having the forward's FLOPs. PyTorch's ``FlopCounterMode`` counts the same way
but skips gradients nobody asked for, i.e. the input gradient of the first
convolution (the images need none): its figure is ``3 F - first_conv``.

The count is of the architecture: ``model_forward_flops`` traces the model as
built (``config.model.dilated_conv = 'space_to_batch'`` pads the sub-grids to
multiples of the rate and so counts more; ``'taps'``, the CPU default, skips
the padding and counts less); ``architecture_forward_flops``
always counts the plain dilated convolutions.
"""

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
from jax.extend import core
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agmm_jax.model import deeplab

TRAIN_FLOPS_PER_FORWARD = 3
# Dense bfloat16 peak FLOP/s per device, by device kind (substring match).
BF16_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                   'L4': 121e12, 'TPU v5 lite': 197e12, 'TPU v4': 275e12}


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs of one traced function.

  ``convolution`` and ``matmul`` are the totals of the two kinds;
  ``first_convolution`` is the first conv of the trace (the stem's, whose
  input gradient a training step does not compute).
  """
  convolution: float
  matmul: float
  first_convolution: float

  @property
  def forward(self) -> float:
    return self.convolution + self.matmul

  @property
  def train(self) -> float:
    """Forward + backward, backward = 2 x forward."""
    return TRAIN_FLOPS_PER_FORWARD * self.forward


def conv_flops(rhs_shape: Sequence[int], out_shape: Sequence[int],
               dimension_numbers: Any) -> float:
  """``2 * prod(out_shape) * prod(kernel spatial) * kernel input features``."""
  rhs_spec = dimension_numbers.rhs_spec
  kernel_inputs = rhs_shape[rhs_spec[1]]
  kernel_spatial = np.prod([rhs_shape[axis] for axis in rhs_spec[2:]])
  return 2.0 * float(np.prod(out_shape)) * float(kernel_spatial) * kernel_inputs


def dot_flops(lhs_shape: Sequence[int], out_shape: Sequence[int],
              dimension_numbers: Any) -> float:
  """``2 * prod(out_shape) * prod(lhs contracted sizes)``."""
  (lhs_contracting, _), _ = dimension_numbers
  contracted = np.prod([lhs_shape[axis] for axis in lhs_contracting])
  return 2.0 * float(np.prod(out_shape)) * float(contracted)


def _sub_jaxprs(value: Any) -> Iterator[core.Jaxpr]:
  if isinstance(value, core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _walk(jaxpr: core.Jaxpr, multiplier: float, found: list[tuple[str, float]]
          ) -> None:
  """Appends ``(kind, flops)`` of every conv and dot of ``jaxpr`` in order."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      found.append(('convolution', multiplier * conv_flops(
          eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape,
          eqn.params['dimension_numbers'])))
    elif name == 'dot_general':
      found.append(('matmul', multiplier * dot_flops(
          eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape,
          eqn.params['dimension_numbers'])))
    else:
      # A scan body runs `length` times; other sub-jaxprs (jit, custom
      # derivatives, remat) once.
      repeat = float(eqn.params.get('length', 1)) if name == 'scan' else 1.0
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          _walk(sub, multiplier * repeat, found)


def count_flops(fn: Callable[..., Any], *args: Any) -> FlopCount:
  """Forward FLOPs of ``fn(*args)``; ``args`` may be ``jax.ShapeDtypeStruct``s."""
  closed = jax.make_jaxpr(fn)(*args)
  found: list[tuple[str, float]] = []
  _walk(closed.jaxpr, 1.0, found)
  convs = [flops for kind, flops in found if kind == 'convolution']
  return FlopCount(convolution=float(sum(convs)),
                   matmul=float(sum(f for kind, f in found if kind == 'matmul')),
                   first_convolution=float(convs[0]) if convs else 0.0)


def model_forward_flops(model: nnx.Module, image_shape: Sequence[int],
                        dtype: Any = jnp.float32) -> FlopCount:
  """Forward FLOPs of ``model(images)`` for ``images`` of ``image_shape``
  ``[B, H, W, 3]``, in eval mode (dropout and BatchNorm cost no FLOPs
  counted here). ``model`` may be abstract (``nnx.eval_shape``)."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    module = nnx.merge(graphdef, state)
    module.eval()
    return module(images)

  abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return count_flops(forward, abstract_state,
                     jax.ShapeDtypeStruct(tuple(image_shape), dtype))


def architecture_forward_flops(model_config: ml_collections.ConfigDict,
                               num_classes: int, image_shape: Sequence[int]
                               ) -> FlopCount:
  """Forward FLOPs of the DeepLabV3+ of ``config.model`` (built abstractly,
  with plain dilated convolutions whatever ``dilated_conv`` says)."""
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.dilated_conv = 'xla'
  model = nnx.eval_shape(lambda: deeplab.build_model(
      model_config, num_classes, rngs=nnx.Rngs(0)))
  return model_forward_flops(model, image_shape)


def bf16_peak_flops(device: Any) -> float | None:
  """Dense bfloat16 peak FLOP/s of ``device`` (``BF16_PEAK_FLOPS``), or None."""
  return next((v for k, v in BF16_PEAK_FLOPS.items()
               if k in device.device_kind), None)
