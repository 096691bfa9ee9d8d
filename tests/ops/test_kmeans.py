"""k-means: cluster recovery, monotone inertia, numpy Lloyd parity, masking, online variant."""

import functools

import chex
import jax
import numpy as np
import pytest

from jaxspeech.ops.kmeans import (
  kmeans_assign,
  kmeans_fit,
  kmeans_plus_plus_init,
  kmeans_step,
  minibatch_kmeans_init,
  minibatch_kmeans_step,
  random_init,
)


def _blobs(seed=0, k=5, per=40, d=4, spread=0.05):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, d)) * 10.0
  labels = np.repeat(np.arange(k), per)
  x = centres[labels] + spread * rng.normal(size=(k * per, d))
  perm = rng.permutation(k * per)
  return x[perm].astype(np.float32), labels[perm], centres


def _np_lloyd(x, valid, c):
  """Reference Lloyd step on the valid points (no empty clusters in the cases it is used on)."""
  xv = x[valid].astype(np.float64)
  d = ((xv[:, None] - c[None].astype(np.float64)) ** 2).sum(-1)
  ids = d.argmin(1)
  new = np.stack([xv[ids == j].mean(0) for j in range(len(c))])
  return new, d.min(1).sum()


def _same_partition(a, b):
  """Two labelings agree up to a permutation of ids."""
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_separated_clusters():
  x, labels, centres = _blobs()
  # Padding: garbage points with mask False must not pull any centroid.
  xp = np.concatenate([x, np.full((30, 4), 1e3, np.float32)]).reshape(2, -1, 4)
  mask = np.concatenate([np.ones(len(x), bool), np.zeros(30, bool)]).reshape(2, -1)
  fit = jax.jit(kmeans_fit, static_argnames=("k", "iters", "init"))
  # k-means++ seeds one point per blob here: a seed inside an already seeded blob has D^2 weight
  # ~0.05^2 against ~10^2 elsewhere.
  best = fit(xp, mask, k=5, iters=20, key=jax.random.key(0), init="kmeans++")
  ids, _ = kmeans_assign(x, best.centroids)
  assert _same_partition(np.asarray(ids), labels)
  c = np.asarray(best.centroids)
  for centre in centres:
    assert np.min(np.linalg.norm(c - centre, axis=1)) < 0.05
  assert np.all(np.abs(c) < 100)


def test_inertia_non_increasing_and_single_trace():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 50, 3)).astype(np.float32)  # no cluster structure: many moves
  mask = np.arange(50)[None] < np.array([50, 31, 12])[:, None]

  @functools.partial(jax.jit, static_argnames=("k", "iters"))
  @chex.assert_max_traces(n=1)
  def fit(x, m, key, k, iters):
    return kmeans_fit(x, m, k, iters, key)

  for seed in range(3):
    res = fit(x, mask, jax.random.key(seed), k=8, iters=15)
    inertia = np.asarray(res.inertia)
    assert inertia.shape == (16,)
    assert np.all(np.diff(inertia) <= 1e-4 * inertia[:-1]), inertia
    assert inertia[-1] < inertia[0]


def test_step_matches_numpy_lloyd():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 60, 5)).astype(np.float32)
  mask = np.arange(60)[None] < np.array([60, 45])[:, None]
  c0 = x[0, :6].copy()  # 6 data points: no cluster can be empty
  new, inertia = jax.jit(kmeans_step)(x, mask, c0)
  want, want_inertia = _np_lloyd(x.reshape(-1, 5), mask.reshape(-1), c0)
  np.testing.assert_allclose(np.asarray(new), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(inertia), want_inertia, rtol=1e-5)


def test_empty_cluster_relocated_to_farthest_point():
  x = np.array([[0.0], [0.5], [1.0], [4.0], [10.0], [11.0]], np.float32)
  c0 = np.array([[1.0], [10.5], [100.0]], np.float32)  # centroid 2 gets no points
  new, _ = kmeans_step(x, None, c0)
  # Assignments: {0, .5, 1, 4} -> 0 (distances 1, .25, 0, 9), {10, 11} -> 1. The farthest point,
  # 4, founds cluster 2 and leaves cluster 0, whose mean becomes .5 (1.375 had it stayed).
  np.testing.assert_array_equal(np.asarray(new), [[0.5], [10.5], [4.0]])
  # Padding is never a relocation target.
  xm = np.concatenate([x, [[500.0]]]).astype(np.float32)
  new_m, _ = kmeans_step(xm, np.array([1, 1, 1, 1, 1, 1, 0], bool), c0)
  np.testing.assert_array_equal(np.asarray(new_m), new)
  # A singleton moved away leaves its cluster empty: it goes to the largest cluster's mean.
  # {0, 1} -> 0, {10} -> 1 (distance 25), cluster 2 empty: 10 moves to 2, cluster 1 -> .5.
  x = np.array([[0.0], [1.0], [10.0]], np.float32)
  new, _ = kmeans_step(x, None, np.array([[0.5], [15.0], [100.0]], np.float32))
  np.testing.assert_array_equal(np.asarray(new), [[0.5], [0.5], [10.0]])
  # Two empty clusters take the farthest and the second farthest point, in index order.
  x = np.array([[0.0], [1.0], [7.0], [-4.0]], np.float32)  # -> 0 (distances 0, 1, 49, 16)
  new, _ = kmeans_step(x, None, np.array([[0.0], [50.0], [60.0]], np.float32))
  np.testing.assert_array_equal(np.asarray(new), [[0.5], [7.0], [-4.0]])
  # Every point on its centroid (more clusters than distinct points): nothing moves, the empty
  # cluster goes to the largest cluster's mean.
  x = np.array([[1.0], [1.0], [2.0]], np.float32)
  new, inertia = kmeans_step(x, None, np.array([[1.0], [9.0], [2.0]], np.float32))
  assert float(inertia) == 0.0
  np.testing.assert_array_equal(np.asarray(new), [[1.0], [1.0], [2.0]])


