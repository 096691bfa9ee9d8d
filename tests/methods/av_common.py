"""Shared by the UAVM and CMCM tests: a few real FSDD x digit-scan pairs and a short run of the
one shared train step on them."""

from __future__ import annotations

import jax
import numpy as np

from tests.data_pipelines.conftest import shared


def write_pairs_manifest(path, num_clips: int = 32) -> str:
  """`num_clips` FSDD clips of 4 training speakers (every digit) paired by class with digit scans,
  written as a pairs manifest at `path`."""
  import soundfile as sf

  from data_pipelines import av_pairs
  from data_pipelines.manifest import write_manifest
  from data_pipelines.tabular import digits_rows

  audio = []
  for k in range(num_clips):
    name = f'{k % 10}_{("george", "jackson", "theo", "yweweler")[k % 4]}_{k}'
    wav = shared('fsdd', 'recordings', f'{name}.wav')
    audio.append({'id': name, 'path': wav, 'n_samples': sf.info(wav).frames,
                  'sample_rate': 8000, 'speaker': name.split('_')[1], 'digit': k % 10})
  rows = av_pairs.pair_rows(audio, digits_rows(0.2, 0), test_speakers=(), seed=0)
  write_manifest(path, rows)
  return str(path)


def short_run_losses(config, steps: int) -> list[float]:
  """The losses of `steps` steps of the shared jitted train step on one device."""
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(config, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  it = data_lib.make_iterator(config, mesh, method=method)
  step, losses = None, []
  for _ in range(steps):
    batch = data_lib.to_global(next(it), mesh, method.batch_spec(config))
    step = step or step_lib.jit_train_step(setup, batch)
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert np.isfinite(losses).all(), losses
  return losses
