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


def apply_overrides(config, overrides: dict | None):
  """Sets dotted fields of `config`, e.g. {'method.freeze_encoder_steps': 0}."""
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def random_batch(config, mesh, extra_fields=None, method=None) -> dict:
  """The method's declared batch (`Method.batch_spec`): random normalised audio `[B, S]` (all
  valid), `audio_perturbed` when the data pipeline would make it (Spin with Praat), rows 0..B-1,
  the fields `extra_fields(b, s, spec) -> {name: host array}` gives (e.g. CTC labels), zeros for
  any other declared field. Placed in the batch sharding."""
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning

  method = method or get_method(config)
  b, s = int(config.data.batch_size), int(config.data.num_samples)
  spec = method.batch_spec(config, s)
  rng = np.random.default_rng(0)
  host = {'audio': rng.standard_normal((b, s)).astype(np.float32),
          'audio_mask': np.ones((b, s), bool)}
  if 'audio_perturbed' in spec:
    host['audio_perturbed'] = rng.standard_normal((b, s)).astype(np.float32)
  if extra_fields is not None:
    host.update(extra_fields(b, s, spec))
  for k, v in spec.items():
    if k not in host:
      host[k] = np.ones(v.shape, v.dtype) if k == 'valid' else np.zeros(v.shape, v.dtype)
  host = {k: host[k] for k in spec}
  return {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in host.items()}


def build(config, extra_fields=None) -> dict:
  """The real train step of `config` (same code path as training), compiled ahead of time for the
  state's shardings, a fresh state and a random batch. Returns a dict with `setup`, `compiled`,
  `state`, `batch`, `mesh`, `compile_s` and `memory` (`memory_analysis()` bytes per device)."""
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh)
  setup = step_lib.build_setup(config, method, mesh)
  batch = random_batch(config, mesh, extra_fields, method)
  step = step_lib.jit_train_step(setup, batch)
  t0 = time.perf_counter()
  compiled = step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_d = {k: int(getattr(mem, k)) for k in (
    'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
    'generated_code_size_in_bytes', 'alias_size_in_bytes', 'peak_memory_in_bytes')
    if mem is not None and hasattr(mem, k)}
  state = step_lib.create_train_state(setup, jax.random.key(0))
  return {'setup': setup, 'compiled': compiled, 'state': state, 'batch': batch, 'mesh': mesh,
          'compile_s': compile_s, 'memory': mem_d}


def time_steps(built: dict, steps: int, warmup: int = 1) -> list[float]:
  """Wall times of `steps` calls of the compiled step after `warmup` calls; `built['state']` is
  replaced by the latest state (the step donates its input state)."""
  compiled, state, batch = built['compiled'], built['state'], built['batch']
  for _ in range(warmup):
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  built['state'], built['metrics'] = state, m
  return times


def benchmark(name: str, variant: str, batch_size: int, num_samples: int, steps: int,
              overrides: dict | None = None, extra_fields=None, keep: dict | None = None) -> dict:
  """Compiles and times the train step of `experiments/<name>.py:<variant>` (batch overrides as
  the flags; `overrides` other dotted config fields). `keep`, when given, receives the `build()`
  dict (state, setup, ...) for further measurements on the same shapes."""
  config = importlib.import_module(f'experiments.{name}').get_config(variant)
  if batch_size:
    config.data.batch_size = batch_size
  if num_samples:
    config.data.num_samples = num_samples
  apply_overrides(config, overrides)
  b, s = int(config.data.batch_size), int(config.data.num_samples)
  built = build(config, extra_fields)
  setup, mesh = built['setup'], built['mesh']
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state['params']))
  times = time_steps(built, steps)
  if keep is not None:
    keep.update(built, config=config)
  median = statistics.median(times)
  return {
    'config': f'{name}:{variant}', 'device': str(jax.devices()[0].device_kind),
    'num_devices': jax.device_count(), 'mesh': dict(mesh.shape), 'params_M': n_params / 1e6,
    'batch': [b, s], 'audio_seconds_per_step': b * s / 16000,
    'compile_s': round(built['compile_s'], 2), 'step_s_median': round(median, 4),
    'step_s_all': [round(t, 4) for t in times],
    'audio_s_per_s': round(b * s / 16000 / median, 2),
    'memory_per_device_MiB': {k: round(v / 2**20, 2) for k, v in built['memory'].items()},
    'loss': float(built['metrics']['loss']),
  }


def main(argv):
  del argv
  for spec in _CONFIGS.value:
    name, _, variant = spec.partition(':')
    print(json.dumps(benchmark(name, variant or 'tiny', _BATCH.value, _SAMPLES.value,
                               _STEPS.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
