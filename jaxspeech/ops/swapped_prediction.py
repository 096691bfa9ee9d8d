"""Spin's swapped-prediction loss with Sinkhorn targets (SEEDS §1).

Shape legend: B batch, T frames, D head width (256 in Spin), K codebook size, N valid frames.

Reference: vectominist/spin ``src/nn/swav_vq_dis.py`` (``SwavVQDisentangle.forward``):
``z`` is L2-normalised, ``logits = z Cᵀ`` with codebook rows L2-renormalised after every optimiser
step (:func:`normalize_codebook`), targets ``T_i = sinkhorn(logits_i)`` without gradient, and::

  L = -1/2 [mean_n sum_k T1 log softmax(logits2/tau) + mean_n sum_k T2 log softmax(logits1/tau)]

Means run over valid frames only (``mask`` ``[B, T]``), over the whole (global) batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxspeech.ops.sinkhorn import sinkhorn


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis`` (``torch.nn.functional.normalize`` semantics)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def normalize_codebook(codebook: jax.Array) -> jax.Array:
  """L2-renormalise codebook rows ``[K, D] -> [K, D]`` (Spin does this after every step)."""
  return l2_normalize(codebook, axis=-1)


def cosine_logits(
  z: jax.Array, codebook: jax.Array, normalize_codebook_rows: bool = False
) -> jax.Array:
  """Cosine logits ``normalize(z) Cᵀ``: ``z [..., D]``, ``codebook [K, D]`` -> ``[..., K]``.

  Spin keeps the codebook rows unit-norm by renormalising after each update, so by default the
  codebook is used as is (its gradient then matches the reference's ``nn.Linear``). Set
  ``normalize_codebook_rows`` to normalise it inside the graph instead.
  """
  if normalize_codebook_rows:
    codebook = normalize_codebook(codebook)
  return jnp.einsum("...d,kd->...k", l2_normalize(z), codebook)  # [..., K]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``x [B, T]`` over valid frames (0 when there are none)."""
  m = mask.astype(jnp.float32)
  return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def swapped_prediction_loss(
  logits1: jax.Array,
  logits2: jax.Array,
  targets1: jax.Array,
  targets2: jax.Array,
  mask: jax.Array,
  temperature: float = 0.1,
) -> jax.Array:
  """Swapped-prediction cross-entropy, scalar float32.

  Args:
    logits1, logits2: ``[B, T, K]`` cosine logits of the two views.
    targets1, targets2: ``[B, T, K]`` soft targets of the two views (treated as constants).
    mask: ``[B, T]`` bool, True = valid frame.
    temperature: softmax temperature tau (Spin: 0.1).
  """
  t1 = jax.lax.stop_gradient(targets1).astype(jnp.float32)
  t2 = jax.lax.stop_gradient(targets2).astype(jnp.float32)
  logp1 = jax.nn.log_softmax(logits1.astype(jnp.float32) / temperature, axis=-1)  # [B, T, K]
  logp2 = jax.nn.log_softmax(logits2.astype(jnp.float32) / temperature, axis=-1)  # [B, T, K]
  # where(), not product, so padded frames with -inf targets or logits can't produce nan.
  ce12 = -jnp.sum(jnp.where(mask[..., None], t1 * logp2, 0.0), axis=-1)  # [B, T]
  ce21 = -jnp.sum(jnp.where(mask[..., None], t2 * logp1, 0.0), axis=-1)  # [B, T]
  return 0.5 * (masked_mean(ce12, mask) + masked_mean(ce21, mask))


class SpinLossOutput(NamedTuple):
  loss: jax.Array  # [] float32
  targets1: jax.Array  # [B, T, K]
  targets2: jax.Array  # [B, T, K]
  codes1: jax.Array  # [B, T] int32 argmax units of view 1
  codes2: jax.Array  # [B, T] int32
  accuracy: jax.Array  # [] agreement of argmax(logits_i) with argmax(targets_j), valid frames
  code_perplexity: jax.Array  # [] perplexity of the hard-code histogram over both views


def spin_loss(
  z1: jax.Array,
  z2: jax.Array,
  codebook: jax.Array,
  mask: jax.Array,
  epsilon: float = 0.02,
  sinkhorn_iters: int = 3,
  temperature: float = 0.1,
) -> SpinLossOutput:
  """The full Spin objective from head outputs.

  Args:
    z1, z2: ``[B, T, D]`` head outputs of the two (frame-aligned) views; L2-normalised here.
    codebook: ``[K, D]`` prototypes (expected unit rows, see :func:`normalize_codebook`).
    mask: ``[B, T]`` bool, True = valid frame (shared by both views).
  """
  logits1 = cosine_logits(z1, codebook)  # [B, T, K]
  logits2 = cosine_logits(z2, codebook)  # [B, T, K]
  targets1 = sinkhorn(logits1, mask, epsilon, sinkhorn_iters)  # [B, T, K]
  targets2 = sinkhorn(logits2, mask, epsilon, sinkhorn_iters)  # [B, T, K]
  loss = swapped_prediction_loss(logits1, logits2, targets1, targets2, mask, temperature)

  codes1 = jnp.argmax(logits1, axis=-1).astype(jnp.int32)  # [B, T]
  codes2 = jnp.argmax(logits2, axis=-1).astype(jnp.int32)  # [B, T]
  acc = 0.5 * (
    masked_mean(codes1 == jnp.argmax(targets2, -1), mask)
    + masked_mean(codes2 == jnp.argmax(targets1, -1), mask)
  )
  k = codebook.shape[0]
  m = mask.astype(jnp.float32)
  hist = (
    jnp.sum(jax.nn.one_hot(codes1, k) * m[..., None], axis=(0, 1))
    + jnp.sum(jax.nn.one_hot(codes2, k) * m[..., None], axis=(0, 1))
  )  # [K]
  p = hist / jnp.maximum(jnp.sum(hist), 1.0)
  ppl = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
  return SpinLossOutput(loss, targets1, targets2, codes1, codes2, jax.lax.stop_gradient(acc),
                        jax.lax.stop_gradient(ppl))
