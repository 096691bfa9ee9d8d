"""Batched, jit-compiled k-means with masked points: k-means++ / random init, Lloyd steps,
empty-cluster relocation, and an online (minibatch) variant.

Shape legend: N points (any leading shape, e.g. ``[B, T]``, flattened), D width, K clusters.

Every point carries a validity mask (True = real point, False = padding); padding never moves a
centroid, never counts towards inertia and is never picked as a seed. Shapes are static: ``k`` and
``iters`` are Python ints.

Empty clusters (no valid point assigned in a Lloyd step) are relocated as scikit-learn's Lloyd
step does (``_relocate_empty_clusters_dense``): the j-th empty cluster takes the j-th valid point
farthest from its current centroid, and that point leaves its old cluster's mean. A cluster left
with no point is placed at the mean of the largest cluster (the first one on equal counts, as
scikit-learn intends; scikit-learn itself copies that cluster's unnormalised sum when it comes
later in index order). Nothing is relocated when every valid point sits on its centroid. Among
the farthest points, ties go to the lowest index (scikit-learn's ``argpartition`` order is
unspecified, so on several empty clusters the two may differ by a permutation of those clusters).
The inertia sequence stays non-increasing: a relocated point's cost drops to 0 and every other
point keeps its cluster, whose mean can only lower their cost; the next assignment can only lower
it again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxspeech.ops.codebook import nearest_codeword

_HIGHEST = lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
  centroids: jax.Array  # [K, D] float32
  inertia: jax.Array  # [iters + 1] sum of squared distances of valid points after each step


class MiniBatchKMeansState(NamedTuple):
  centroids: jax.Array  # [K, D] float32
  counts: jax.Array  # [K] float32 number of points each centroid has absorbed


def _flatten(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  flat = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])  # [N, D]
  if mask is None:
    return flat, jnp.ones((flat.shape[0],), bool)
  return flat, jnp.asarray(mask, bool).reshape(-1)


def kmeans_plus_plus_init(
  key: jax.Array, x: jax.Array, mask: jax.Array | None, k: int
) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) over valid points -> ``[K, D]``.

  The first seed is uniform over valid points, each next one is drawn with probability
  proportional to the squared distance to the nearest seed so far.
  """
  x, valid = _flatten(x, mask)
  keys = jax.random.split(key, k)
  first = jax.random.categorical(keys[0], jnp.where(valid, 0.0, -jnp.inf))
  centroids = jnp.zeros((k, x.shape[-1]), jnp.float32).at[0].set(x[first])
  d2 = jnp.sum(jnp.square(x - x[first]), -1)  # [N]

  def body(i, carry):
    centroids, d2 = carry
    w = jnp.where(valid, d2, 0.0)
    # If every valid point coincides with a seed, fall back to uniform over valid points.
    logits = jnp.where(jnp.sum(w) > 0, jnp.log(w), jnp.where(valid, 0.0, -jnp.inf))
    idx = jax.random.categorical(keys[i], logits)
    centroids = centroids.at[i].set(x[idx])
    d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - x[idx]), -1))
    return centroids, d2

  centroids, _ = lax.fori_loop(1, k, body, (centroids, d2))
  return centroids


def random_init(key: jax.Array, x: jax.Array, mask: jax.Array | None, k: int) -> jax.Array:
  """``k`` distinct valid points drawn uniformly (the first ``k`` of a random order)."""
  x, valid = _flatten(x, mask)
  score = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
  _, idx = lax.top_k(-score, k)
  return x[idx]


