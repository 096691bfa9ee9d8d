"""Log-domain Sinkhorn-Knopp equipartition targets (SwAV; Spin, SEEDS §1).

Shape legend: B batch, T frames, K codebook size, N number of valid frames (``mask.sum()``).

The reference (vectominist/spin ``src/nn/swav_vq_dis.py``, after SwAV's ``distributed_sinkhorn``)
works on the flat ``[N, K]`` logits of the valid frames::

  Q = exp(logits / eps).T                  # [K, N]
  Q /= sum(Q)
  repeat iters: Q /= rowsum(Q) * K         # every codeword gets total mass 1/K
                Q /= colsum(Q) * N         # every frame gets total mass 1/N
  T = (N * Q).T                            # [N, K], rows sum to 1

Here the same recursion runs on ``log Q`` (so ``exp(logits / eps)`` never overflows: at eps=0.02 a
logit of 2 is already exp(100)), in float32 whatever the input dtype, on padded ``[B, T, K]``
arrays with a ``[B, T]`` validity mask. Padded frames get log-mass -inf: they have zero weight, do
not enter the codeword marginals and come out as all-zero target rows.

Every reduction is a plain ``jnp`` reduction over the whole batch, so when ``logits`` is a global
``jax.Array`` sharded over the batch axis under ``jax.jit`` the marginals are global sums (XLA
inserts the all-reduces) and the result equals the single-device one; no ``psum`` is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _logsumexp(x: jax.Array, axis) -> jax.Array:
  """logsumexp that returns -inf (not nan) when every entry is -inf."""
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
  return jnp.log(s) + m


def sinkhorn_log(
  logits: jax.Array,
  mask: jax.Array | None = None,
  epsilon: float = 0.02,
  num_iters: int = 3,
) -> jax.Array:
  """Sinkhorn-Knopp soft assignments, returned as log-targets.

  Args:
    logits: ``[B, T, K]`` (or ``[N, K]``) scores, any float dtype (cast to float32).
    mask: ``[B, T]`` (or ``[N]``) bool, True = valid frame. None = all valid.
    epsilon: entropic regularisation (Spin: 0.02).
    num_iters: number of (row, column) normalisation rounds (Spin: 3).

  Returns:
    ``[B, T, K]`` float32 ``log T``; valid rows are log-probabilities (``exp`` sums to 1 over K),
    padded rows are -inf.
  """
  logits = lax.stop_gradient(logits).astype(jnp.float32)
  k = logits.shape[-1]
  if mask is None:
    mask = jnp.ones(logits.shape[:-1], dtype=bool)
  valid = mask[..., None]  # [B, T, 1]
  frame_axes = tuple(range(logits.ndim - 1))
  n = jnp.sum(mask.astype(jnp.float32))  # N, global under sharding
  log_n = jnp.log(jnp.maximum(n, 1.0))
  log_k = jnp.log(float(k))

  log_q = jnp.where(valid, logits / epsilon, -jnp.inf)  # [B, T, K]
  # Q /= sum(Q): a global shift, kept so intermediate values match the reference.
  log_q = log_q - _logsumexp(log_q, axis=(*frame_axes, -1))

  def body(_, log_q):
    # Codeword marginals (the reference's rows): sum over valid frames only.
    log_q = log_q - (_logsumexp(log_q, axis=frame_axes) + log_k)  # [B, T, K] - [1, 1, K]
    # Frame marginals (the reference's columns); padded rows stay -inf (not nan).
    row = _logsumexp(log_q, axis=-1)  # [B, T, 1]
    log_q = log_q - jnp.where(valid, row + log_n, 0.0)
    return log_q

  log_q = lax.fori_loop(0, num_iters, body, log_q)
  return jnp.where(valid, log_q + log_n, -jnp.inf)  # T = N * Q


def sinkhorn(
  logits: jax.Array,
  mask: jax.Array | None = None,
  epsilon: float = 0.02,
  num_iters: int = 3,
) -> jax.Array:
  """Sinkhorn-Knopp targets ``T`` (no gradient), float32 ``[B, T, K]``.

  Valid rows sum to 1; padded rows are 0; codeword column sums over valid frames are ~N/K (exactly
  N/K before the last frame normalisation). See :func:`sinkhorn_log` for the arguments.
  """
  return jnp.exp(sinkhorn_log(logits, mask, epsilon, num_iters))
