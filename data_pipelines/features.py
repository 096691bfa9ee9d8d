"""Cached frame features of a manifest: computed once, read back by row in milliseconds.

wav2vec-U trains a small GAN on frozen features; extracting them at every step would cost far
more than the GAN itself. A feature cache is a folder

  DIR/features.npy   float32 [N, D]   every utterance's frames, concatenated (memory-mapped)
  DIR/aux.npy        int16   [N]      auxiliary k-means targets of each frame (-1: none)
  DIR/manifest.jsonl                  the source manifest's rows plus `feat_file` (absolute path
                                      of features.npy), `feat_offset`, `num_frames`
  DIR/meta.json                       source, layer, dim, frame rate, k-means settings, sizes

The auxiliary targets are wav2vec-U 2.0's: k-means (K = 64) of MFCC frames at the same frame
rate, fitted on the rows of one split (the training split) with the project's jit k-means
(`jaxspeech.ops.kmeans`). The MFCCs are z-scored per dimension before clustering (c0 would
otherwise dominate the distances; fairseq's MFCC k-means runs on raw features).

Which features: the caller passes one `[T_i, D]` array per row (an encoder layer, MFCCs...);
`jaxspeech.w2vu` computes them from an HF folder, a jaxspeech workdir or `mfcc`.

Legend: N total frames, D feature width, T_i frames of row i, K clusters.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from data_pipelines.manifest import read_manifest, write_manifest

VERSION = 1  # bump when the layout changes (invalidates caches)


def write_feature_cache(out_dir: str, rows: Sequence[dict], features: Sequence[np.ndarray],
                        aux_features: Sequence[np.ndarray], *, meta: dict, kmeans_k: int = 64,
                        fit_split: str = 'train', seed: int = 0) -> str:
  """Writes the cache folder atomically; returns the path of its manifest.

  rows: manifest rows (copied into the cache manifest). features: one `[T_i, D]` array per row.
  aux_features: one `[T'_i, C]` array per row (MFCCs) at the same frame rate; frames beyond
  min(T_i, T'_i) get target -1.
  """
  import jax
  import jax.numpy as jnp

  from jaxspeech.ops import kmeans

  if not (len(rows) == len(features) == len(aux_features)) or not rows:
    raise ValueError(f'write_feature_cache: {len(rows)} rows, {len(features)} feature arrays, '
                     f'{len(aux_features)} auxiliary arrays (need equal, non-zero counts)')
  dims = {int(f.shape[-1]) for f in features}
  if len(dims) != 1 or any(f.ndim != 2 or len(f) < 1 for f in features):
    raise ValueError(f'write_feature_cache: features must be non-empty [T, D] arrays of one D '
                     f'(got widths {sorted(dims)})')
  for r, f in zip(rows, features):
    if not np.all(np.isfinite(f)):
      raise ValueError(f'write_feature_cache: non-finite features for row {r.get("id")!r}')
  fit = [a for r, a in zip(rows, aux_features) if not fit_split or r.get('split') == fit_split]
  if not fit:
    raise ValueError(f'write_feature_cache: no row of split {fit_split!r} to fit k-means on')
  fit_x = np.concatenate(fit).astype(np.float32)
  mu, sd = fit_x.mean(0), fit_x.std(0) + 1e-5
  res = jax.jit(kmeans.kmeans_fit, static_argnums=(2, 3))(
    jnp.asarray((fit_x - mu) / sd), None, int(kmeans_k), 30, jax.random.key(seed))
  # One assignment call over every row's frames (padded to a multiple of 4096: few compiles).
  clipped = [np.asarray(a[:min(len(f), len(a))], np.float32) for f, a in zip(features,
                                                                           aux_features)]
  flat = (np.concatenate(clipped) - mu) / sd
  pad = -len(flat) % 4096
  flat = np.concatenate([flat, np.zeros((pad, flat.shape[1]), np.float32)])
  ids_all = np.asarray(jax.jit(lambda x: kmeans.kmeans_assign(x, res.centroids, 4096)[0])(
    jnp.asarray(flat)))

  tmp = out_dir.rstrip('/') + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  total = sum(len(f) for f in features)
  feats = np.lib.format.open_memmap(os.path.join(tmp, 'features.npy'), 'w+', np.float32,
                                    (total, dims.pop()))
  aux = np.full((total,), -1, np.int16)
  out_rows, off = [], 0
  final_feats = os.path.join(os.path.abspath(out_dir), 'features.npy')
  pos = 0
  for r, f, a in zip(rows, features, clipped):
    t, n = len(f), len(a)
    feats[off:off + t] = f
    aux[off:off + n] = ids_all[pos:pos + n]
    pos += n
    out_rows.append({**r, 'feat_file': final_feats, 'feat_offset': off, 'num_frames': t})
    off += t
  feats.flush()
  del feats
  np.save(os.path.join(tmp, 'aux.npy'), aux)
  write_manifest(os.path.join(tmp, 'manifest.jsonl'), out_rows)
  inertia = np.asarray(res.inertia)
  with open(os.path.join(tmp, 'meta.json'), 'w') as f:
    json.dump({**meta, 'version': VERSION, 'num_rows': len(rows), 'num_frames': total,
               'dim': int(features[0].shape[-1]), 'kmeans_k': int(kmeans_k),
               'kmeans_fit_split': fit_split, 'kmeans_inertia': [float(inertia[0]),
                                                                 float(inertia[-1])]},
              f, indent=1)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return os.path.join(out_dir, 'manifest.jsonl')


def cache_is_complete(out_dir: str, meta: dict) -> bool:
  """True when `out_dir` holds a finished cache written with the same `meta` and VERSION."""
  path = os.path.join(out_dir, 'meta.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    have = json.load(f)
  return have.get('version') == VERSION and all(have.get(k) == v for k, v in meta.items())


_OPEN: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per process: memmaps stay open


def _arrays(feat_file: str) -> tuple[np.ndarray, np.ndarray]:
  if feat_file not in _OPEN:
    if not os.path.exists(feat_file):
      raise FileNotFoundError(f'feature cache {feat_file}: no such file (rebuild the cache)')
    aux_file = os.path.join(os.path.dirname(feat_file), 'aux.npy')
    _OPEN[feat_file] = (np.load(feat_file, mmap_mode='r'), np.load(aux_file, mmap_mode='r'))
  return _OPEN[feat_file]


def row_features(row: dict) -> tuple[np.ndarray, np.ndarray]:
  """(features [T, D] float32, aux targets [T] int32) of one cache manifest row."""
  for k in ('feat_file', 'feat_offset', 'num_frames'):
    if k not in row:
      raise KeyError(f'row {row.get("id")!r} has no {k!r}: not a feature-cache manifest '
                     '(data_pipelines.features)')
  feats, aux = _arrays(row['feat_file'])
  a, t = int(row['feat_offset']), int(row['num_frames'])
  if a < 0 or a + t > len(feats):
    raise ValueError(f'row {row.get("id")!r}: frames {a}..{a + t} outside {row["feat_file"]} '
                     f'({len(feats)} frames)')
  return np.asarray(feats[a:a + t], np.float32), np.asarray(aux[a:a + t], np.int32)


def read_cache_manifest(path: str) -> list[dict]:
  """Rows of a feature-cache manifest (`required=()`: rows carry features, not audio)."""
  return read_manifest(path, required=('feat_file', 'feat_offset', 'num_frames'))
