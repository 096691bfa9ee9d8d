r"""Per-device memory of the base-size train steps under fsdp, from `memory_analysis()`.

  python -m benchmarks.sharded_memory                              # hubert, dinosr, spin: 8 + 64
  python -m benchmarks.sharded_memory --configs=dinosr:paper --devices=8,16,64

For each config and device count N, a fresh interpreter with N fake CPU devices compiles the real
train step ahead of time (`jaxspeech.train.aot`, nothing allocated) on the mesh fsdp=N (data=1,
model=1), with a global batch of N utterances of `--seconds` seconds (one per device). Reported per
device: parameters and optimizer state (one shard of every leaf, as the shardings imply), and
`memory_analysis()`'s argument / output / temp bytes. The last columns say how much smaller
per-device parameter + optimizer bytes are than the unsharded total: fsdp should cut them by about
N (less where a weight's dimensions do not divide and stay replicated). Spin is included when
`experiments/spin.py` exists. Prints one JSON line per case, then a Markdown table.

Measured on the 2-core CPU machine (fake devices, jax 0.10.2, 2 s per utterance, Nov 2026), MiB:

| config | N | params/dev (all) | opt/dev (all) | args MiB | out MiB | temp MiB | cut | cut/N |
|---|---|---|---|---|---|---|---|---|
| hubert:paper | 8 | 45.5 (360.8) | 91.1 (721.7) | 136.8 | 136.6 | 619.7 | 7.9x | 0.99 |
| hubert:paper | 64 | 6.1 (360.8) | 12.3 (721.7) | 18.6 | 18.4 | 637.7 | 58.9x | 0.92 |
| dinosr:paper | 8 | 46.1 (366.0) | 92.2 (732.0) | 187.6 | 187.5 | 866.7 | 7.9x | 0.99 |
| dinosr:paper | 64 | 6.1 (366.0) | 12.2 (732.0) | 30.3 | 30.1 | 893.0 | 59.8x | 0.93 |
| spin:paper | 8 | 45.7 (361.0) | 14.3 (110.2) | 60.3 | 60.0 | 748.7 | 7.9x | 0.98 |
| spin:paper | 64 | 6.3 (361.0) | 2.3 (110.2) | 8.9 | 8.6 | 3548.3 | 54.6x | 0.85 |

fsdp cuts parameter + optimizer bytes per device by ~N (0.85-0.99 N; what remains whole are
weights with no dimension divisible by N: norms, biases, conv_in/kernel axes). DinoSR's extra
state (EMA teacher + codebooks) falls from 49 to 11.7 MiB per device: the teacher is sharded,
its codebook statistics (8 x 256 x 768 f32, ~12 MiB) are replicated. Spin's temp grows with N
(0.75 -> 3.5 GiB): its loss concatenates the two views along the batch before the encoder and
nothing pins the concatenated waveform, so GSPMD runs the conv feature extractor on the whole
2B batch on every device; constraining the encoder's input to `activation_batch` (tried in a
scratch script, not in the tree) brings it to 0.42 GiB at 64 devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_CONFIGS = flags.DEFINE_list('configs', ['hubert:paper', 'dinosr:paper', 'spin:paper'],
                             'experiment:variant pairs (missing experiments are skipped)')
_DEVICES = flags.DEFINE_list('devices', ['8', '64'], 'fake CPU device counts (fsdp axis size)')
_SECONDS = flags.DEFINE_float('seconds', 2.0, 'seconds of audio per utterance (one per device)')
_TIMEOUT = flags.DEFINE_integer('timeout', 900, 'seconds per compile')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import importlib, json, sys
import jax
from jaxspeech.train import aot, partitioning
name, variant, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
config = importlib.import_module(f'experiments.{name}').get_config(variant)
config.mesh.shape = {'data': 1, 'fsdp': n, 'model': 1}
config.data.batch_size, config.data.num_samples = n, int(seconds * 16000)
extra = ('audio_perturbed',) if str(config.data.get('perturb', '') or '') else ()
mesh = partitioning.create_mesh(config.mesh)
r = aot.compile_train_step(config, mesh, extra_fields=extra)
state = r.setup.abstract_state
print('RESULT ' + json.dumps({
  'config': f'{name}:{variant}', 'devices': jax.device_count(), 'mesh': dict(mesh.shape),
  'params_total': aot.total_bytes(state['params']),
  'opt_total': aot.total_bytes(state['opt_state']),
  'params_per_device': aot.sharded_bytes(state['params']),
  'opt_per_device': aot.sharded_bytes(state['opt_state']),
  'extra_per_device': aot.sharded_bytes(state['extra']),
  **r.memory}))
'''


def measure(config: str, devices: int, seconds: float, timeout: int) -> dict:
  name, _, variant = config.partition(':')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', _CHILD, name, variant or 'paper', str(devices),
                         str(seconds)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f'{config} on {devices} devices failed:\n{proc.stderr[-3000:]}')
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def _mb(b: int) -> str:
  return f'{b / 2**20:.1f}'


def table(rows: list[dict]) -> str:
  head = ('| config | devices (fsdp) | params MiB/dev (total) | optimizer MiB/dev (total) | '
          'arguments MiB | outputs MiB | temp MiB | params+opt cut | cut / N |')
  out = [head, '|' + '---|' * 9]
  for r in rows:
    total = r['params_total'] + r['opt_total']
    per = r['params_per_device'] + r['opt_per_device']
    cut = total / per
    out.append(
      f"| {r['config']} | {r['devices']} | {_mb(r['params_per_device'])} "
      f"({_mb(r['params_total'])}) | {_mb(r['opt_per_device'])} ({_mb(r['opt_total'])}) | "
      f"{_mb(r.get('argument_size_in_bytes', 0))} | {_mb(r.get('output_size_in_bytes', 0))} | "
      f"{_mb(r.get('temp_size_in_bytes', 0))} | {cut:.1f}x | {cut / r['devices']:.2f} |")
  return '\n'.join(out)


def main(argv):
  del argv
  rows = []
  for config in _CONFIGS.value:
    name = config.partition(':')[0]
    if not os.path.exists(os.path.join(REPO, 'experiments', f'{name}.py')):
      print(f'# skipped {config}: no experiments/{name}.py')
      continue
    for n in _DEVICES.value:
      r = measure(config, int(n), _SECONDS.value, _TIMEOUT.value)
      print(json.dumps(r), flush=True)
      rows.append(r)
  print(table(rows))


if __name__ == '__main__':
  app.run(main)
