"""wav2vec-U 2.0's generator and discriminator (fairseq `models/wav2vec_u.py`), Flax NNX.

Generator  x [B, T, D] -> masked BatchNorm (weight initialised to `batch_norm`) -> x + in_proj(
           dropout(x)) (residual) -> dropout -> Conv1d(D -> V, kernel, stride, pad kernel // 2,
           no bias) -> logits [B, T', V]; the padding mask is subsampled by `stride` (fitted to
           T'); the aux (MMI) head is a Linear on in_proj's output, [B, T, A].
Discriminator  p [B, T, V] -> Conv1d(V -> H, k) -> dropout -> (depth - 1) x [Conv1d(H -> H, k),
           dropout, GELU] -> Conv1d(H -> 1, k) -> mean over the valid positions -> [B].
           Causal convs see only the past (left padding k - 1, fairseq's pad + SamePad).

Parameters use torch's default initialisation (uniform +-1/sqrt(fan_in), weights and biases),
as the reference trains from it. Dropout is functional (an explicit rng), so the modules hold
parameters only. Legend: B batch, T frames, T' = ceil(T / stride), D input width, V phones,
H discriminator width, A aux clusters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.ops import gan

_torch_weight = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _torch_bias(fan_in: int):
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv(i, o, k, *, stride=1, padding, bias=True, rngs):
  return nnx.Conv(i, o, (k,), strides=(stride,), padding=padding, use_bias=bias,
                  kernel_init=_torch_weight, bias_init=_torch_bias(i * k), rngs=rngs)


def _linear(i, o, *, rngs):
  return nnx.Linear(i, o, kernel_init=_torch_weight, bias_init=_torch_bias(i), rngs=rngs)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or `rate` is 0."""
  if rng is None or rate <= 0:
    return x
  keep = jax.random.bernoulli(rng, 1 - rate, x.shape)
  return jnp.where(keep, x / (1 - rate), 0.0).astype(x.dtype)


class Generator(nnx.Module):

  def __init__(self, input_dim: int, output_dim: int, *, kernel: int = 9, stride: int = 3,
               bias: bool = False, dropout: float = 0.1, batch_norm: float = 30.0,
               residual: bool = True, aux_dim: int = 0, rngs: nnx.Rngs):
    self.stride, self.rate = stride, dropout
    self.bn_scale = nnx.Param(jnp.full((input_dim,), batch_norm, jnp.float32)) if batch_norm \
      else None
    self.bn_bias = nnx.Param(jnp.zeros((input_dim,), jnp.float32)) if batch_norm else None
    self.in_proj = _linear(input_dim, input_dim, rngs=rngs) if residual else None
    self.proj = _conv(input_dim, output_dim, kernel, stride=stride,
                      padding=[(kernel // 2, kernel // 2)], bias=bias, rngs=rngs)
    self.aux = _linear(input_dim, aux_dim, rngs=rngs) if aux_dim and residual else None

  def __call__(self, x: jax.Array, mask: jax.Array, bn_stats: tuple[jax.Array, jax.Array],
               *, train: bool, rng: jax.Array | None = None) -> dict:
    """x [B, T, D], mask [B, T] (True = valid), bn_stats (running mean, var) [D] ->
    {'logits' [B, T', V], 'mask' [B, T'], 'aux_logits' [B, T, A] | None, 'bn_stats'}."""
    r1 = r2 = None
    if train and rng is not None:
      r1, r2 = jax.random.split(rng)
    if self.bn_scale is not None:
      x, bn_stats = gan.masked_batch_norm(x, mask, self.bn_scale[...], self.bn_bias[...],
                                          *bn_stats, train=train)
    aux = None
    if self.in_proj is not None:
      inter = self.in_proj(dropout(x, self.rate, r1))
      x = x + inter
      aux = self.aux(inter) if self.aux is not None else None
    logits = self.proj(dropout(x, self.rate, r2))  # [B, T', V]
    m = mask[:, ::self.stride]
    t = logits.shape[1]
    if m.shape[1] > t:  # fairseq: cut the subsampled mask to T' (or left-pad it)
      m = m[:, :t]
    elif m.shape[1] < t:
      m = jnp.pad(m, ((0, 0), (t - m.shape[1], 0)), constant_values=True)
    return {'logits': logits, 'mask': m, 'aux_logits': aux, 'bn_stats': bn_stats}


class Discriminator(nnx.Module):

  def __init__(self, input_dim: int, *, inner_dim: int = 384, kernel: int = 8, depth: int = 2,
               causal: bool = True, dropout: float = 0.0, rngs: nnx.Rngs):
    pad = [(kernel - 1, 0)] if causal else [(kernel // 2, kernel - 1 - kernel // 2)]
    self.rate = dropout
    self.emb = _conv(input_dim, inner_dim, kernel, padding=pad, rngs=rngs)
    self.inner = nnx.List([_conv(inner_dim, inner_dim, kernel, padding=pad, rngs=rngs)
                           for _ in range(depth - 1)])
    self.out = _conv(inner_dim, 1, kernel, padding=pad, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None,
               rng: jax.Array | None = None) -> jax.Array:
    """x [B, T, V] (phone distributions), mask [B, T] | None -> scores [B]."""
    rngs = list(jax.random.split(rng, len(self.inner) + 1)) if rng is not None else None
    h = dropout(self.emb(x), self.rate, rngs[0] if rngs else None)
    for i, conv in enumerate(self.inner):
      h = jax.nn.gelu(dropout(conv(h), self.rate, rngs[i + 1] if rngs else None),
                      approximate=False)
    y = self.out(h)[..., 0]  # [B, T]
    if mask is None:
      return jnp.mean(y, axis=1)
    w = mask.astype(y.dtype)
    return jnp.sum(y * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
