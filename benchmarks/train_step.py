r"""Compiled memory and step time of the shared train step for experiment configs.

  python -m benchmarks.train_step                                  # hubert tiny + paper (base)
  python -m benchmarks.train_step --configs=hubert:tiny --batch_size=8 --num_samples=16000

For each config: builds the real train step (same code path as training), compiles it ahead of
time for the state's shardings, prints `compiled.memory_analysis()` (argument / output / temp /
generated-code bytes per device) and the median wall time of `--steps` steps after one warm-up
step, on random audio. `--batch_size` / `--num_samples` override the config's global batch so a
base-size model fits a CPU run (0 = keep the config's value). Prints one JSON line per config.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags

_CONFIGS = flags.DEFINE_list('configs', ['hubert:tiny', 'hubert:paper'],
                             'experiment:variant pairs')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'global batch (0 = the config\'s)')
_SAMPLES = flags.DEFINE_integer('num_samples', 32000, 'samples per utterance (0 = the config\'s)')
_STEPS = flags.DEFINE_integer('steps', 3, 'timed steps (after one warm-up step)')


def benchmark(name: str, variant: str, batch_size: int, num_samples: int, steps: int) -> dict:
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = importlib.import_module(f'experiments.{name}').get_config(variant)
  if batch_size:
    config.data.batch_size = batch_size
  if num_samples:
    config.data.num_samples = num_samples
  b, s = int(config.data.batch_size), int(config.data.num_samples)
  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh)
  setup = step_lib.build_setup(config, method, mesh)
  rng = np.random.default_rng(0)
  host = {'audio': rng.standard_normal((b, s)).astype(np.float32),
          'audio_mask': np.ones((b, s), bool)}
  batch = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
  step = step_lib.jit_train_step(setup, batch)
  t0 = time.perf_counter()
  compiled = step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_d = {k: int(getattr(mem, k)) for k in (
    'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
    'generated_code_size_in_bytes', 'alias_size_in_bytes') if mem is not None and hasattr(mem, k)}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state['params']))
  state = step_lib.create_train_state(setup, jax.random.key(0))
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return {
    'config': f'{name}:{variant}', 'device': str(jax.devices()[0].device_kind),
    'num_devices': jax.device_count(), 'mesh': dict(mesh.shape), 'params_M': n_params / 1e6,
    'batch': [b, s], 'audio_seconds_per_step': b * s / 16000, 'compile_s': round(compile_s, 2),
    'step_s_median': round(statistics.median(times), 4),
    'audio_s_per_s': round(b * s / 16000 / statistics.median(times), 2),
    'memory_per_device_MiB': {k: round(v / 2**20, 2) for k, v in mem_d.items()},
    'loss': float(m['loss']),
  }


def main(argv):
  del argv
  for spec in _CONFIGS.value:
    name, _, variant = spec.partition(':')
    print(json.dumps(benchmark(name, variant or 'tiny', _BATCH.value, _SAMPLES.value,
                               _STEPS.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