@pytest.mark.parametrize("seed", range(4))
def test_step_matches_sklearn_lloyd_with_empty_clusters(seed):
  sklearn_cluster = pytest.importorskip("sklearn.cluster")
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(60, 3)).astype(np.float32)
  # Five data points (each keeps at least itself) and three far-away centroids that get no point.
  c0 = np.concatenate([x[rng.choice(60, 5, replace=False)],
                       100.0 + rng.normal(size=(3, 3))]).astype(np.float32)
  new, _ = jax.jit(kmeans_step)(x, None, c0)
  km = sklearn_cluster.KMeans(8, init=c0.astype(np.float64), n_init=1, max_iter=1, tol=0.0,
                              algorithm="lloyd").fit(x.astype(np.float64))
  # Sorted rows: scikit-learn's order among the farthest points (argpartition) is unspecified.
  order = lambda c: c[np.argsort(c[:, 0])]
  np.testing.assert_allclose(order(np.asarray(new)), order(km.cluster_centers_), rtol=1e-5,
                             atol=1e-5)
  # Three relocated data points, removed from the means of the clusters they left.
  assert np.all(np.abs(np.asarray(new)) < 10.0)


def test_random_init_distinct_valid_points():
  x, _, _ = _blobs(seed=5, k=3, per=10)
  mask = np.zeros(len(x), bool)
  mask[:12] = True
  c = np.asarray(random_init(jax.random.key(0), x, mask, 12))
  # k = number of valid points: every valid point exactly once, never a padded one.
  np.testing.assert_array_equal(np.sort(c, axis=0), np.sort(x[:12], axis=0))
  res = kmeans_fit(x, mask, 4, 5, jax.random.key(1), init="random")
  assert np.all(np.diff(np.asarray(res.inertia)) <= 1e-6)
  with pytest.raises(ValueError):
    kmeans_fit(x, mask, 4, 5, jax.random.key(1), init="bogus")


def test_kmeans_plus_plus_picks_valid_distinct_points():
  x, _, _ = _blobs(seed=3, k=4, per=25)
  mask = np.ones(len(x), bool)
  mask[::2] = False
  c = np.asarray(kmeans_plus_plus_init(jax.random.key(0), x, mask, 4))
  valid_pts = x[mask]
  for row in c:
    assert np.any(np.all(valid_pts == row, axis=1))
  # With four separated blobs, k-means++ lands one seed in each (it fails with tiny probability).
  ids, _ = kmeans_assign(c, np.asarray(_blobs(seed=3, k=4, per=25)[2], np.float32))
  assert len(set(np.asarray(ids).tolist())) == 4


def test_minibatch_online_running_mean_and_convergence():
  x, labels, centres = _blobs(seed=4, per=60)
  c0 = np.asarray(kmeans_plus_plus_init(jax.random.key(1), x, None, 5))
  state = minibatch_kmeans_init(c0)
  step = jax.jit(minibatch_kmeans_step)
  batches = x.reshape(6, 50, 4)
  masks = np.ones((6, 50), bool)
  masks[-1, 40:] = False
  # Numpy reference of the online update (Sculley 2010).
  c_np, n_np = c0.astype(np.float64), np.zeros(5)
  for xb, mb in zip(batches, masks):
    state = step(state, xb, mb)
    xv = xb[mb].astype(np.float64)
    ids = ((xv[:, None] - c_np[None]) ** 2).sum(-1).argmin(1)
    for j in range(5):
      m = (ids == j).sum()
      if m:
        n_np[j] += m
        c_np[j] += (xv[ids == j].sum(0) - m * c_np[j]) / n_np[j]
  np.testing.assert_allclose(np.asarray(state.centroids), c_np, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(state.counts), n_np)
  assert np.asarray(state.counts).sum() == masks.sum()
  # Well-separated blobs: every centroid converges to a true centre.
  c = np.asarray(state.centroids)
  for centre in centres:
    assert np.min(np.linalg.norm(c - centre, axis=1)) < 0.05
