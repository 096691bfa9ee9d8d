"""Vector quantisation with a straight-through estimator, EMA codebooks pooled over modalities,
and Cross-Modal Code Matching (Liu et al., ACL 2022; SEEDS §9).

Shape legend: B batch (instances), T fine-grained units (frames, words, pixels), D width,
V codebook size.

- ``vector_quantize``: nearest codeword ``q = e_{argmin_v ||h - e_v||^2}``, output
  ``h + stop_gradient(q - h)`` (forward = q, backward = identity), commitment loss
  ``beta * mean_valid mean_d (h - stop_gradient(q))^2``; with an EMA codebook there is no codebook
  loss (the optional ``codebook_loss`` is for gradient-trained codebooks).
- ``ema_codebook_update``: VQ-VAE EMA (van den Oord et al. 2017, App. A.1; Sonnet's
  ``VectorQuantizerEMA``) with Laplace-smoothed counts, the statistics summed over every modality
  that shares the codebook before the moving average.
- ``code_distribution`` / ``cmcm_loss``: ``Pbar = mean_t softmax(-||h_t - e_m|| / temperature)``
  per instance, ``S[i, j] = sum_m Pbar^A[i, m] log Pbar^B[j, m] + Pbar^B[j, m] log Pbar^A[i, m]``
  and InfoNCE on ``S`` with the matched pairs on the diagonal, in both directions (A->B over
  rows, B->A over columns), summed. The unit distance is the L2 norm (not squared) as in
  SEEDS §9; the direction-sum and ``temperature=1`` were not checked against the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxspeech.ops.codebook import nearest_codeword, squared_distances

_HIGHEST = jax.lax.Precision.HIGHEST


class VQOutput(NamedTuple):
  quantized: jax.Array  # [B, T, D] straight-through output (forward: codewords)
  codes: jax.Array  # [B, T] int32
  commitment_loss: jax.Array  # [] beta * mean over valid frames and D of (h - sg(q))^2
  codebook_loss: jax.Array  # [] mean over valid frames and D of (sg(h) - q)^2


def _masked_mse(a, b, mask):
  m = mask.astype(jnp.float32)
  per_frame = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), -1)  # [B, T]
  return jnp.sum(per_frame * m) / jnp.maximum(jnp.sum(m), 1.0)


def vector_quantize(
  h: jax.Array, codebook: jax.Array, mask: jax.Array, commitment_cost: float = 0.25
) -> VQOutput:
  """Quantise ``h [B, T, D]`` against ``codebook [V, D]`` at valid frames ``mask [B, T]``.

  Padded frames pass through unchanged and do not enter the losses.
  """
  codes, _ = nearest_codeword(jax.lax.stop_gradient(h), jax.lax.stop_gradient(codebook))
  q = jnp.take(codebook, codes, axis=0).astype(h.dtype)  # [B, T, D]
  st = h + jax.lax.stop_gradient(q - h)
  st = jnp.where(mask[..., None], st, h)
  commit = commitment_cost * _masked_mse(h, jax.lax.stop_gradient(q), mask)
  cb = _masked_mse(jax.lax.stop_gradient(h), q, mask)
  return VQOutput(st, codes, commit, cb)


class EMACodebookState(NamedTuple):
  codebook: jax.Array  # [V, D] float32 current codewords
  cluster_size: jax.Array  # [V] float32 EMA of assignment counts
  embed_sum: jax.Array  # [V, D] float32 EMA of assigned feature sums


def ema_codebook_init(codebook: jax.Array) -> EMACodebookState:
  """EMA state whose first update starts from ``codebook [V, D]`` (sums = codewords, counts 1)."""
  codebook = codebook.astype(jnp.float32)
  return EMACodebookState(codebook, jnp.ones(codebook.shape[:1], jnp.float32), codebook)


def ema_codebook_update(
  state: EMACodebookState,
  features: Sequence[jax.Array],
  codes: Sequence[jax.Array],
  masks: Sequence[jax.Array],
  decay: float = 0.99,
  eps: float = 1e-5,
) -> EMACodebookState:
  """One EMA update pooled over modalities.

  Args:
    features: per modality ``[B_m, T_m, D]`` (any leading shape) encoder outputs.
    codes: per modality ``[B_m, T_m]`` assigned codeword ids.
    masks: per modality ``[B_m, T_m]`` bool valid units.
  """
  v = state.cluster_size.shape[0]
  counts = jnp.zeros((v,), jnp.float32)
  sums = jnp.zeros_like(state.embed_sum)
  for h, c, m in zip(features, codes, masks, strict=True):
    onehot = jax.nn.one_hot(c, v, dtype=jnp.float32) * m[..., None]  # [..., V]
    counts = counts + jnp.sum(onehot, axis=tuple(range(onehot.ndim - 1)))
    sums = sums + jnp.einsum("...v,...d->vd", onehot, h.astype(jnp.float32), precision=_HIGHEST)
  cluster_size = decay * state.cluster_size + (1.0 - decay) * counts  # [V]
  embed_sum = decay * state.embed_sum + (1.0 - decay) * sums  # [V, D]
  n = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (n + v * eps) * n  # Laplace smoothing: no division by 0
  return EMACodebookState(embed_sum / smoothed[:, None], cluster_size, embed_sum)


def code_distribution(
  h: jax.Array, codebook: jax.Array, mask: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """``Pbar [B, V]``: mean over valid units of ``softmax_m(-||h_t - e_m|| / temperature)``."""
  dist = jnp.sqrt(squared_distances(h, codebook) + 1e-12)  # [B, T, V]
  p = jax.nn.softmax(-dist / temperature, axis=-1)  # [B, T, V]
  m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  return jnp.sum(p * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)  # [B, V]


def cmcm_similarity(p_a: jax.Array, p_b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``S [B, B]``: ``S[i, j] = sum_m P^A[i, m] log P^B[j, m] + P^B[j, m] log P^A[i, m]``."""
  log_a = jnp.log(p_a + eps)
  log_b = jnp.log(p_b + eps)
  return (jnp.einsum("im,jm->ij", p_a, log_b, precision=_HIGHEST)
          + jnp.einsum("jm,im->ij", p_b, log_a, precision=_HIGHEST))  # [B, B]


def cmcm_loss(p_a: jax.Array, p_b: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """InfoNCE on ``cmcm_similarity``; pairs ``(i, i)`` match. ``valid [B]`` drops padded rows
  (they are neither anchors nor negatives)."""
  s = cmcm_similarity(p_a, p_b)  # [B, B]
  b = s.shape[0]
  if valid is None:
    valid = jnp.ones((b,), bool)
  pair_ok = valid[:, None] & valid[None, :]
  s = jnp.where(pair_ok, s, -jnp.inf)
  diag = jnp.diagonal(s)
  row = diag - jax.nn.logsumexp(s, axis=1)  # A_i against all B_j
  col = diag - jax.nn.logsumexp(s, axis=0)  # B_j against all A_i
  w = valid.astype(jnp.float32)
  row = jnp.where(valid, row, 0.0)
  col = jnp.where(valid, col, 0.0)
  return -jnp.sum(row + col) / jnp.maximum(jnp.sum(w), 1.0)
