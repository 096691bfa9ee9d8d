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


def _keep_from_scores(scores: jax.Array, sparsity) -> jax.Array:
  """Boolean keep-mask over a flat vector ``[P]``: prune the ``num_pruned`` smallest."""
  p = scores.shape[0]
  k = num_pruned(p, sparsity)
  order = jnp.argsort(scores, stable=True)  # [P] ascending, ties by index
  keep_sorted = jnp.arange(p) >= k  # [P]
  return jnp.zeros((p,), bool).at[order].set(keep_sorted)


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
