"""benchmarks/export_modules.py: writes a config's programs serialized, and
its --check compiles them on the local devices (here CPU, exported for it
beside TPU and CUDA, on 2 fake devices)."""

import json
import os
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, 'benchmarks', 'export_modules.py')


def _run(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
  environment = dict(os.environ, JAX_PLATFORMS='cpu',
                     XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, SCRIPT, *args], env=environment, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_exported_programs_deserialize_and_compile(tmp_path):
  out = str(tmp_path / 'tiny')
  written = _run('--config=configs/tiny.py', '--devices=2', '--num_classes=4',
                 '--canvas=45,60', '--parts=eval', '--platforms=cpu,tpu,cuda',
                 # 'auto' would differ: the taps form on CPU, XLA's on TPU/CUDA.
                 '--config.model.dilated_conv=xla',
                 f'--out={out}')
  assert written.returncode == 0, written.stderr[-3000:]
  with open(os.path.join(out, 'manifest.json'), encoding='utf-8') as f:
    manifest = json.load(f)
  assert manifest['devices'] == 2 and manifest['num_classes'] == 4
  assert set(manifest['programs']) == {'eval_step[whole]', 'predict[whole]'}
  step = manifest['programs']['eval_step[whole]']
  # configs/tiny.py's eval batch of 8 on the 45 x 60 canvas, by input path.
  assert ["[2]['image']", 'float32[8,45,60,3]'] in step['inputs']
  with open(os.path.join(out, step['file']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.platforms == ('cpu', 'tpu', 'cuda') and exported.nr_devices == 2
  assert [str(aval) for aval in exported.in_avals] == [aval for _, aval in step['inputs']]

  checked = _run(f'--check={out}', devices=2)
  assert checked.returncode == 0, checked.stderr[-3000:]
  for name in manifest['programs']:
    assert f'{name}: compiled in ' in checked.stdout

  wrong_devices = _run(f'--check={out}', devices=1)
  assert wrong_devices.returncode == 1
  assert wrong_devices.stderr.strip().splitlines() == [
      f'error: {out} was exported for 2 devices; this machine has 1']


def test_bad_input_is_one_error_line(tmp_path):
  missing = _run(f'--check={tmp_path}')
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f'error: {tmp_path}: no manifest.json; write it with --config and --out']
  bad_canvas = _run('--config=configs/tiny.py', '--num_classes=4', '--canvas=45',
                    f'--out={tmp_path / "x"}')
  assert bad_canvas.returncode == 1
  assert bad_canvas.stderr.strip().splitlines()[-1] == (
      "error: --canvas must be 'H,W' with H, W >= 1, got '45'")