def kmeans_assign(
  x: jax.Array, centroids: jax.Array, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid: ``x [..., D]`` -> ``(ids [...] int32, squared distance [...])``."""
  return nearest_codeword(x, centroids, chunk_size)


def kmeans_inertia(x: jax.Array, mask: jax.Array | None, centroids: jax.Array) -> jax.Array:
  """Sum over valid points of the squared distance to the nearest centroid."""
  x, valid = _flatten(x, mask)
  _, d = kmeans_assign(x, centroids)
  return jnp.sum(jnp.where(valid, d, 0.0))


def _cluster_sums(x, valid, ids, k):
  onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32) * valid[:, None]  # [N, K]
  counts = jnp.sum(onehot, 0)  # [K]
  sums = jnp.einsum("nk,nd->kd", onehot, x, precision=_HIGHEST)  # [K, D]
  return sums, counts


def kmeans_step(
  x: jax.Array, mask: jax.Array | None, centroids: jax.Array, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """One Lloyd step: assign, relocate empty clusters (scikit-learn's way), recompute means.

  Returns ``(new_centroids [K, D], inertia)`` where ``inertia`` is the cost of the assignment to
  the *input* centroids.
  """
  x, valid = _flatten(x, mask)
  k = centroids.shape[0]
  ids, d = kmeans_assign(x, centroids, chunk_size)  # [N], [N]
  d = jnp.where(valid, d, 0.0)
  sums, counts = _cluster_sums(x, valid, ids, k)
  empty = counts == 0  # [K]
  # The j-th empty cluster (in index order) takes the j-th farthest valid point.
  n_far = min(k, x.shape[0])
  far_d, far = lax.top_k(jnp.where(valid, d, -1.0), n_far)  # [min(K, N)], descending
  rank = jnp.cumsum(empty) - 1  # [K]
  slot = jnp.clip(rank, 0, n_far - 1)
  moved = far[slot]  # [K] the point each cluster would take
  relocate = empty & (rank < n_far) & valid[moved] & (far_d[0] > 0)  # [K]
  w = relocate.astype(jnp.float32)
  # The moved points leave their old clusters (never an empty one) and found the empty ones.
  sums = sums.at[ids[moved]].add(-w[:, None] * x[moved])
  counts = counts.at[ids[moved]].add(-w)
  sums = jnp.where(relocate[:, None], x[moved], sums)
  counts = jnp.where(relocate, 1.0, counts)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  biggest = means[jnp.argmax(counts)]  # no valid point at all: the centroids stay
  new = jnp.where((counts > 0)[:, None], means, jnp.where(jnp.any(valid), biggest, centroids))
  return new, jnp.sum(d)


def kmeans_fit(
  x: jax.Array,
  mask: jax.Array | None,
  k: int,
  iters: int,
  key: jax.Array,
  init: str = "kmeans++",
  chunk_size: int | None = None,
) -> KMeansResult:
  """Fit k-means with ``iters`` Lloyd steps (``lax.scan``).

  Args:
    x: ``[..., D]`` points (e.g. ``[B, T, D]`` frames).
    mask: ``[...]`` bool, True = valid point; None = all valid.
    k: number of clusters (static).
    iters: number of Lloyd steps (static).
    key: PRNG key for the initialisation.
    init: ``"kmeans++"`` or ``"random"``.
    chunk_size: optional chunking of the assignment (see ``nearest_codeword``).

  Returns:
    ``KMeansResult(centroids [K, D], inertia [iters + 1])``; ``inertia[i]`` is the cost after ``i``
    Lloyd steps (``inertia[0]`` that of the initial centroids) and is non-increasing.
  """
  x, valid = _flatten(x, mask)
  if init == "kmeans++":
    c0 = kmeans_plus_plus_init(key, x, valid, k)
  elif init == "random":
    c0 = random_init(key, x, valid, k)
  else:
    raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")

  def body(c, _):
    new, inertia = kmeans_step(x, valid, c, chunk_size)
    return new, inertia

  c, inertias = lax.scan(body, c0, None, length=iters)  # [iters]
  final = kmeans_inertia(x, valid, c)
  return KMeansResult(c, jnp.concatenate([inertias, final[None]]))


def minibatch_kmeans_init(centroids: jax.Array) -> MiniBatchKMeansState:
  """Online k-means state from initial centroids ``[K, D]`` (no points absorbed yet)."""
  centroids = centroids.astype(jnp.float32)
  return MiniBatchKMeansState(centroids, jnp.zeros(centroids.shape[:1], jnp.float32))


def minibatch_kmeans_step(
  state: MiniBatchKMeansState, x: jax.Array, mask: jax.Array | None
) -> MiniBatchKMeansState:
  """One online update (Sculley 2010, per-centre learning rate 1 / count).

  Each centroid becomes the running mean of every point ever assigned to it: with batch counts
  ``m`` and sums ``s``, ``c <- c + (s - m c) / (n + m)``, ``n <- n + m``. Centroids that receive no
  point are unchanged. Use it over a stream of ``[B, T, D]`` batches with their masks.
  """
  x, valid = _flatten(x, mask)
  k = state.centroids.shape[0]
  ids, _ = kmeans_assign(x, state.centroids)
  sums, m = _cluster_sums(x, valid, ids, k)
  counts = state.counts + m
  step = (sums - m[:, None] * state.centroids) / jnp.maximum(counts, 1.0)[:, None]
  return MiniBatchKMeansState(state.centroids + step, counts)
