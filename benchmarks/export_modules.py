r"""Writes a config's programs exported for TPU and CUDA to a folder, so that
the exact programs can be checked on a pod before the data is there.

On any machine (a CPU is enough; ``--devices`` fake CPU devices stand in for
the target's chips):

  python benchmarks/export_modules.py --config=configs/voc_point.py \
      --devices=8 --num_classes=21 --canvas=500,500 --out=exported/voc_point

writes, for every jitted program of the run (``agmm_jax/runtime/export.py``:
train step, summary maps, evaluation step and predict function of
``config.eval.mode``, SPML's second stage), ``NAME.jax_export`` (the
``jax.export`` serialization: StableHLO with its input shapes and shardings)
and ``manifest.json`` (platforms, device count, inputs, sizes, export times).
Any ``--config.X=`` override of main.py applies (e.g.
``--config.model.compute_dtype=bfloat16``). On the target machine (the same
device count):

  python benchmarks/export_modules.py --check=exported/voc_point

deserializes and compiles each program for the local devices (no data, no
weights) and prints its compile time and XLA's memory analysis; a program that
does not fit or does not compile fails there, before any data is prepared.
Exit status 1 with one ``error:`` line on bad input.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

# The repository root, for agmm_jax and the config files' own imports.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (as main.py).')
_OUT = flags.DEFINE_string('out', '', 'Folder to write the exported programs to.')
_DEVICES = flags.DEFINE_integer(
    'devices', 0, 'Devices of the target (fake CPU devices here); 0: this '
    "machine's devices.")
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', 0, "Class count; 0: from config.data.dir's metadata.json.")
_CANVAS = flags.DEFINE_string(
    'canvas', '', "Eval canvas 'H,W'; empty: config.data.eval_canvas or the data's.")
_PLATFORMS = flags.DEFINE_list('platforms', ['tpu', 'cuda'], 'Platforms to export for.')
_PARTS = flags.DEFINE_list('parts', ['train', 'eval', 'stage2', 'cam'],
                           'Programs: train, eval, stage2 (SPML), cam (the CAM '
                           'stages of config.cam.enabled: tags and boxes).')
_CHECK = flags.DEFINE_string(
    'check', '', 'Instead: compile the programs of this folder on the local devices.')

MANIFEST = 'manifest.json'
SUFFIX = '.jax_export'


def _file_name(program_name: str) -> str:
  """``eval_step[whole]`` -> ``eval_step-whole.jax_export``."""
  return program_name.replace('[', '-').replace(']', '').replace(',', '-') + SUFFIX


def _num_classes_and_canvas(config) -> tuple[int, tuple[int, int]]:
  """The class count and eval canvas from the flags, else the config's data."""
  from agmm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  num_classes, canvas = _NUM_CLASSES.value, tuple(config.data.eval_canvas)
  if _CANVAS.value:
    try:
      canvas = tuple(int(size) for size in _CANVAS.value.split(','))
    except ValueError:
      canvas = ()
    if len(canvas) != 2 or min(canvas) < 1:
      raise ValueError(f"--canvas must be 'H,W' with H, W >= 1, got {_CANVAS.value!r}")
  if num_classes and canvas:
    return num_classes, canvas
  if not os.path.isfile(os.path.join(config.data.dir, input_pipeline.METADATA_FILE)):
    raise ValueError(f'config.data.dir={config.data.dir!r} is not a prepared dataset; '
                     'give --num_classes and --canvas=H,W')
  metadata = input_pipeline.read_metadata(config.data.dir)
  num_classes = num_classes or len(input_pipeline.class_names(metadata))
  canvas = canvas or input_pipeline.eval_canvas(config.data, config.data.eval_split)
  return num_classes, tuple(int(size) for size in canvas)


