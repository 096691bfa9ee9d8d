"""ZeroSpeech-style ABX discriminability, within and across speakers, with jit-compiled DTW.

Shape legend: I items, L frames per (padded) item, D feature width, P pairs of items.

An *item* is the feature sequence of one phone occurrence (its frames), with its phone label, its
context (here the previous and next phone, as in the ZeroSpeech 2017 / Libri-light "within
context" condition) and its speaker. For two categories ``a != b`` in the same context, a triplet
(A, B, X) has A and X of category ``a`` (X != A) and B of category ``b``; it is an error when
``d(A, X) > d(B, X)`` and half an error on a tie.

- within speakers: A, B and X from the same speaker;
- across speakers: A and B from one speaker, X from another.

``d`` is DTW over frame-wise cosine (``1 - cos``) or angular (``arccos(cos) / pi``) distances,
with steps (1, 0), (0, 1), (1, 1) and the accumulated cost divided by the length of the best path
(as in Libri-light's ``dtw.pyx``). The DTW runs under ``jax.jit``/``vmap`` on padded items in
fixed-size batches of pairs (one compilation).

Scores: the error rate of every cell (context, speaker(s), a, b) is averaged over the cells of each
ordered pair (a, b), then over the pairs; reported in percent (50 = chance).

Evaluation task `abx` (`run`, `jaxspeech.eval.registry`): the ABX error of layer L's features
(`Method.predict_fns` 'features') on the phone segments in context (triphones) of the rows'
alignments, DTW on cosine distance, at most 5 items per cell: {"abx_within", "abx_across"}.

    config.evals.abx = {task: 'abx', split: 'test', layer: 'last'}
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task abx --layer L
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_BIG = 1e30


def frame_distances(a: jax.Array, b: jax.Array, metric: str = "cosine") -> jax.Array:
  """Frame-wise distances ``a [La, D]``, ``b [Lb, D]`` -> ``[La, Lb]`` float32."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  an = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  bn = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  if metric == "cosine":
    cos = jnp.einsum("id,jd->ij", an, bn, precision=jax.lax.Precision.HIGHEST)
    return 1.0 - jnp.clip(cos, -1.0, 1.0)  # [La, Lb]
  if metric == "angular":
    # 2 atan2(|a - b|, |a + b|) instead of arccos(cos): arccos loses ~sqrt(eps) near cos = 1.
    diff = jnp.linalg.norm(an[:, None] - bn[None], axis=-1)  # [La, Lb]
    summ = jnp.linalg.norm(an[:, None] + bn[None], axis=-1)  # [La, Lb]
    return 2.0 * jnp.arctan2(diff, summ) / jnp.pi
  raise ValueError(f"metric must be 'cosine' or 'angular', got {metric!r}")


def dtw(dist: jax.Array, len_a: jax.Array, len_b: jax.Array) -> jax.Array:
  """Path-length-normalised DTW cost of ``dist [L, L]`` restricted to ``[:len_a, :len_b]``.

  Runs over anti-diagonals (``2L - 1`` sequential steps of width L). Among equal-cost
  predecessors the diagonal step is preferred, then the vertical one.
  """
  la, lb = dist.shape
  i = jnp.arange(la)
  inf = jnp.full((la,), _BIG, jnp.float32)
  zero = jnp.zeros((la,), jnp.float32)

  def shift(v, fill):  # v[i - 1], with fill at i = 0
    return jnp.concatenate([jnp.full((1,), fill, v.dtype), v[:-1]])

  def step(carry, k):
    c1, n1, c2, n2, out = carry  # diagonals k-1 and k-2 (cost, path length), result
    j = k - i
    ok = (j >= 0) & (j < lb)
    d = dist[i, jnp.clip(j, 0, lb - 1)]
    cand_c = jnp.stack([shift(c2, _BIG), shift(c1, _BIG), c1])  # diag, up (i-1, j), left (i, j-1)
    cand_n = jnp.stack([shift(n2, 0.0), shift(n1, 0.0), n1])
    best = jnp.argmin(cand_c, axis=0)
    prev_c = jnp.take_along_axis(cand_c, best[None], 0)[0]
    prev_n = jnp.take_along_axis(cand_n, best[None], 0)[0]
    start = (i == 0) & (j == 0)
    c = jnp.where(start, d, jnp.where(ok & (prev_c < _BIG), d + prev_c, _BIG))
    n = jnp.where(start, 1.0, prev_n + 1.0)
    here = k == len_a + len_b - 2
    out = jnp.where(here, c[len_a - 1] / n[len_a - 1], out)
    return (c, n, c1, n1, out), None

  init = (inf, zero, inf, zero, jnp.float32(_BIG))
  (_, _, _, _, out), _ = jax.lax.scan(step, init, jnp.arange(la + lb - 1))
  return out


