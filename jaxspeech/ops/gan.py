"""wav2vec-U 2.0's GAN terms as array functions (fairseq `models/wav2vec_u.py`).

Legend: B batch, T positions (segments or text phones), V phones.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def code_perplexity(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(code perplexity, prob perplexity) over the valid positions of logits [B, T, V], mask
  [B, T]: exp entropy of the mean one-hot argmax and of the mean softmax. The generator's
  diversity penalty is (V - prob_ppl) / V (fairseq adds 1e-7 inside the log; so here)."""
  v = logits.shape[-1]
  w = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  n = jnp.maximum(jnp.sum(w), 1.0)
  hard = jax.nn.one_hot(jnp.argmax(logits, -1), v) * w
  hard_p = jnp.sum(hard, axis=(0, 1)) / n  # [V]
  soft_p = jnp.sum(jax.nn.softmax(logits.astype(jnp.float32), -1) * w, axis=(0, 1)) / n
  ent = lambda p: -jnp.sum(p * jnp.log(p + 1e-7))  # noqa: E731
  return jnp.exp(ent(jax.lax.stop_gradient(hard_p))), jnp.exp(ent(soft_p))


def smoothness_penalty(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared difference of consecutive segment logits [B, T, V]: (s_{t+1} - s_t)^2,
  zero where position t+1 is padding, averaged over all B * (T-1) * V entries (fairseq
  `F.mse_loss(..., reduction='none')`, masked, `.mean()`)."""
  d = jnp.square(logits[:, 1:] - logits[:, :-1])  # [B, T-1, V]
  return jnp.mean(jnp.where(mask[:, 1:, None], d, 0.0))


def gradient_penalty(disc: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array,
                     rng: jax.Array) -> jax.Array:
  """WGAN-GP style penalty, summed over the batch (fairseq `calc_gradient_penalty`).

  real [B, L, V], fake [B, T, V] are cropped to the common batch and length; x = a real + (1-a)
  fake with a ~ U(0, 1) per utterance; penalty = sum_b sum_v (||d D(x)_b / d x_b[:, v]||_2 - 1)^2,
  the norm taken over the TIME axis (torch `gradients.norm(2, dim=1)` on [B, T, V]).
  `disc` maps [B, T, V] -> [B] scores (no padding mask, as fairseq)."""
  b, t = min(real.shape[0], fake.shape[0]), min(real.shape[1], fake.shape[1])
  real, fake = real[:b, :t], fake[:b, :t]
  alpha = jax.random.uniform(rng, (b, 1, 1), dtype=real.dtype)
  x = alpha * real + (1 - alpha) * fake
  g = jax.grad(lambda z: jnp.sum(disc(z)))(x)  # [B, T, V]
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=1))  # [B, V]
  return jnp.sum(jnp.square(norm - 1.0))


def masked_batch_norm(x: jax.Array, mask: jax.Array, scale: jax.Array, bias: jax.Array,
                      mean: jax.Array, var: jax.Array, *, train: bool, momentum: float = 0.1,
                      eps: float = 1e-5) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """torch BatchNorm1d over the valid frames of x [B, T, D] (mask [B, T]); padded frames are
  returned unchanged (fairseq `bn_padded_data`). Training normalises by the batch's biased
  variance and moves the running statistics by `momentum` towards (mean, unbiased variance);
  evaluation uses the running statistics [D]. Returns (y [B, T, D], (new mean, new var))."""
  w = mask.astype(jnp.float32)[..., None]
  if train:
    n = jnp.maximum(jnp.sum(w), 1.0)
    mu = jnp.sum(x * w, axis=(0, 1)) / n
    v = jnp.sum(jnp.square(x - mu) * w, axis=(0, 1)) / n
    unbiased = v * n / jnp.maximum(n - 1.0, 1.0)
    new = ((1 - momentum) * mean + momentum * jax.lax.stop_gradient(mu),
           (1 - momentum) * var + momentum * jax.lax.stop_gradient(unbiased))
  else:
    mu, v, new = mean, var, (mean, var)
  y = (x - mu) * jax.lax.rsqrt(v + eps) * scale + bias
  return jnp.where(mask[..., None], y, x), new
