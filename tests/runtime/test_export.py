"""TPU and GPU readiness without either: every preset's programs exported for
TPU and CUDA on a mesh of 8 fake CPU devices (agmm_jax/runtime/export.py).

A worker process per compute dtype, the two side by side
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set
before JAX starts; tracing and lowering run on one core, so two processes
shorten the wait: 114 -> 73 s on 2 vCPUs), exports, for every method a config can
name (``configs/common.METHODS``: the presets of ``configs/presets.py``, pixel
labels and boxes, and ``full``) in float32 and bfloat16 compute, the train
step, the summary maps, the evaluation step and the predict function of
configs/tiny.py (all four eval modes for the first preset; the eval programs
once per set of extra heads, as they do not depend on the loss otherwise)
and, for SPML, its second stage; the CAM stages' classifier step, CAM
evaluation and pseudo-label pass (tags and boxes); and the production shapes of
configs/voc_point.py (ResNet-101 OS8, crop 321, global batch 16) for its
default preset. The tests read its record, one test per preset.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax import methods
from agmm_jax.data import input_pipeline
from agmm_jax.evaluation import evaluator
from agmm_jax.methods import boxes as boxes_lib
from agmm_jax.methods import spml_stage2
from agmm_jax.runtime import export
from agmm_jax.runtime import sharding
from agmm_jax.storage import checkpoint
from agmm_jax.train import state as train_state
from configs import common
from configs import tiny
from configs import voc_point
from tests import conftest

DEVICES = 8
DTYPES = ('float32', 'bfloat16')
# configs/tiny.py's data: the demo's CamVid subset (11 classes) shrunk 4x to
# 45 x 60 images, its eval canvas.
TINY_NUM_CLASSES = 11
TINY_CANVAS = (45, 60)
# PASCAL VOC: 21 classes, images up to 500 x 500 (the eval canvas).
VOC_NUM_CLASSES = 21
VOC_CANVAS = (500, 500)
VOC = 'voc_point (production shapes)'
CAM = 'cam stages (tags, boxes)'
CAM_PROGRAMS = ('cam_classifier_step', 'cam_eval_step', 'cam_pseudo_labels[tags]',
                'cam_pseudo_labels[boxes]')


def _record(program: export.Program, exported: jax.export.Exported,
            mesh: jax.sharding.Mesh, seconds: float) -> dict:
  """What the tests check of an exported program: its platforms, device
  count, whether it computes in bfloat16 and has dilated convolutions (XLA's
  form, which TPU and CUDA run), and each input (by its path in the
  arguments) as ``[aval, partition spec]``."""
  paths = [jax.tree_util.keystr(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(program.args)[0]]
  text = exported.mlir_module()
  specs = [str(sharding.spec) if sharding is not None else None
           for sharding in exported.in_shardings_jax(mesh)]
  return {'platforms': list(exported.platforms), 'nr_devices': exported.nr_devices,
          'inputs': {path: [str(aval), spec] for path, aval, spec in zip(
              paths, exported.in_avals, specs, strict=True)},
          'bf16': 'bf16' in text, 'dilated_convolution': 'rhs_dilate' in text,
          'seconds': round(seconds, 1)}


def _export_all(programs, what: str, mesh: jax.sharding.Mesh) -> dict:
  records = {}
  for program in programs:
    start = time.perf_counter()
    try:
      exported = export.export_program(program, what=what)
    except export.ExportError as error:
      records[program.name] = {'error': str(error)}
      continue
    records[program.name] = _record(program, exported, mesh,
                                    time.perf_counter() - start)
  return records


def worker(output: str, dtype: str) -> None:
  """Exports every preset's programs in ``dtype`` compute and, with float32,
  the production shapes (the two workers then take about as long); writes the
  records ``{what: {dtype: {program: record}}}`` to ``output`` (JSON)."""
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = sharding.create_mesh(tiny.get_config().mesh)
  records = {}
  exported_heads = {}
  for preset in common.METHODS:
    config = tiny.get_config()
    common.set_method(config, preset)
    config.model.compute_dtype = dtype
    heads = tuple(sorted(methods.build_loss(config.loss).needs.heads))
    parts = ('train', 'stage2') + (() if heads in exported_heads else ('eval',))
    programs = export.run_programs(
        config, TINY_NUM_CLASSES, mesh, TINY_CANVAS, parts=parts,
        eval_modes=evaluator.EVAL_MODES if preset == common.METHODS[0] else None)
    records[preset] = {dtype: _export_all(programs, preset, mesh)}
    records[preset][dtype]['eval_as'] = exported_heads.setdefault(heads, preset)
  config = tiny.get_config('method=pce_only')
  config.cam.enabled = True
  config.model.compute_dtype = dtype
  records[CAM] = {dtype: _export_all(export.run_programs(
      config, TINY_NUM_CLASSES, mesh, TINY_CANVAS, parts=('cam',)), CAM, mesh)}
  config = voc_point.get_config()
  if dtype == config.model.compute_dtype:
    records[VOC] = {dtype: _export_all(export.run_programs(
        config, VOC_NUM_CLASSES, mesh, VOC_CANVAS, parts=('train', 'eval')), VOC, mesh)}
  with open(output, 'w', encoding='utf-8') as f:
    json.dump(records, f)


@pytest.fixture(scope='module')
def records(tmp_path_factory) -> dict:
  """The workers' records merged (one run of each for the module's tests)."""
  folder = tmp_path_factory.mktemp('export')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  environment = dict(os.environ, JAX_PLATFORMS='cpu',
                     XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
                     PYTHONPATH=os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]))
  workers = {}
  for dtype in DTYPES:
    output = str(folder / f'{dtype}.json')
    workers[output] = subprocess.Popen(
        [sys.executable, '-c',
         f'from tests.runtime import test_export; test_export.worker({output!r}, {dtype!r})'],
        env=environment, cwd=repo)
  merged = {}
  try:
    for output, process in workers.items():
      assert process.wait(timeout=1200) == 0, output
      with open(output, encoding='utf-8') as f:
        for what, by_dtype in json.load(f).items():
          merged.setdefault(what, {}).update(by_dtype)
  finally:
    for process in workers.values():
      process.kill()
  return merged


DATA = "P('data',)"
REPLICATED = 'P()'
SPML_STAGE2 = ('spml_pseudo_labels', 'spml_pseudo_labels[flip,crf]', 'spml_stage2_step')


def _programs(records: dict, what: str, dtype: str) -> dict:
  """The exported programs of ``what`` in ``dtype``; fails with every error
  (each names the preset, the program and the offending primitives)."""
  programs = {name: record for name, record in records[what][dtype].items()
              if name != 'eval_as'}
  errors = [record['error'] for record in programs.values() if 'error' in record]
  assert not errors, '\n'.join(errors)
  for name, record in programs.items():
    assert record['platforms'] == ['tpu', 'cuda'], (what, name)
    assert record['nr_devices'] == (1 if name.startswith('predict') else DEVICES), (what, name)
    assert record['bf16'] == (dtype == 'bfloat16'), (what, dtype, name)
  return programs


def _check_train_step_placement(inputs: dict, batch: dict[str, str],
                                batch_size: int) -> None:
  """The batch and the method state split over ``data``, the rest of the
  state replicated; ``batch``: the expected aval of each batch field. A
  field the loss does not read (pCE alone: ``class_present``) is dropped
  from the program, its placement left unspecified."""
  assert len([path for path in inputs if path.startswith('[1]')]) == len(batch)
  for name, aval in batch.items():
    assert inputs[f"[1]['{name}']"][0] == aval, name
  for path, (aval, spec) in inputs.items():
    split = path.startswith(('[1]', "[0]['method_state']"))
    if spec is None:
      assert path.startswith('[1]') and path not in ("[1]['image']", "[1]['label']"), path
      continue
    assert spec == (DATA if split else REPLICATED), path
    if split:
      assert aval.split('[')[1].startswith(f'{batch_size},'), path


def _loss_config(method: str):
  """``config.loss`` of a config argument ``method=`` (``common.set_method``)."""
  config = tiny.get_config()
  common.set_method(config, method)
  return config.loss


@pytest.mark.parametrize('preset', common.METHODS)
def test_preset_exports_for_tpu_and_cuda(records, preset):
  """Train step, summaries, evaluation, predict and later stages of the
  preset, in float32 and bfloat16, on 8 devices."""
  assert set(records) == {*common.METHODS, VOC, CAM}
  loss_config = _loss_config(preset)
  fields = methods.build_loss(loss_config).needs.batch_fields
  for dtype in DTYPES:
    programs = _programs(records, preset, dtype)
    expected = {'train_step', 'summary'}
    if records[preset][dtype]['eval_as'] == preset:
      expected |= {'eval_step[whole]', 'predict[whole]'}
    if loss_config.weights.get('spml', 0.0):
      expected |= set(SPML_STAGE2)
    assert expected <= set(programs), (dtype, sorted(programs))
    batch = {'image': 'float32[8,33,33,3]', 'label': 'int32[8,33,33]',
             'class_present': f'float32[8,{TINY_NUM_CLASSES}]'}
    # configs/tiny.py's OS16 ResNet and ASPP rates (1, 2, 3) dilate: XLA's
    # form on TPU and CUDA, not the CPU's taps ('auto').
    assert programs['train_step']['dilated_convolution'], dtype
    inputs = programs['train_step']['inputs']
    # A method's batch field: [B, ...] of whatever shape its factory makes.
    batch.update({name: inputs[f"[1]['{name}']"][0] for name in fields})
    _check_train_step_placement(inputs, batch, batch_size=8)


def test_cam_stages_export_for_tpu_and_cuda(records):
  """The CAM stages' classifier step (the tags as a batch field, the batch
  split over ``data``), its CAM evaluation and the pass restricted to tags
  and to boxes (the records' weak labels split over ``data`` too)."""
  height, width = TINY_CANVAS
  for dtype in DTYPES:
    programs = _programs(records, CAM, dtype)
    assert sorted(programs) == sorted(CAM_PROGRAMS), dtype
    step = programs['cam_classifier_step']
    assert step['dilated_convolution'], dtype
    inputs = step['inputs']
    assert inputs["[1]['image']"] == ['float32[8,33,33,3]', DATA]
    assert inputs["[1]['tags']"] == [f'float32[8,{TINY_NUM_CLASSES}]', DATA]
    params = {path: spec for path, (_, spec) in inputs.items()
              if path.startswith("[0]['params']")}
    assert set(params.values()) == {REPLICATED}
    assert any("['extra_heads']['cam']" in path for path in params)
    assert programs['cam_eval_step']['inputs']["[2]['image']"] == [
        f'float32[8,{height},{width},3]', DATA]
    # Each pass reads the weak labels of its restriction (the other input is
    # dropped from the program, its placement unspecified).
    tags = programs['cam_pseudo_labels[tags]']['inputs']['[4]']
    assert tags == [f'float32[8,{TINY_NUM_CLASSES}]', DATA]
    boxes = programs['cam_pseudo_labels[boxes]']['inputs']['[5]']
    assert boxes == [f'int32[8,{boxes_lib.MAX_BOXES},5]', DATA]


def test_eval_programs_cover_every_mode_and_every_set_of_heads(records):
  """All four eval modes (first preset); the eval programs of a preset are
  exported once per set of extra heads, and every preset's set is covered."""
  first = common.METHODS[0]
  height, width = TINY_CANVAS
  for dtype in DTYPES:
    programs = _programs(records, first, dtype)
    for mode in evaluator.EVAL_MODES:
      inputs = programs[f'eval_step[{mode}]']['inputs']
      assert inputs["[2]['image']"] == [f'float32[8,{height},{width},3]', DATA]
      assert inputs["[2]['height']"] == ['int32[8]', DATA]
      assert programs[f'predict[{mode}]']['inputs']['[1]'][0] == (
          f'float32[1,{height},{width},3]')
    for preset in common.METHODS:
      eval_as = records[preset][dtype]['eval_as']
      assert (sorted(methods.build_loss(_loss_config(preset)).needs.heads)
              == sorted(methods.build_loss(_loss_config(eval_as)).needs.heads))
      assert 'eval_step[whole]' in records[eval_as][dtype]


def test_voc_point_production_shapes_lower(records):
  """configs/voc_point.py as it ships: ResNet-101 OS8 (59.47M parameters, the
  official model's count with 21 classes), crop 321, global batch 16."""
  config = voc_point.get_config()
  programs = _programs(records, VOC, config.model.compute_dtype)
  inputs = programs['train_step']['inputs']
  _check_train_step_placement(inputs, {
      'image': 'float32[16,321,321,3]', 'label': 'int32[16,321,321]',
      'class_present': 'float32[16,21]'}, batch_size=16)
  sizes = [np.prod([int(n) for n in aval.split('[')[1].rstrip(']').split(',')])
           for path, (aval, _) in inputs.items() if path.startswith("[0]['params']")]
  assert round(sum(sizes) / 1e6, 2) == 59.47
  assert programs['eval_step[whole]']['inputs']["[2]['image']"] == [
      f'float32[8,{VOC_CANVAS[0]},{VOC_CANVAS[1]},3]', DATA]


def _host_doubled(x):
  return np.asarray(x) * 2


def _callback_then_eig(x):
  y = jnp.sin(x) @ x
  z = jax.pure_callback(_host_doubled, jax.ShapeDtypeStruct(x.shape, x.dtype), y)

  def row(total, r):
    return total + jnp.linalg.eig(jnp.outer(r, r))[0].real.sum(), None

  return jax.lax.scan(row, 0.0, z)[0]


def test_a_failure_names_the_preset_program_and_offending_primitives():
  """A host callback (no TPU/CUDA lowering from this machine) and eig (no
  TPU lowering), the latter inside a scan: both named with their source
  lines, the primitives that do lower not."""
  program = export.Program('toy_step', jax.jit(_callback_then_eig),
                           (jax.ShapeDtypeStruct((4, 4), jnp.float32),))
  with pytest.raises(export.ExportError) as raised:
    export.export_program(program, what='toy_preset')
  message = str(raised.value)
  assert message.startswith('toy_preset: toy_step does not export for tpu/cuda')
  assert '\n' not in message
  offenders = message.split('offending primitive(s) ')[1]
  assert 'pure_callback (' in offenders and 'eig (' in offenders
  assert offenders.count('test_export.py:') == 2
  for fine in ('sin', 'dot_general', 'scan', 'add'):
    assert f'{fine} (' not in offenders
  assert export.offending_primitives(
      export.Program('fine', jax.jit(lambda x: jnp.sin(x) @ x), program.args)) == []


def _described(tree) -> list[tuple[str, tuple[int, ...], str, str]]:
  """``(path, shape, dtype, partition spec)`` of every leaf."""
  return [(jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype),
           str(leaf.sharding.spec))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_abstract_states_and_batches_are_what_the_trainer_builds(tiny_data_dir):
  """SPML (extra head, batch field, method state, second stage) on this
  process's devices: the abstract train state is ``create_train_state``'s,
  the stage-2 state ``spml_stage2.initial_state``'s, and the batches those
  of the input pipeline, leaf by leaf with their placements."""
  config = tiny.get_config()
  common.set_method(config, 'spml')
  config.data.dir = tiny_data_dir
  num_classes = conftest.TINY_NUM_CLASSES
  mesh = sharding.create_mesh(config.mesh)
  loss = methods.build_loss(config.loss)
  state, _, _ = train_state.create_train_state(
      config, num_classes, mesh, total_steps=4, extra_heads=loss.needs.heads,
      method_state=loss.init_state(config.global_batch_size, num_classes),
      load_pretrained=False)
  abstract, _, _ = export.abstract_train_state(config, num_classes, mesh, loss)
  assert 'method_state' in abstract
  assert _described(abstract) == _described(checkpoint.abstract_like(state))
  stage2, _ = spml_stage2.initial_state(config, state, mesh, total_steps=4)
  assert (_described(export.abstract_stage2_state(config, abstract, mesh)[0])
          == _described(checkpoint.abstract_like(stage2)))

  train_batch = sharding.global_batch(next(input_pipeline.create_train_iterator(
      config.data, batch_size_per_process=config.global_batch_size, seed=0,
      batch_fields=loss.needs.batch_fields)), mesh)
  assert _described(export.abstract_train_batch(config, num_classes, mesh, loss)) == (
      _described(train_batch))
  eval_batch = sharding.global_batch(next(iter(input_pipeline.create_eval_iterator(
      config.data, config.data.eval_split, batch_size_per_process=(
          sharding.eval_batch_size_per_process(config.eval.batch_size, mesh))))), mesh)
  canvas = input_pipeline.eval_canvas(config.data, config.data.eval_split)
  assert _described(export.abstract_eval_batch(config, canvas, mesh)) == (
      _described(eval_batch))


def test_auto_dilated_conv_is_resolved_for_the_target_platforms():
  assert export.target_dilated_conv('auto', ('tpu', 'cuda')) == 'xla'
  assert export.target_dilated_conv('taps', ('tpu', 'cuda')) == 'taps'
  with pytest.raises(export.ExportError, match=(
      r"model.dilated_conv='auto' means \{'cpu': 'taps', 'tpu': 'xla'\} on these "
      'platforms; export them separately or set --config.model.dilated_conv')):
    export.target_dilated_conv('auto', ('cpu', 'tpu'))