@functools.cache
def _batched_dtw(metric: str):
  """jit(vmap(DTW)) over a batch of item pairs ``[P, L, D]`` x2 -> ``[P]``, one per metric."""
  pair = lambda xa, na, xb, nb: dtw(frame_distances(xa, xb, metric), na, nb)
  return jax.jit(jax.vmap(pair))


def pad_items(features: Sequence[np.ndarray], max_frames: int | None = None):
  """Stack variable-length items ``[L_i, D]`` into ``([I, L, D], lengths [I])`` (truncating to
  ``max_frames`` if given)."""
  lengths = np.array([len(f) for f in features])
  if np.any(lengths == 0):
    raise ValueError("empty item")
  if max_frames is not None:
    lengths = np.minimum(lengths, max_frames)
  length = int(lengths.max())
  out = np.zeros((len(features), length, features[0].shape[-1]), np.float32)
  for k, (f, n) in enumerate(zip(features, lengths)):
    out[k, :n] = f[:n]
  return out, lengths.astype(np.int32)


def pair_distances(
  padded: np.ndarray, lengths: np.ndarray, pairs: np.ndarray, metric: str = "cosine",
  batch_size: int = 512,
) -> np.ndarray:
  """DTW distance for each pair of item indices ``pairs [P, 2]`` -> ``[P]`` (fixed-size batches)."""
  out = np.zeros(len(pairs), np.float32)
  x = jnp.asarray(padded)
  n = jnp.asarray(lengths)
  for s in range(0, len(pairs), batch_size):
    chunk = pairs[s:s + batch_size]
    m = len(chunk)
    idx = np.concatenate([chunk, np.zeros((batch_size - m, 2), chunk.dtype)])  # fixed shape
    d = _batched_dtw(metric)(x[idx[:, 0]], n[idx[:, 0]], x[idx[:, 1]], n[idx[:, 1]])
    out[s:s + m] = np.asarray(d)[:m]
  return out


def _triplet_error(d_ax: np.ndarray, d_bx: np.ndarray, same: bool) -> float:
  """Mean error over A, B, X of ``d(A,X) > d(B,X)`` (+0.5 on ties).

  ``d_ax [nA, nX]``, ``d_bx [nB, nX]``; when ``same`` A and X come from the same set and the
  pairs A = X are excluded.
  """
  gt = (d_ax[:, None, :] > d_bx[None, :, :]).astype(np.float64)  # [nA, nB, nX]
  eq = (d_ax[:, None, :] == d_bx[None, :, :]).astype(np.float64)
  err = gt + 0.5 * eq
  if same:
    keep = ~np.eye(d_ax.shape[0], dtype=bool)[:, None, :]  # A != X
    return float((err * keep).sum() / (keep.sum() * d_bx.shape[0]))
  return float(err.mean())


