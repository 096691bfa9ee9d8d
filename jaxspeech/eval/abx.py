"""ZeroSpeech-style ABX discriminability, within and across speakers, with jit-compiled DTW.

Shape legend: I items, L frames per (padded) item, D feature width, P pairs of items.

An *item* is the feature sequence of one phone occurrence (its frames), with its phone label, its
context (here the previous and next phone, as in the ZeroSpeech 2017 / Libri-light "within
context" condition) and its speaker. For two categories ``a != b`` in the same context, a triplet
(A, B, X) has A and X of category ``a`` (X != A) and B of category ``b``; it is an error when
``d(A, X) > d(B, X)`` and half an error on a tie.

- within speakers: A, B and X from the same speaker;
- across speakers: A and B from one speaker, X from another.

``d`` is DTW over frame-wise angular distances ``arccos(cos) / pi`` (libri-light's and fastabx's
"cosine" distance; ``1 - cos`` is kept as the ``"one_minus_cos"`` option), with steps (1, 0),
(0, 1), (1, 1) and the accumulated cost divided by the length of the path that libri-light's
``dtw.pyx`` backtracks (ties: diagonal, then (i, j-1), then (i-1, j)). That length depends on
which item gives the rows; as in libri-light they are X's frames, except that A and X of one cell
share the distance computed from the earlier (lower-index) item's frames. The DTW runs under
``jax.jit``/``vmap`` on padded items in fixed-size batches of pairs (one compilation).

Scores, as libri-light's ``eval_ABX.py`` (ZeroSpeech 2021) averages them: the error rate of every
cell is averaged over contexts (within: cells (context, speaker, a, b); across: over contexts and X
speakers, cells (context, speaker of A and B, speaker of X, a, b)), then over the speakers of A and
B, then over the ordered pairs (a, b); reported in percent (50 = chance). ``averaging="pair_cells"``
keeps the former order (all cells of a pair equally weighted, then pairs).

Evaluation task `abx` (`run`, `jaxspeech.eval.registry`): the ABX error of layer L's features
(`Method.predict_fns` 'features') on the phone segments in context (triphones) of the rows'
alignments, DTW on angular distance, ZeroSpeech 2021's subsampling (at most 10 A, B and X items per
cell, 5 X speakers across; `max_size_group`, `max_x_across`): {"abx_within", "abx_across"}.
Without subsampling the scores equal fastabx's cell-by-cell scores to 1e-6 points
(tests/parity/test_abx_fastabx.py; reference outputs from scripts/abx_fastabx_reference.py).

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
METRICS = ("angular", "cosine", "one_minus_cos")


def frame_distances(a: jax.Array, b: jax.Array, metric: str = "angular") -> jax.Array:
  """Frame-wise distances ``a [La, D]``, ``b [Lb, D]`` -> ``[La, Lb]`` float32.

  ``"angular"`` (or ``"cosine"``, libri-light's name for it): ``arccos(clip(cos, -1, 1)) / pi`` in
  [0, 1], computed as libri-light does (float32 arccos of the dot product of unit vectors, so frames
  at a near-zero angle carry up to ~3e-4 of rounding); an all-zero frame is at distance 0 from
  another all-zero frame and 1 from any other (libri-light's ``normalize_with_singularity``).
  ``"one_minus_cos"``: ``1 - cos`` (an all-zero frame has cos 0).
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  na = jnp.linalg.norm(a, axis=-1, keepdims=True)  # [La, 1]
  nb = jnp.linalg.norm(b, axis=-1, keepdims=True)  # [Lb, 1]
  an = a / jnp.where(na > 0, na, 1.0)
  bn = b / jnp.where(nb > 0, nb, 1.0)
  cos = jnp.clip(jnp.einsum("id,jd->ij", an, bn, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)
  if metric == "one_minus_cos":
    return 1.0 - cos  # [La, Lb]
  ang = jnp.arccos(cos) / jnp.pi  # [La, Lb]
  za, zb = na[:, 0] == 0, nb[:, 0] == 0
  zero = za[:, None] | zb[None, :]
  return jnp.where(zero, jnp.where(za[:, None] & zb[None, :], 0.0, 1.0), ang)


def dtw(dist: jax.Array, len_a: jax.Array, len_b: jax.Array, both: bool = False) -> jax.Array:
  """Path-length-normalised DTW cost of ``dist [La, Lb]`` restricted to ``[:len_a, :len_b]``, as
  libri-light's ``dtw.pyx`` (``_dtw(..., normalized=True)``).

  The accumulated cost is divided by the length of the path that libri-light backtracks from the
  last cell: among equal-cost predecessors it prefers the diagonal step, then (i, j-1), then
  (i-1, j). The cost is tie-invariant; the path length (hence the result) is not, and it is not
  symmetric: ``dtw(dist)`` may differ from ``dtw(dist.T)`` on ties. With ``both``, returns
  ``[dtw(dist, len_a, len_b), dtw(dist.T, len_b, len_a)]`` from one pass (the second path prefers
  (i-1, j) over (i, j-1)).

  Runs over anti-diagonals (``La + Lb - 1`` sequential steps of width La); the path length of the
  preferred predecessor is carried forward, which gives the backtracked path's length.
  """
  la, lb = dist.shape
  i = jnp.arange(la)
  inf = jnp.full((la,), _BIG, jnp.float32)
  zero = jnp.zeros((la,), jnp.float32)

  def shift(v, fill):  # v[i - 1], with fill at i = 0
    return jnp.concatenate([jnp.full((1,), fill, v.dtype), v[:-1]])

  def pick(cand_c, cand_n):  # path length of the first minimum (argmin takes the first)
    best = jnp.argmin(cand_c, axis=0)
    return jnp.take_along_axis(cand_n, best[None], 0)[0]

  def step(carry, k):
    # Diagonals k-1 and k-2: cost, path lengths with (i, j-1) / (i-1, j) preferred on ties; result.
    c1, n1, m1, c2, n2, m2, out = carry
    j = k - i
    ok = (j >= 0) & (j < lb)
    d = dist[i, jnp.clip(j, 0, lb - 1)]
    diag, left, up = shift(c2, _BIG), c1, shift(c1, _BIG)  # (i-1, j-1), (i, j-1), (i-1, j)
    prev_c = jnp.minimum(diag, jnp.minimum(left, up))
    prev_n = pick(jnp.stack([diag, left, up]), jnp.stack([shift(n2, 0.0), n1, shift(n1, 0.0)]))
    prev_m = pick(jnp.stack([diag, up, left]), jnp.stack([shift(m2, 0.0), shift(m1, 0.0), m1]))
    start = (i == 0) & (j == 0)
    c = jnp.where(start, d, jnp.where(ok & (prev_c < _BIG), d + prev_c, _BIG))
    n = jnp.where(start, 1.0, prev_n + 1.0)
    m = jnp.where(start, 1.0, prev_m + 1.0)
    here = k == len_a + len_b - 2
    res = jnp.stack([c[len_a - 1] / n[len_a - 1], c[len_a - 1] / m[len_a - 1]])
    out = jnp.where(here, res, out)
    return (c, n, m, c1, n1, m1, out), None

  init = (inf, zero, zero, inf, zero, zero, jnp.full((2,), _BIG, jnp.float32))
  (*_, out), _ = jax.lax.scan(step, init, jnp.arange(la + lb - 1))
  return out if both else out[0]


@functools.cache
def _batched_dtw(metric: str):
  """jit(vmap(DTW)) over a batch of item pairs ``[P, L, D]`` x2 -> ``[P, 2]`` (both orientations),
  one per metric."""
  pair = lambda xa, na, xb, nb: dtw(frame_distances(xa, xb, metric), na, nb, both=True)
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
  padded: np.ndarray, lengths: np.ndarray, pairs: np.ndarray, metric: str = "angular",
  batch_size: int = 512,
) -> np.ndarray:
  """DTW distances of the item pairs ``pairs [P, 2]`` -> ``[P, 2]`` (fixed-size batches): column 0
  with the frames of ``pairs[:, 0]`` as DTW rows, column 1 with those of ``pairs[:, 1]`` (the two
  differ only on ties, see ``dtw``)."""
  out = np.zeros((len(pairs), 2), np.float32)
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


def _average(cells: dict, averaging: str) -> float:
  """Final score (percent) of ``{(context, speaker, speaker of X or None, a, b): error}``.

  ``"libri-light"``: mean over (context, X speaker) per (speaker, a, b), then over speakers per
  (a, b), then over pairs; ``"pair_cells"``: mean over all cells of a pair, then over pairs.
  """
  if not cells:
    return float("nan")
  by_pair: dict = defaultdict(list)  # (a, b) -> errors (pair_cells) or speaker means
  if averaging == "libri-light":
    by_spk: dict = defaultdict(list)  # (speaker, a, b) -> errors over (context, X speaker)
    for (_, s, _, a, b), err in cells.items():
      by_spk[(s, a, b)].append(err)
    for (_, a, b), errs in by_spk.items():
      by_pair[(a, b)].append(float(np.mean(errs)))
  else:
    for (*_, a, b), err in cells.items():
      by_pair[(a, b)].append(err)
  return 100.0 * float(np.mean([np.mean(v) for v in by_pair.values()]))


def abx_error(
  features: Sequence[np.ndarray],
  labels: Sequence[Hashable],
  contexts: Sequence[Hashable],
  speakers: Sequence[Hashable],
  metric: str = "angular",
  max_frames: int | None = None,
  batch_size: int = 512,
  max_items_per_cell: int | None = None,
  seed: int = 0,
  averaging: str = "libri-light",
  max_size_group: int | None = None,
  max_x_across: int | None = None,
) -> dict[str, float]:
  """ABX error rates (percent) within and across speakers.

  Args:
    features: one ``[L_i, D]`` array per item.
    labels, contexts, speakers: per-item category (phone), context, speaker.
    metric: frame distance, ``"angular"`` (= ``"cosine"``, libri-light's) or ``"one_minus_cos"``
      (see ``frame_distances``).
    max_frames: truncate items longer than this (bounds the DTW size).
    batch_size: item pairs per DTW call (fixed shape: one compilation).
    max_size_group: ZeroSpeech 2021's item subsampling (libri-light ``--max_size_group``, 10
      there): every cell keeps at most this many random A, B and X items, drawn independently per
      cell (in a within-speaker cell A and X are the same draw, as there).
    max_x_across: ZeroSpeech 2021's ``--max_x_across`` (5 there): across speakers, each (context,
      speaker of A and B, a, b) keeps at most this many random X speakers.
    max_items_per_cell: the former subsampling (an option): at most this many random items per
      (context, speaker, label), drawn once for all cells, every other speaker serving as X.
    seed: seeds the draws of the three options above. The draws are numpy's, so they are the same
      caps as ZeroSpeech's but not the same random items as libri-light or fastabx.
    averaging: ``"libri-light"`` (contexts, then speakers, then pairs; see the module docstring)
      or ``"pair_cells"`` (the former order: every cell of a pair equally, then pairs).

  Returns:
    ``{"abx_within": %, "abx_across": %, "num_within_cells": n, "num_across_cells": n}``;
    a rate is ``nan`` when no triplet exists for it.
  """
  if averaging not in ("libri-light", "pair_cells"):
    raise ValueError(f"averaging must be 'libri-light' or 'pair_cells', got {averaging!r}")
  for name, v in (("max_size_group", max_size_group), ("max_x_across", max_x_across),
                  ("max_items_per_cell", max_items_per_cell)):
    if v is not None and v < 1:
      raise ValueError(f"{name} must be None or >= 1, got {v}")
  n_items = len(features)
  if not (len(labels) == len(contexts) == len(speakers) == n_items):
    raise ValueError("features, labels, contexts and speakers must have the same length")
  rng = np.random.default_rng(seed)
  cells: dict = defaultdict(list)  # (context, speaker, label) -> item indices
  for k, key in enumerate(zip(contexts, speakers, labels)):
    cells[key].append(k)
  if max_items_per_cell is not None:
    cells = {key: sorted(rng.permutation(idx)[:max_items_per_cell].tolist()) if
             len(idx) > max_items_per_cell else idx for key, idx in cells.items()}
  groups: dict = defaultdict(dict)  # context -> speaker -> label -> indices (ascending)
  for (c, s, y), idx in cells.items():
    groups[c].setdefault(s, {})[y] = np.array(idx)

  def cap(idx, n):  # at most n random items, kept in ascending order (the DTW row convention)
    return idx if n is None or len(idx) <= n else np.sort(rng.choice(idx, n, replace=False))

  # Triplet cells first (with their draws), then the DTW distances of just the pairs they use.
  within_cells, across_cells = [], []  # (key, A, B, X)
  for c, spk in groups.items():
    for s, lab in spk.items():
      for a, b in itertools.permutations(lab, 2):
        ia = cap(lab[a], max_size_group)
        if len(ia) >= 2:
          within_cells.append(((c, s, None, a, b), ia, cap(lab[b], max_size_group), ia))
        xs = [s2 for s2, lab2 in spk.items() if s2 != s and a in lab2]
        if max_x_across is not None and len(xs) > max_x_across:
          xs = [xs[k] for k in np.sort(rng.choice(len(xs), max_x_across, replace=False))]
        for s2 in xs:
          across_cells.append(((c, s, s2, a, b), cap(lab[a], max_size_group),
                               cap(lab[b], max_size_group), cap(spk[s2][a], max_size_group)))
  need = set()
  for _, ia, ib, ix in within_cells + across_cells:
    for iy in (ia, ib):
      need.update((min(p, q), max(p, q)) for p in ix.tolist() for q in iy.tolist() if p != q)
  pairs = np.array(sorted(need), dtype=np.int64).reshape(-1, 2)

  # dist[r, c]: the frames of item r are the DTW rows (libri-light puts X's there).
  padded, lengths = pad_items(features, max_frames)
  dist = np.full((n_items, n_items), np.nan)
  if len(pairs):
    d = pair_distances(padded, lengths, pairs, metric, batch_size)
    dist[pairs[:, 0], pairs[:, 1]] = d[:, 0]
    dist[pairs[:, 1], pairs[:, 0]] = d[:, 1]
  np.fill_diagonal(dist, 0.0)

  def x_rows(ix, iy):  # [len(iy), len(ix)]: d(Y, X) with X's frames as the DTW rows
    return dist[np.ix_(ix, iy)].T

  within, across = {}, {}  # (context, speaker, speaker of X, a, b) -> error
  for key, ia, ib, _ in within_cells:
    # A and X of one cell: the earlier item's frames are the rows (libri-light's symmetric
    # computation of d(A, X) within a group).
    blk = dist[np.ix_(ia, ia)]
    upper = np.arange(len(ia))[:, None] <= np.arange(len(ia))[None, :]
    within[key] = _triplet_error(np.where(upper, blk, blk.T), x_rows(ia, ib), True)
  for key, ia, ib, ix in across_cells:
    across[key] = _triplet_error(x_rows(ix, ia), x_rows(ix, ib), False)

  return {
    "abx_within": _average(within, averaging),
    "abx_across": _average(across, averaging),
    "num_within_cells": len(within),
    "num_across_cells": len(across),
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


def evaluate_abx(ctx, wavs, rows, layer: int, max_size_group: int | None = 10,
                 max_x_across: int | None = 5, max_items_per_cell: int | None = None,
                 seed: int = 0) -> dict[str, float]:
  """ABX error of layer `layer`'s features of the utterances `wavs` of `rows` (with alignments
  and speakers): {"abx_within", "abx_across"}; subsampling as `abx_error` (ZeroSpeech 2021's
  caps by default)."""
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
  r = abx_error(items, ys, ctxs, spk, metric="angular", max_frames=32,
                max_size_group=max_size_group, max_x_across=max_x_across,
                max_items_per_cell=max_items_per_cell, seed=seed)
  return {"abx_within": r["abx_within"], "abx_across": r["abx_across"]}


def run(ctx, manifest: str = "", split: str = "", layer="last", seed: int = 0,
        max_size_group: int | None = 10, max_x_across: int | None = 5,
        max_items_per_cell: int | None = None) -> dict[str, float]:
  """The `abx` task on the rows of `manifest` (default: the run's manifest) of `split`."""
  from jaxspeech.eval import common

  rows = common.task_rows(ctx, manifest, split, need_alignment=True)
  li = common.layer_index(ctx, layer)
  opt = lambda v: None if v is None else int(v)
  return evaluate_abx(ctx, common.load_wavs(rows), rows, li, opt(max_size_group),
                      opt(max_x_across), opt(max_items_per_cell), int(seed))
