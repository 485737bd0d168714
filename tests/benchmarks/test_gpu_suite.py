"""benchmarks/gpu_suite.py --smoke: every stage of the GPU suite runs on CPU
at tiny shapes, so the one-call GPU measurement cannot rot unnoticed."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_run_reports_every_stage(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, 'benchmarks/gpu_suite.py', '--smoke', f'--out={tmp_path}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
      check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())['results']
  for label in ('bf16 pce_only', 'bf16 agmm_released', 'f32 agmm_released',
                'f32 pce_only', 'cache', 'f32 agmm_released, cached',
                'f32 agmm_released, autotune off'):
    for figures in report[label]['settings'].values():
      assert figures['step_s'] > 0 and figures['compile_s'] > 0, label
  assert set(report['bf16 pce_only']['settings']) == {'xla', 'space_to_batch'}
  # Both settings train the same network: same loss after the same steps.
  losses = [f['loss'] for f in report['bf16 pce_only']['settings'].values()]
  assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])
  # Our count, in PyTorch's convention, equals PyTorch's FlopCounterMode.
  flops = report['flops']
  assert flops['train_torch_convention'] == flops['torch_flop_counter_train']
  assert report['torch']['bfloat16']['images_per_s'] > 0
  assert report['torch']['float32']['images_per_s'] > 0
  assert report['pipeline']['threads_2']['images_per_s'] > 0
  assert report['max_batch']['per_image_bytes'] > 0
  summary = (tmp_path / 'gpu_suite.md').read_text()
  assert 'JAX / PyTorch images/s, bfloat16 pCE step' in summary
  assert 'compile without cache' in summary
  # Few small files: what comes back from a device call.
  assert sorted(os.listdir(tmp_path)) == ['gpu_suite.json', 'gpu_suite.md']
