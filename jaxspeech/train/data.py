"""The trainer's view of `data_pipelines`: config.data + the method's batch declaration -> a
checkpointable Grain iterator of host batches, and host batches -> global arrays on the mesh
(batch over ('data', 'fsdp')), checked against `Method.batch_spec`."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from data_pipelines import pipeline
from jaxspeech.errors import ConfigError
from jaxspeech.methods.base import Method, bucket_lengths
from jaxspeech.train.partitioning import BATCH_AXES


def manifest_rows(data_config, method: Method | None = None) -> list[dict]:
  """Rows of `config.data.manifest` (or of `method.default_manifest`, by default the built-in
  synthetic corpus, when it is unset) of split `config.data.split`; `data_config` is the
  method's own `config.data` when a method is given."""
  if method is None:
    import ml_collections

    method = Method(ml_collections.ConfigDict({'data': data_config}))
  return method.training_rows()


FILE_CHECK_CACHE = 'file_check.json'  # in the workdir: facts of the audio files found whole


def verify_training_data(config, method: Method | None = None,
                         cache_dir: str | None = None) -> int:
  """Checks, once before step 1, every audio file the training iterator will read: the rows of
  `manifest_rows(config.data, method)`, each file present, at the row's sample rate and length,
  and not truncated (`data_pipelines.manifest.verify_files`). A bad file is found now, with its
  manifest line, not when its batch comes up (and again at that step on every resume).

  `cache_dir`: the workdir; the facts of files found whole are kept in
  `cache_dir/file_check.json` (by path, size, mtime), so a re-run stats each file only. None: no
  cache. Methods whose rows are not audio (`uses_audio` False) have no files to check.
  Returns the number of rows checked. Raises ManifestError (a UserError): one line.
  """
  from data_pipelines.manifest import verify_files

  if method is None:
    import ml_collections

    method = Method(ml_collections.ConfigDict({'data': config.data}))
  if not method.uses_audio:
    return 0
  d = method.config.data  # what `method.training_rows` reads (see `manifest_rows`)
  rows = manifest_rows(d, method)
  manifest = str(d.manifest) or method.default_manifest(d)
  cache = os.path.join(cache_dir, FILE_CHECK_CACHE) if cache_dir else None
  verify_files(rows, manifest=manifest, cache_path=cache)
  return sum('path' in r for r in rows)


def make_iterator(config, mesh=None, *, method: Method | None = None, seed_offset: int = 0,
                  whole_batch: bool = False):
  """An endless, checkpointable iterator over this host's share of global batches.

  Host `jax.process_index()` of `jax.process_count()` reads rows [i * B/n, (i+1) * B/n) of every
  global batch of B rows; `to_global` then assembles the hosts' rows in process order, which is
  the order of the batch shards over the mesh's ('data', 'fsdp') devices.

  `method` declares the batch: audio or not (`uses_audio`), the per-row fields its
  `host_fields` map makes in the Grain workers (`row_fields`). None = audio only (the base
  Method). Buckets: `config.data.bucket_lengths` (several static lengths) or `num_samples`.
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
        raise ConfigError(f'config.data.batch_size={int(d.batch_size)} is not divisible by the '
                          f'{shards} batch shards of the mesh {dict(mesh.shape)} (data x fsdp)')
  rows = manifest_rows(d, method)
  row_fields = row_spec = None
  if method is not None and method.row_fields():
    row_fields = method.host_fields
    row_spec = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in method.row_fields().items()}
  audio = method is None or method.uses_audio
  ds = pipeline.make_dataset(
    rows if audio else pipeline.RowSource(rows), batch_size=int(d.batch_size),
    bucket_lengths=bucket_lengths(d) if audio else (1,),
    seed=int(d.seed) + seed_offset, shuffle=True, num_epochs=None,
    perturb=(str(d.get('perturb', '') or '') or None) if audio else None,
    normalize=str(d.get('normalize', 'standard')) if audio else True,
    worker_count=int(d.num_workers), process_index=process_index, process_count=process_count,
    row_fields=row_fields, row_spec=row_spec)
  return iter(ds)


def check_batch(host_batch: dict[str, np.ndarray], spec: dict, process_count: int = 1) -> dict:
  """The spec's fields of a host batch, each checked (present, shape with this host's share of
  the batch, dtype); a mismatch raises naming the field."""
  out = {}
  for k, want in spec.items():
    if k not in host_batch:
      raise ValueError(f'batch field {k!r} (declared by the method\'s batch_spec) is missing; '
                       f'the data path gave {sorted(host_batch)}')
    v = np.asarray(host_batch[k])
    shape = (want.shape[0] // process_count, *want.shape[1:])
    if v.shape != shape or v.dtype != np.dtype(want.dtype):
      raise ValueError(f'batch field {k!r}: got {v.dtype}{list(v.shape)}, the batch_spec '
                       f'declares {np.dtype(want.dtype)}{list(shape)} on this host')
    out[k] = v
  return out


def to_global(host_batch: dict[str, np.ndarray], mesh, spec: dict | None = None) -> dict:
  """Host arrays -> global jax.Arrays, batch dim split over ('data', 'fsdp'). With `spec` (a
  method's `batch_spec` for this batch's bucket) exactly its fields, checked; without it every
  numeric field."""
  if spec is not None:
    numeric = check_batch(host_batch, spec, jax.process_count())
  else:
    numeric = {k: v for k, v in host_batch.items()
               if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf'}
  return pipeline.to_global(numeric, mesh, BATCH_AXES)


def batch_spec_for(method: Method, config, host_batch: dict) -> dict:
  """`method.batch_spec` for the bucket of this host batch (its audio length)."""
  if method.uses_audio and 'audio' in host_batch:
    return method.batch_spec(config, num_samples=int(np.shape(host_batch['audio'])[1]))
  return method.batch_spec(config)
