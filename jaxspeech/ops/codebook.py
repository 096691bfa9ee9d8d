"""DinoSR online EMA codebooks and nearest-codeword assignment (SEEDS §2).

Shape legend: B batch, T frames, D width, V codebook size, N valid frames, C chunk size.

Reference: Alexander-H-Liu/dinosr ``models/dinosr.py``. Each codebook keeps float32 running sums
``S [V, D]`` and counts ``n [V]``; the embeddings are ``E = S / n``. Every step, from the
(instance-normalised) teacher targets ``y`` at the selected frames and their one-hot assignments
``O``::

  cnt = Oᵀ1,  mem = Oᵀy                        # sums over the global batch
  n <- tau n + (1 - tau) cnt,  S <- tau S + (1 - tau) mem     only where cnt > 0 (tau = 0.9)

Sums are plain reductions over the batch axes, so a batch-sharded ``jax.Array`` under ``jax.jit``
gives global statistics without an explicit all-reduce. Stacked codebooks (``[Lyr, V, D]``, one
per target layer) are handled with ``jax.vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


class CodebookState(NamedTuple):
  sums: jax.Array  # [V, D] float32 running sums S
  counts: jax.Array  # [V] float32 running counts n


def init_codebook(key: jax.Array, num_codewords: int, dim: int) -> CodebookState:
  """DinoSR's default init: ``randn(D, V)``, instance-normalised over V, transposed; counts 1."""
  w = jax.random.normal(key, (dim, num_codewords), jnp.float32)  # [D, V]
  w = (w - w.mean(-1, keepdims=True)) * lax.rsqrt(w.var(-1, keepdims=True) + 1e-5)
  return CodebookState(sums=w.T, counts=jnp.ones((num_codewords,), jnp.float32))  # [V, D]


def codebook_embeddings(state: CodebookState) -> jax.Array:
  """``E = S / n`` ``[V, D]`` (counts start at 1 and only grow towards used codewords' counts)."""
  return state.sums / state.counts[..., None]


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """``||x - e_v||^2`` for ``x [..., D]``, ``codebook [V, D]`` -> ``[..., V]`` float32."""
  x = x.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  xe = jnp.einsum("...d,vd->...v", x, e, precision=_HIGHEST)  # [..., V]
  d = jnp.sum(x * x, -1, keepdims=True) - 2.0 * xe + jnp.sum(e * e, -1)
  return jnp.maximum(d, 0.0)


def nearest_codeword(
  x: jax.Array, codebook: jax.Array, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Nearest codeword by squared L2 distance.

  Args:
    x: ``[..., D]`` vectors.
    codebook: ``[V, D]``.
    chunk_size: if set, process the flattened vectors ``C`` at a time (``lax.map``) so the
      ``[N, V]`` distance matrix is never materialised whole.

  Returns:
    ``(ids [...] int32, sqdist [...] float32)`` index of and squared distance to the nearest
    codeword (lowest index on ties, like ``argmin``).
  """
  lead = x.shape[:-1]
  flat = x.reshape(-1, x.shape[-1])  # [N, D]
  n = flat.shape[0]

  def assign(chunk):
    d = squared_distances(chunk, codebook)  # [C, V]
    ids = jnp.argmin(d, axis=-1).astype(jnp.int32)
    return ids, jnp.take_along_axis(d, ids[:, None], -1)[:, 0]

  if chunk_size is None or chunk_size >= n:
    ids, dist = assign(flat)
  else:
    pad = (-n) % chunk_size
    chunks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk_size, flat.shape[-1])
    ids, dist = lax.map(assign, chunks)  # [N/C, C]
    ids, dist = ids.reshape(-1)[:n], dist.reshape(-1)[:n]
  return ids.reshape(lead), dist.reshape(lead)


def codebook_update(
  state: CodebookState,
  y: jax.Array,
  codes: jax.Array,
  mask: jax.Array,
  decay: float | jax.Array = 0.9,
) -> CodebookState:
  """One EMA update from targets ``y [B, T, D]`` assigned to ``codes [B, T]`` at ``mask [B, T]``.

  Codewords with no assigned frame in this batch keep their sums and counts exactly.
  """
  v = state.counts.shape[-1]
  onehot = jax.nn.one_hot(codes, v, dtype=jnp.float32) * mask[..., None]  # [B, T, V]
  cnt = jnp.sum(onehot, axis=tuple(range(onehot.ndim - 1)))  # [V]
  mem = jnp.einsum("...v,...d->vd", onehot, y.astype(jnp.float32), precision=_HIGHEST)  # [V, D]
  alpha = jnp.where(cnt > 0, jnp.asarray(decay, jnp.float32), 1.0)  # [V]
  counts = alpha * state.counts + (1.0 - alpha) * cnt
  sums = alpha[:, None] * state.sums + (1.0 - alpha[:, None]) * mem
  return CodebookState(sums=sums, counts=counts)


def codebook_usage(codes: jax.Array, mask: jax.Array, num_codewords: int) -> dict[str, jax.Array]:
  """Health statistics of hard assignments ``codes [B, T]`` at ``mask``: perplexity and the
  fraction of codewords used at least once (DinoSR logs the former as ``target_ppl``)."""
  hist = jnp.sum(
    jax.nn.one_hot(codes, num_codewords, dtype=jnp.float32) * mask[..., None],
    axis=tuple(range(codes.ndim)),
  )  # [V]
  p = hist / jnp.maximum(jnp.sum(hist), 1.0)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(ent), "used_fraction": jnp.mean((hist > 0).astype(jnp.float32))}


def init_codebook_normal(key: jax.Array, num_codewords: int, dim: int) -> CodebookState:
  """DinoSR's ``normal_init_codebook`` option: ``N(0, 1/V)`` entries (std ``V**-0.5``); counts 1."""
  sums = jax.random.normal(key, (num_codewords, dim), jnp.float32) * num_codewords**-0.5
  return CodebookState(sums=sums, counts=jnp.ones((num_codewords,), jnp.float32))  # [V, D]


def restart_dead_codewords(
  state: CodebookState,
  idle: jax.Array,
  y: jax.Array,
  codes: jax.Array,
  mask: jax.Array,
  key: jax.Array,
  patience: int,
) -> tuple[CodebookState, jax.Array]:
  """Dead-codeword restart (not in DinoSR; the usual VQ remedy, e.g. Jukebox / SoundStream).

  ``idle [V]`` int32 counts the consecutive steps each codeword was assigned no frame at ``mask``;
  a codeword idle for ``patience`` steps is re-initialised to a random selected target frame of
  ``y [B, T, D]`` (sum = that frame, count 1) and its idle counter reset. Without selected frames
  nothing is restarted. Returns (codebook, idle).
  """
  v, d = state.sums.shape
  used = jnp.sum(jax.nn.one_hot(codes, v, dtype=jnp.float32) * mask[..., None],
                 axis=tuple(range(codes.ndim))) > 0  # [V]
  idle = jnp.where(used, 0, idle + 1).astype(jnp.int32)
  flat_y = y.reshape(-1, d).astype(jnp.float32)  # [N, D]
  flat_m = mask.reshape(-1)  # [N]
  idx = jax.random.categorical(key, jnp.where(flat_m, 0.0, -jnp.inf), shape=(v,))  # [V]
  dead = (idle >= patience) & jnp.any(flat_m)  # [V]
  sums = jnp.where(dead[:, None], flat_y[idx], state.sums)
  counts = jnp.where(dead, 1.0, state.counts)
  return CodebookState(sums=sums, counts=counts), jnp.where(dead, 0, idle).astype(jnp.int32)