def write_exports(config, out: str) -> dict:
  """Exports the programs of ``config`` into ``out``; returns the manifest."""
  import jax  # pylint: disable=g-import-not-at-top
  from agmm_jax.runtime import export  # pylint: disable=g-import-not-at-top
  from agmm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  num_classes, canvas = _num_classes_and_canvas(config)
  mesh = sharding.create_mesh(config.mesh)
  programs = export.run_programs(config, num_classes, mesh, canvas,
                                 parts=tuple(_PARTS.value), platforms=_PLATFORMS.value)
  os.makedirs(out, exist_ok=True)
  manifest = {'jax': jax.__version__, 'platforms': list(_PLATFORMS.value),
              'devices': mesh.devices.size, 'num_classes': num_classes,
              'canvas': list(canvas), 'config': json.loads(config.to_json_best_effort()),
              'programs': {}}
  for program in programs:
    start = time.perf_counter()
    flat, paths = export.flat_program(program)
    exported = export.export_program(flat, _PLATFORMS.value)
    seconds = time.perf_counter() - start
    serialized = exported.serialize()
    with open(os.path.join(out, _file_name(program.name)), 'wb') as f:
      f.write(serialized)
    manifest['programs'][program.name] = {
        'file': _file_name(program.name), 'nr_devices': exported.nr_devices,
        'inputs': [[path, str(aval)] for path, aval in zip(paths, exported.in_avals)],
        'outputs': len(exported.out_avals),
        'bytes': len(serialized), 'export_seconds': round(seconds, 2)}
    print(f'{program.name}: {len(serialized) / 2**20:.2f} MiB, exported for '
          f'{"/".join(exported.platforms)} on {exported.nr_devices} device(s) in '
          f'{seconds:.1f} s', flush=True)
  with open(os.path.join(out, MANIFEST), 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=2)
  return manifest


def check_exports(folder: str) -> dict[str, dict[str, float]]:
  """Compiles every program of ``folder`` for the local devices; prints and
  returns its compile seconds and XLA's memory analysis (MiB)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from agmm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  manifest_path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f'{folder}: no {MANIFEST}; write it with --config and --out')
  with open(manifest_path, encoding='utf-8') as f:
    manifest = json.load(f)
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1}))
  if manifest['devices'] != mesh.devices.size:
    raise ValueError(f'{folder} was exported for {manifest["devices"]} devices; this '
                     f'machine has {mesh.devices.size}')
  figures = {}
  for name, entry in manifest['programs'].items():
    with open(os.path.join(folder, entry['file']), 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    shardings = (exported.in_shardings_jax(mesh) if exported.nr_devices > 1
                 else [None] * len(exported.in_avals))
    flat = [jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding_)
            for aval, sharding_ in zip(exported.in_avals, shardings)]
    args, kwargs = jax.tree.unflatten(exported.in_tree, flat)
    start = time.perf_counter()
    compiled = jax.jit(exported.call).trace(*args, **kwargs).lower().compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    figures[name] = {'compile_seconds': round(seconds, 2)}
    for field in ('argument', 'output', 'temp', 'generated_code'):
      size = getattr(memory, f'{field}_size_in_bytes', None) if memory else None
      if size is not None:
        figures[name][f'{field}_mib'] = round(size / 2**20, 1)
    print(f'{name}: compiled in {seconds:.1f} s; memory (MiB per device): '
          + ', '.join(f'{k[:-4]} {v}' for k, v in figures[name].items() if k.endswith('_mib')),
          flush=True)
  return figures


def _fail(line: str) -> None:
  print(f'error: {line}', file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag or config (as main.py) is one error line."""
  from agmm_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-exception-caught
    _fail(errors.flag_error_line(error, argv))
    raise


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  try:
    if _CHECK.value:
      check_exports(_CHECK.value)
      return
    if _CONFIG.value is None or not _OUT.value:
      raise ValueError('give --config and --out (or --check=FOLDER)')
    config = _CONFIG.value.copy_and_resolve_references()
    if _DEVICES.value:
      # Read when JAX starts its backends (at the first device query below).
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={_DEVICES.value}')
      import jax  # pylint: disable=g-import-not-at-top
      jax.config.update('jax_platforms', 'cpu')
    write_exports(config, _OUT.value)
  except (ValueError, OSError) as error:
    _fail((str(error).strip().splitlines() or [type(error).__name__])[0])


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
