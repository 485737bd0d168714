"""Layer kinds of an XLA:CPU step's HLO instructions, and PyTorch's profile.

``hlo_kinds(compiled.as_text())`` names the layer kind of every instruction
of an optimized HLO module (an XLA:CPU thunk is one such instruction):
convolutions by kernel, dilation, stride and pass (forward, input gradient,
weight gradient), read from the convolution's window; the rest by the source
frames of its metadata (BatchNorm, resizes, max-pool, loss, optimizer; the
matmuls of ``dilated_conv.tap_sum_conv`` as dilated convs, those of
``pointwise_dot_conv`` as 1x1 convs) and,
for fusions that only move data, ``layout transpose/copy``. JAX names
backward ops ``transpose(jvp(...))``, which separates the passes.

``profile_torch(step, n)`` runs ``n`` steps under ``torch.profiler`` and sums
the self CPU time of aten ops by the same kinds (convolutions by kernel from
the weight's shape; dilated and plain 3x3 convs with equal shapes are split
by the kind most convs of those shapes have, since aten's events carry
shapes only).
"""

import collections
import re
from typing import Any, Callable

_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\((.*)$')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')


def _tables(hlo_text: str) -> dict[int, list[tuple[str, str]]]:
  """stack_frame_id -> [(file, function), ...] innermost first."""
  section, rows = None, collections.defaultdict(dict)
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      continue
    match = _TABLE_ROW.match(line)
    if section and match:
      rows[section][int(match.group(1))] = match.group(2)
    elif line.startswith('%') or line.startswith('ENTRY'):
      section = None
  files, functions = rows['FileNames'], rows['FunctionNames']
  locations = {}
  for key, text in rows['FileLocations'].items():
    fields = dict(re.findall(r'(\w+)=(\d+)', text))
    locations[key] = (files.get(int(fields['file_name_id']), '').strip('"'),
                      functions.get(int(fields['function_name_id']), '')
                      .strip('"'))
  frames = {}
  for key, text in rows['StackFrames'].items():
    fields = dict(re.findall(r'(\w+)=(\d+)', text))
    frames[key] = (int(fields['file_location_id']),
                   int(fields.get('parent_frame_id', 0)))
  chains = {}
  for key in frames:
    chain, frame, seen = [], key, set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      location, parent = frames[frame]
      chain.append(locations.get(location, ('', '')))
      frame = parent
    chains[key] = chain
  return chains


