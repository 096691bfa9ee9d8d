"""The trainer's view of `data_pipelines`: config.data -> a checkpointable Grain iterator of host
batches, and host batches -> global arrays on the mesh (batch over ('data', 'fsdp'))."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from data_pipelines import pipeline
from data_pipelines.manifest import read_manifest
from jaxspeech.train.partitioning import BATCH_AXES


def manifest_rows(data_config) -> list[dict]:
  """Rows of `config.data.manifest`, or of the built-in synthetic corpus when it is unset."""
  path = str(data_config.manifest)
  if path:
    if not os.path.exists(path):
      raise FileNotFoundError(f'config.data.manifest={path!r}: no such file')
  else:
    from data_pipelines.synth import built_in_corpus
    path = built_in_corpus(str(data_config.cache_dir) or None,
                           num_utterances=int(data_config.builtin_utterances))
  rows = read_manifest(path)
  split = str(data_config.split)
  if split and any('split' in r for r in rows):
    rows = [r for r in rows if r.get('split') == split]
    if not rows:
      raise ValueError(f'config.data.split={split!r}: no row of {path} has this split')
  return rows


def make_iterator(config, mesh=None, *, seed_offset: int = 0, whole_batch: bool = False):
  """An endless, checkpointable iterator over this host's share of global batches.

  Host `jax.process_index()` of `jax.process_count()` reads rows [i * B/n, (i+1) * B/n) of every
  global batch of B rows; `to_global` then assembles the hosts' rows in process order, which is
  the order of the batch shards over the mesh's ('data', 'fsdp') devices.

  `config.data.perturb` ('praat' | 'jax' | '' = none) adds the speaker-perturbed view
  `audio_perturbed`, made in the Grain workers.

  `seed_offset` gives independent streams from one config (e.g. the k-means sample).
  `whole_batch=True` gives every host the whole global batch (identical on all hosts), for
  host-side set-up that must agree across hosts (e.g. `Method.prepare`'s k-means).
  """
  d = config.data
  if whole_batch:
    process_index, process_count = 0, 1
  else:
    process_index, process_count = jax.process_index(), jax.process_count()
    if mesh is not None:
      shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
      if int(d.batch_size) % shards:
        raise ValueError(f'config.data.batch_size={int(d.batch_size)} is not divisible by the '
                         f'{shards} batch shards of the mesh {dict(mesh.shape)} (data x fsdp)')
  ds = pipeline.make_dataset(
    manifest_rows(d), batch_size=int(d.batch_size), bucket_lengths=(int(d.num_samples),),
    seed=int(d.seed) + seed_offset, shuffle=True, num_epochs=None,
    perturb=str(d.get('perturb', '') or '') or None, worker_count=int(d.num_workers),
    process_index=process_index, process_count=process_count)
  return iter(ds)


def to_global(host_batch: dict[str, np.ndarray], mesh) -> dict:
  """Numeric host arrays -> global jax.Arrays, batch dim split over ('data', 'fsdp')."""
  numeric = {k: v for k, v in host_batch.items()
             if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf'}
  return pipeline.to_global(numeric, mesh, BATCH_AXES)
