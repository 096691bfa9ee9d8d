"""Several bucket lengths (`config.data.bucket_lengths`): batches of each static length reach the
one step (one compilation per length), the AOT compile covers each, the batch spec follows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.train.common import small_config


@pytest.mark.slow  # default run under 20 min on 2 cores
def test_two_buckets_train_and_compile(tmp_path):
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import aot, partitioning
  from jaxspeech.train import data as data_lib
  from jaxspeech.train.trainer import train_and_evaluate

  config = small_config(**{'data.bucket_lengths': (32000, 48000), 'train.num_steps': 6})
  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh)
  it = data_lib.make_iterator(config, mesh, method=method)
  shapes = set()
  for _ in range(12):
    host = next(it)
    spec = data_lib.batch_spec_for(method, config, host)
    batch = data_lib.to_global(host, mesh, spec)
    shapes.add(batch['audio'].shape[1])
    assert set(batch) == set(spec)
  # The built-in corpus has utterances of 1.4-3.7 s: both buckets occur.
  assert shapes == {32000, 48000}
  for s in (32000, 48000):
    r = aot.compile_train_step(config, mesh, num_samples=s)
    assert r.batch['audio'].shape == (8, s)
  out = train_and_evaluate(config, str(tmp_path / 'run'))
  assert math.isfinite(out['loss'])


def test_batch_check_names_the_field():
  import jax
  import pytest

  from jaxspeech.train import data as data_lib

  spec = {'audio': jax.ShapeDtypeStruct((4, 10), np.float32)}
  with pytest.raises(ValueError, match="'audio'.*float32\\[4, 10\\]"):
    data_lib.check_batch({'audio': np.zeros((4, 12), np.float32)}, spec)
  with pytest.raises(ValueError, match="'audio'.*missing"):
    data_lib.check_batch({'x': np.zeros((4, 10), np.float32)}, spec)