def _instructions(hlo_text: str) -> tuple[dict[str, list[dict[str, str]]],
                                           dict[str, dict[str, str]]]:
  """(computation -> its instructions, instruction name -> instruction)."""
  computations, by_name, current = {}, {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, shape, opcode, rest = match.groups()
      info = {'name': name, 'shape': shape, 'opcode': opcode, 'rest': rest}
      for key, pattern in (('op_name', r'op_name="([^"]*)"'),
                           ('frame', r'stack_frame_id=(\d+)'),
                           ('calls', r'calls=%([\w.\-]+)'),
                           ('window', r'window=\{([^}]*)\}')):
        found = re.search(pattern, rest)
        if found:
          info[key] = found.group(1)
      current.append(info)
      by_name[name] = info
  return computations, by_name


def _dims(text: str) -> list[int]:
  return [int(v) for v in text.split('x')]


def _conv_kind(conv: dict[str, str], backward: bool) -> str:
  """'conv 3x3 dilated: forward' etc. from a convolution's window."""
  window = dict(re.findall(r'(\w+)=(\S+)', conv.get('window', '')))
  size = _dims(window.get('size', '1'))
  stride = max(_dims(window.get('stride', '1')))
  lhs_dilate = max(_dims(window.get('lhs_dilate', '1')))
  rhs_dilate = max(_dims(window.get('rhs_dilate', '1')))
  if max(size) > 7:  # A weight gradient: the window is the output grid.
    out = [int(v) for v in re.findall(r'\d+', conv['shape'].split('[')[1])][1:3]
    kernel, dilation, conv_stride, kind = out, stride, rhs_dilate, 'weight grad'
  elif backward:
    kernel, dilation, conv_stride, kind = size, rhs_dilate, lhs_dilate, 'input grad'
  else:
    kernel, dilation, conv_stride, kind = size, rhs_dilate, stride, 'forward'
  name = f'conv {kernel[0]}x{kernel[-1]}'
  if dilation > 1:
    name += ' dilated'
  if conv_stride > 1:
    name += ' stride 2'
  return f'{name}: {kind}'


def _source_kind(files_functions: set[tuple[str, str]]) -> str | None:
  text = ' '.join(f'{f} {g}' for f, g in files_functions)
  for needle, kind in (('BatchNorm', 'BatchNorm'), ('resample', 'resizes'),
                       ('max_pool', 'max-pool'), ('Dropout', 'dropout'),
                       ('agmm_jax/methods', 'loss'), ('optax', 'optimizer'),
                       ('ASPPPooling', 'ASPP pooling')):
    if needle in text:
      return kind
  return None


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> layer kind, for every instruction of the module."""
  chains = _tables(hlo_text)
  computations, by_name = _instructions(hlo_text)
  kinds = {}
  for name, info in by_name.items():
    ops = computations.get(info.get('calls'), [info]) or [info]
    backward = any('transpose(' in op.get('op_name', '') for op in ops + [info])
    pass_name = 'backward' if backward else 'forward'
    convs = [op for op in ops if op['opcode'] == 'convolution']
    if convs:
      kinds[name] = _conv_kind(convs[0], backward)
      continue
    frames = set()
    for op in ops + [info]:
      if 'frame' in op:
        frames.update(chains.get(int(op['frame']), []))
    if any(op['opcode'] == 'dot' for op in ops):
      functions = {function for _, function in frames}
      if 'tap_sum_conv' in functions:
        kinds[name] = f'conv 3x3 dilated as taps (dots): {pass_name}'
      elif any('pointwise_' in function for function in functions):
        # [M, O] x [C, O] -> [M, C] contracts both operands' minor (channel)
        # dims; the weight gradient contracts the grid (M).
        dot = [op for op in ops if op['opcode'] == 'dot'][0]
        channels = ('lhs_contracting_dims={1}, rhs_contracting_dims={1}'
                    in dot['rest'])
        kinds[name] = 'conv 1x1 as dots: ' + (
            'forward' if not backward else
            'input grad' if channels else 'weight grad')
      else:
        kinds[name] = f'dot (resize, other): {pass_name}'
      continue
    source = _source_kind(frames)
    movers = {'parameter', 'transpose', 'copy', 'bitcast', 'reshape',
              'broadcast', 'slice', 'concatenate', 'pad', 'tuple',
              'get-tuple-element', 'constant'}
    if source:
      kinds[name] = f'{source}: {pass_name}'
    elif all(op['opcode'] in movers for op in ops):
      kinds[name] = 'layout transpose/copy/pad/concat'
    else:
      kinds[name] = f'other elementwise (ReLU, adds): {pass_name}'
  return kinds


def sum_by(per_op: dict[str, float], kinds: dict[str, str]) -> dict[str, float]:
  totals = collections.Counter()
  for op, ms in per_op.items():
    totals[kinds.get(op, 'unattributed')] += ms
  return dict(totals)


def _torch_conv_kinds(step: Callable[[], float]) -> dict[tuple, list[str]]:
  """(input shape, weight shape) -> kinds of the model's convs of those shapes."""
  import torch  # pylint: disable=g-import-not-at-top
  kinds = collections.defaultdict(list)
  hooks = []
  for module in step.model.modules():
    if isinstance(module, torch.nn.Conv2d):
      def hook(module, inputs, _):
        k = module.kernel_size[0]
        name = f'conv {k}x{k}'
        if module.dilation[0] > 1:
          name += ' dilated'
        if module.stride[0] > 1:
          name += ' stride 2'
        kinds[(tuple(inputs[0].shape), tuple(module.weight.shape))].append(name)
      hooks.append(module.register_forward_hook(hook))
  with torch.no_grad():
    step.model(step.images)
  for handle in hooks:
    handle.remove()
  return kinds


def profile_torch(step: Callable[[], float], num_steps: int
                  ) -> tuple[dict[str, float], dict[str, float]]:
  """(ms/step by layer kind, ms/step by aten op) of ``step``'s self CPU time."""
  import torch  # pylint: disable=g-import-not-at-top
  conv_kinds = _torch_conv_kinds(step)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True) as prof:
    for _ in range(num_steps):
      step()
  by_kind, by_op = collections.Counter(), collections.Counter()
  for event in prof.events():
    ms = event.self_cpu_time_total / 1e3 / num_steps
    if ms <= 0:
      continue
    by_op[event.name] += ms
    by_kind[_torch_kind(event, conv_kinds)] += ms
  return dict(by_kind), dict(by_op)


def _torch_kind(event: Any, conv_kinds: dict[tuple, list[str]]) -> str:
  name = event.name
  shapes = [tuple(s) for s in (event.input_shapes or []) if s]
  if 'convolution' in name:
    backward = 'backward' in name
    key = (shapes[1], shapes[2]) if backward and len(shapes) > 2 else (
        tuple(shapes[:2]) if len(shapes) > 1 else None)
    names = conv_kinds.get(key, ['conv ?'])
    # Equal shapes, several kinds (plain and dilated 3x3): the first listed.
    kind = collections.Counter(names).most_common(1)[0][0]
    return f'{kind}: {"backward" if backward else "forward"}'
  for needle, kind in (('batch_norm', 'BatchNorm'), ('upsample', 'resizes'),
                       ('max_pool', 'max-pool'), ('nll_loss', 'loss'),
                       ('log_softmax', 'loss'), ('dropout', 'dropout'),
                       ('bernoulli', 'dropout'), ('Optimizer', 'optimizer'),
                       ('sgd', 'optimizer'), ('_foreach', 'optimizer')):
    if needle in name.lower():
      return f'{kind}: {"backward" if "backward" in name.lower() else "forward"}'
  if name in ('aten::copy_', 'aten::cat', 'aten::contiguous', 'aten::clone',
              'aten::zeros', 'aten::empty', 'aten::fill_', 'aten::zero_'):
    return 'layout transpose/copy/pad/concat'
  if 'relu' in name or 'threshold' in name or 'add' in name:
    return 'other elementwise (ReLU, adds)'
  return f'other ({name})'
