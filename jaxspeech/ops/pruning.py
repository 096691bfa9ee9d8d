"""Unstructured magnitude pruning on pytrees (PARP, OMP/IMP/MPI baselines, TTS pruning; SEEDS §4-5).

Shape legend: P number of prunable parameters (one tensor, or all of them for global scope).

``MP(theta, s)`` keeps the largest ``1 - s`` fraction of ``|theta|`` and zeroes the rest, either per
tensor or globally over every prunable tensor of a pytree. Sparsity is **exact**: exactly
``round(P * s)`` entries are pruned (computed in Python when ``sparsity`` is a Python float), with
ties broken by a stable order: among equal magnitudes the entry with the lower flat index (tensors
taken in pytree-leaf order for global scope) is pruned first.

Which tensors are prunable is a regular expression searched (``re.search``) in each leaf's
'/'-joined path, e.g. ``"encoder/layers/.*/(attention|feed_forward)/.*kernel"``; a trailing
``value`` key (Flax NNX ``Variable``) is dropped from the path. Masks are a pytree of the same
structure: boolean arrays (True = kept) for prunable leaves and a scalar ``True`` elsewhere, so
``apply_masks`` is a broadcasted ``where``. Everything is jit-able; ``pattern`` and ``scope`` are
static.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

PyTree = Any


def _key_str(k) -> str:
  if isinstance(k, DictKey):
    return str(k.key)
  if isinstance(k, GetAttrKey):
    return k.name
  if isinstance(k, SequenceKey):
    return str(k.idx)
  if isinstance(k, FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path) -> str:
  """'/'-joined name of a key path (``jax.tree_util.tree_flatten_with_path``)."""
  keys = [_key_str(k) for k in path]
  if len(keys) > 1 and isinstance(path[-1], GetAttrKey) and keys[-1] == "value":
    keys = keys[:-1]
  return "/".join(keys)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in pytree-leaf order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat]


def prunable_selection(tree: PyTree, pattern: str = r".*") -> PyTree:
  """Pytree of Python bools: True where the leaf's path matches ``pattern`` (and is an array
  with at least one element)."""
  rx = re.compile(pattern)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  sel = [bool(rx.search(path_str(p))) and np.size(leaf) > 0 for p, leaf in flat]
  return jax.tree_util.tree_unflatten(treedef, sel)


def num_pruned(size: int, sparsity) -> jax.Array | int:
  """Number of entries pruned out of ``size`` at ``sparsity``: ``round(size * sparsity)``.

  Exact (Python arithmetic, half to even) for a Python ``sparsity``; for a traced one it is
  computed in float32 (exact up to 2**24 entries, within ±0.1% far beyond).
  """
  if isinstance(sparsity, (int, float)):
    if not 0.0 <= sparsity <= 1.0:
      raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(size * sparsity))
  return jnp.round(size * jnp.asarray(sparsity, jnp.float32)).astype(jnp.int32)


def _sort_keys(scores: jax.Array) -> jax.Array:
  """uint32 keys ordered like ``jnp.sort`` orders the float32 ``scores`` (ties stay ties).

  The IEEE-754 bit pattern read as an integer is monotone in the value for non-negative floats
  and reversed for negative ones; flipping every bit of a negative float and only the sign bit of
  a non-negative one (the radix-sort key) makes it monotone over all floats. ``-0.0`` is mapped to
  ``+0.0`` and every NaN to one positive NaN first, so both compare as ``jnp.argsort`` does:
  ``-0.0 == 0.0`` and NaNs equal to each other, after ``+inf``. Subnormals: the ``== 0`` test
  uses the backend's float compare, the same one the sort comparator uses (XLA CPU flushes them,
  so there they tie with zero in both).
  """
  s = jnp.where(scores == 0, jnp.float32(0), scores)  # [P]
  s = jnp.where(jnp.isnan(s), jnp.float32(jnp.nan), s)  # [P]
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)  # [P]
  flip = jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))  # [P]
  return bits ^ flip  # [P]


def _keep_from_scores(scores: jax.Array, sparsity) -> jax.Array:
  """Boolean keep-mask over a flat float32 vector ``[P]``: prune the ``num_pruned`` smallest.

  Exactly ``k = num_pruned(P, sparsity)`` entries are pruned: the ``k`` smallest scores, ties
  broken by the lower index first. This is the mask of a stable ``argsort`` (the first ``k``
  entries of the sorted order are pruned), computed by selection instead of sorting:

  1. the k-th smallest key ``t`` is found by a radix select over the 32 bits of the sort key
     (:func:`_sort_keys`), most significant first: 32 passes of one ``sum(key <= candidate)``;
  2. every score strictly below ``t`` is pruned, and among those equal to ``t`` the first
     ``k - count(key < t)`` by index (a cumulative sum, skipped by a ``lax.cond`` when all of them
     are pruned -- the usual case for continuous weights, and for an already pruned model).

  Scores may be any float32 (magnitudes are >= 0 here); negative values, ``-0.0`` and NaN are
  ordered as ``jnp.argsort`` orders them (see :func:`_sort_keys`), so the mask is the argsort mask
  for every input. Works under ``jax.jit`` with a traced ``sparsity`` (``k`` is then a traced
  int32) and for ``k = 0`` (nothing pruned) and ``k = P`` (everything pruned).

  Why hand-written: an exact top-k *mask* with index tie-breaking in O(P) is not in JAX/XLA on
  CPU -- ``jnp.argsort`` / ``lax.top_k`` sort (O(P log P); ``top_k`` with ``k`` ~ P/2 is slower
  still, and needs a static ``k``; ``jnp.partition`` is built on ``top_k``). At HuBERT-base size
  (~95M prunable weights) the sort took ~24.5 s per re-prune on a 2-core CPU. Measured on a
  2-core CPU (shared with other jobs), 2026-11-29, jitted, sparsity 0.5, one call after warm-up:
  argsort 1.36 s -> selection 0.09 s at 4M entries, 8.68 s -> 0.59 s at 23M entries (0.81 s at
  23M with integer-valued scores, i.e. many ties at the threshold: the cumsum path).
  """
  p = scores.shape[0]
  k = num_pruned(p, sparsity)
  keys = _sort_keys(scores.astype(jnp.float32))  # [P] uint32

  def select_bit(i, t):
    # t holds the bits of the answer above bit b; decide bit b: it stays 0 iff at least k keys are
    # <= t with bit b clear and all lower bits set.
    b = (31 - i).astype(jnp.uint32)
    one = jnp.uint32(1)
    candidate = t | ((one << b) - one)  # [] uint32
    enough = jnp.sum(keys <= candidate, dtype=jnp.int32) >= k  # []
    return jnp.where(enough, t, t | (one << b))

  # t = the smallest key with count(keys <= t) >= k, i.e. the k-th smallest key (t = 0 for k = 0,
  # where nothing below or tied is pruned since need = 0).
  t = jax.lax.fori_loop(0, 32, select_bit, jnp.uint32(0))  # [] uint32
  below = keys < t  # [P]
  tied = keys == t  # [P]
  need = k - jnp.sum(below, dtype=jnp.int32)  # [] tied entries to prune, the lowest indices first
  prune_tied = jax.lax.cond(
    need >= jnp.sum(tied, dtype=jnp.int32),
    lambda: tied,
    lambda: tied & (jnp.cumsum(tied, dtype=jnp.int32) <= need),  # [P]
  )
  return ~(below | prune_tied)


def magnitude_mask(x: jax.Array, sparsity) -> jax.Array:
  """Keep-mask of one tensor (True = kept): the ``round(size * s)`` smallest ``|x|`` are pruned."""
  scores = jnp.abs(jnp.asarray(x).astype(jnp.float32)).reshape(-1)  # [P]
  return _keep_from_scores(scores, sparsity).reshape(jnp.shape(x))


def magnitude_masks(
  params: PyTree, sparsity, pattern: str = r".*", scope: str = "per_tensor"
) -> PyTree:
  """Magnitude masks for every prunable leaf of ``params``.

  Args:
    params: pytree of arrays (e.g. ``nnx.State`` of ``nnx.Param`` or a pure dict).
    sparsity: target fraction pruned, in [0, 1].
    pattern: regex selecting prunable leaves by path (see :func:`prunable_selection`).
    scope: ``"per_tensor"`` (each tensor pruned to ``sparsity``) or ``"global"`` (one threshold
      over all prunable entries together; tensors end up with different sparsities).

  Returns:
    A pytree like ``params``: bool arrays for prunable leaves, scalar ``True`` elsewhere.
  """
  sel = jax.tree.leaves(prunable_selection(params, pattern))
  leaves, treedef = jax.tree.flatten(params)
  if scope == "per_tensor":
    out = [magnitude_mask(x, sparsity) if s else jnp.ones((), bool) for x, s in zip(leaves, sel)]
  elif scope == "global":
    chosen = [jnp.abs(jnp.asarray(x).astype(jnp.float32)).reshape(-1)
              for x, s in zip(leaves, sel) if s]
    if not chosen:
      raise ValueError(f"no parameter path matches the prunable pattern {pattern!r}")
    keep = _keep_from_scores(jnp.concatenate(chosen), sparsity)  # [P]
    out, offset = [], 0
    for x, s in zip(leaves, sel):
      if s:
        n = int(np.size(x))
        out.append(keep[offset:offset + n].reshape(jnp.shape(x)))
        offset += n
      else:
        out.append(jnp.ones((), bool))
  else:
    raise ValueError(f"scope must be 'per_tensor' or 'global', got {scope!r}")
  return jax.tree.unflatten(treedef, out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``m ⊙ theta``: zero the pruned entries (dtype kept)."""
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), params, masks)


def sparsity_stats(tree: PyTree, pattern: str = r".*") -> dict[str, jax.Array]:
  """Zero fraction of every prunable leaf, keyed by path, plus ``"global"`` over all of them.

  Works on parameters (entries equal to 0) and on masks (entries False) alike; this is the
  content of the ``sparsity.json`` report. Returns float32 scalars (``float()`` them to save).
  """
  sel = jax.tree.leaves(prunable_selection(tree, pattern))
  stats, zeros, total = {}, jnp.zeros((), jnp.float32), 0
  for (name, x), s in zip(named_leaves(tree), sel):
    if not s:
      continue
    z = jnp.sum(jnp.asarray(x) == 0).astype(jnp.float32)
    stats[name] = z / np.size(x)
    zeros, total = zeros + z, total + int(np.size(x))
  stats["global"] = zeros / max(total, 1)
  return stats