def abx_error(
  features: Sequence[np.ndarray],
  labels: Sequence[Hashable],
  contexts: Sequence[Hashable],
  speakers: Sequence[Hashable],
  metric: str = "cosine",
  max_frames: int | None = None,
  batch_size: int = 512,
  max_items_per_cell: int | None = None,
  seed: int = 0,
) -> dict[str, float]:
  """ABX error rates (percent) within and across speakers.

  Args:
    features: one ``[L_i, D]`` array per item.
    labels, contexts, speakers: per-item category (phone), context, speaker.
    metric: ``"cosine"`` or ``"angular"`` frame distance.
    max_frames: truncate items longer than this (bounds the DTW size).
    batch_size: item pairs per DTW call (fixed shape: one compilation).
    max_items_per_cell: keep at most this many random items per (context, speaker, label) cell
      (bounds the quadratic number of pairs on large corpora); ``seed`` picks them.

  Returns:
    ``{"abx_within": %, "abx_across": %, "num_within_cells": n, "num_across_cells": n}``;
    a rate is ``nan`` when no triplet exists for it.
  """
  n_items = len(features)
  if not (len(labels) == len(contexts) == len(speakers) == n_items):
    raise ValueError("features, labels, contexts and speakers must have the same length")
  cells: dict = defaultdict(list)  # (context, speaker, label) -> item indices
  for k, key in enumerate(zip(contexts, speakers, labels)):
    cells[key].append(k)
  if max_items_per_cell is not None:
    rng = np.random.default_rng(seed)
    cells = {key: sorted(rng.permutation(idx)[:max_items_per_cell].tolist()) if
             len(idx) > max_items_per_cell else idx for key, idx in cells.items()}
  by_context: dict = defaultdict(list)
  for (c, _, _), idx in cells.items():
    by_context[c].extend(idx)

  # DTW distances for every pair of items sharing a context (all triplets live in one context).
  pairs = np.array([p for idx in by_context.values() for p in itertools.combinations(idx, 2)],
                   dtype=np.int64).reshape(-1, 2)
  padded, lengths = pad_items(features, max_frames)
  dist = np.full((n_items, n_items), np.nan)
  if len(pairs):
    d = pair_distances(padded, lengths, pairs, metric, batch_size)
    dist[pairs[:, 0], pairs[:, 1]] = d
    dist[pairs[:, 1], pairs[:, 0]] = d
  np.fill_diagonal(dist, 0.0)

  groups: dict = defaultdict(dict)  # context -> speaker -> label -> indices
  for (c, s, y), idx in cells.items():
    groups[c].setdefault(s, {})[y] = np.array(idx)

  within, across = defaultdict(list), defaultdict(list)
  for spk in groups.values():
    for s, lab in spk.items():
      for a, b in itertools.permutations(lab, 2):
        ia, ib = lab[a], lab[b]
        if len(ia) >= 2:
          within[(a, b)].append(_triplet_error(dist[np.ix_(ia, ia)], dist[np.ix_(ib, ia)], True))
        for s2, lab2 in spk.items():
          if s2 == s or a not in lab2:
            continue
          ix = lab2[a]
          across[(a, b)].append(_triplet_error(dist[np.ix_(ia, ix)], dist[np.ix_(ib, ix)], False))

  def score(table):
    if not table:
      return float("nan")
    return 100.0 * float(np.mean([np.mean(v) for v in table.values()]))

  return {
    "abx_within": score(within),
    "abx_across": score(across),
    "num_within_cells": sum(len(v) for v in within.values()),
    "num_across_cells": sum(len(v) for v in across.values()),
  }


def phone_segments(frame_labels: Sequence[Hashable]) -> list[tuple[int, int, Hashable, tuple]]:
  """Runs of equal frame labels with their neighbours: ``[(start, end, label, (prev, next))]``
  for every run that has both a previous and a next run (the ABX items of an utterance)."""
  labels = list(frame_labels)
  runs, start = [], 0
  for t in range(1, len(labels) + 1):
    if t == len(labels) or labels[t] != labels[start]:
      runs.append((start, t, labels[start]))
      start = t
  return [(s, e, y, (runs[k - 1][2], runs[k + 1][2]))
          for k, (s, e, y) in enumerate(runs) if 0 < k < len(runs) - 1]


def evaluate_abx(ctx, wavs, rows, layer: int, max_items_per_cell: int = 5,
                 seed: int = 0) -> dict[str, float]:
  """ABX error of layer `layer`'s features of the utterances `wavs` of `rows` (with alignments
  and speakers): {"abx_within", "abx_across"}."""
  from jaxspeech.eval.common import frame_phone_labels, layer_outputs
  from jaxspeech.eval.registry import EvalError

  feats = layer_outputs(ctx, wavs, layer)
  labels = frame_phone_labels(rows, [len(f) for f in feats])
  items, ys, ctxs, spk = [], [], [], []
  for f, lab, row in zip(feats, labels, rows):
    for s, e, y, c in phone_segments(lab.tolist()):
      if y < 0 or min(c) < 0:
        continue
      items.append(np.asarray(f[s:e], np.float32))
      ys.append(y)
      ctxs.append(c)
      spk.append(row["speaker"])
  if not items:
    raise EvalError("abx: no phone segment in context found in the manifest")
  r = abx_error(items, ys, ctxs, spk, metric="cosine", max_frames=32,
                max_items_per_cell=max_items_per_cell, seed=seed)
  return {"abx_within": r["abx_within"], "abx_across": r["abx_across"]}


def run(ctx, manifest: str = "", split: str = "", layer="last", seed: int = 0,
        max_items_per_cell: int = 5) -> dict[str, float]:
  """The `abx` task on the rows of `manifest` (default: the run's manifest) of `split`."""
  from jaxspeech.eval import common

  rows = common.task_rows(ctx, manifest, split, need_alignment=True)
  li = common.layer_index(ctx, layer)
  return evaluate_abx(ctx, common.load_wavs(rows), rows, li, int(max_items_per_cell), int(seed))
