r"""Weak scaling of the shared train step over fake CPU devices: step time and memory per device.

  python -m benchmarks.scaling [--quick] [--devices 1,2,4,8] [--out r.json]

For each device count N, a fresh interpreter with N fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, the pattern of
`benchmarks/sharded_memory.py`) builds, compiles and times the real train step
(`benchmarks.train_step.benchmark`) of `experiments/hubert.py` on the mesh fsdp=N (parameters and
optimizer state sharded, batch split over the devices; `--axis data` replicates the parameters
instead) with a fixed per-device batch (global batch = N x per-device): `paper` (base) at 1 x 2 s
per device, or `tiny` at 2 x 1 s per device with --quick. Reported: median step time,
`memory_analysis()` bytes per device (arguments + outputs + temporaries - aliased), and the
weak-scaling efficiency t(1) / t(N) (1.0 = perfect).

Caveat: fake devices are threads of one process sharing the machine's cores (2 here), so N
devices do N times the work on the same cores: expect t(N) to grow about N / cores once N exceeds
the core count. The curve measures the partitioned program's overhead (collectives, per-device
dispatch), not the speed-up real devices would give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import json, sys
import jax
from benchmarks import train_step
name, variant, per_device, samples, steps, axis = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                                   int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
n = jax.device_count()
shape = {'data': 1, 'fsdp': 1, 'model': 1}
shape[axis] = n
r = train_step.benchmark(name, variant, per_device * n, samples, steps,
                         overrides={'mesh.shape': shape})
print('RESULT ' + json.dumps(r))
'''


def measure(devices: int, config: str, per_device: int, samples: int, steps: int,
            axis: str = 'fsdp', timeout: int = 1800) -> dict:
  name, _, variant = config.partition(':')
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', _CHILD, name, variant, str(per_device),
                         str(samples), str(steps), axis], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f'{config} on {devices} fake devices failed:\n{proc.stderr[-3000:]}')
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  r = json.loads(line[len('RESULT '):])
  if r['num_devices'] != devices:
    raise RuntimeError(f'asked for {devices} fake devices, the child saw {r["num_devices"]}')
  return r


def run(quick: bool, devices=None, steps: int | None = None, axis: str = 'fsdp') -> dict:
  devices = devices or ((1, 2) if quick else (1, 2, 4, 8))
  config = 'hubert:tiny' if quick else 'hubert:paper'
  per_device, samples = (2, 16000) if quick else (1, 32000)
  steps = steps or (3 if quick else 5)
  rows = []
  for n in devices:
    r = measure(n, config, per_device, samples, steps, axis)
    mem = r['memory_per_device_MiB']
    r['memory_per_device_total_MiB'] = round(
      mem.get('argument_size_in_bytes', 0) + mem.get('output_size_in_bytes', 0)
      + mem.get('temp_size_in_bytes', 0) - mem.get('alias_size_in_bytes', 0), 2)
    rows.append(r)
    print(f"# scaling {config} N={n}: step {r['step_s_median']:.3f} s, "
          f"{r['memory_per_device_total_MiB']:.1f} MiB/device", flush=True)
  t1 = rows[0]['step_s_median'] if rows[0]['num_devices'] == 1 else None
  for r in rows:
    r['weak_scaling_efficiency'] = round(t1 / r['step_s_median'], 3) if t1 else None
  return {'config': config, 'mesh_axis': axis, 'per_device_batch': [per_device, samples],
          'cores': os.cpu_count(), 'fake_devices_share_cores': True, 'rows': rows}


def table(res: dict) -> str:
  b, s = res['per_device_batch']
  out = [f"| {res['config']}, {b} x {s / 16000:g} s per device | step (median) | audio s/s | "
         'memory/device (args+out+temp) | efficiency t(1)/t(N) |', '|---|---|---|---|---|']
  for r in res['rows']:
    eff = r['weak_scaling_efficiency']
    out.append(f"| N={r['num_devices']} (mesh {r['mesh']}) | {r['step_s_median']:.3f} s | "
               f"{r['audio_s_per_s']:.1f} | {r['memory_per_device_total_MiB']:.1f} MiB | "
               f"{eff if eff is not None else '-'} |")
  return '\n'.join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--devices', default='', help='comma-separated fake device counts')
  p.add_argument('--axis', choices=('fsdp', 'data'), default='fsdp',
                 help='mesh axis the N devices form (fsdp: parameters sharded; data: replicated)')
  p.add_argument('--out')
  args = p.parse_args(argv)
  devices = tuple(int(n) for n in args.devices.split(',')) if args.devices else None
  res = run(args.quick, devices, axis=args.axis)
  print(table(res))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
