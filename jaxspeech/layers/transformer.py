"""Transformer pieces of the wav2vec 2.0 family: convolutional positional embeddings (wav2vec 2.0's
weight-normed conv, data2vec's conv stack), feed-forward, post-LN / pre-LN ("stable layer norm")
blocks.

Legend: B batch, T frames, D width, F feed-forward width, K positional conv taps, G conv groups.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.attention import SelfAttention, dense
from jaxspeech.layers.partitioning import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_LENGTH,
    ACT_MLP,
    EMBED,
    MLP,
    NORM,
    constrain,
    norm_metadata,
)

ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "swish": jax.nn.silu,
  "silu": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dropout(x: jax.Array, rate: float, deterministic: bool, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on a key. Identity when deterministic or rate == 0."""
  if deterministic or rate == 0.0:
    return x
  if rng is None:
    raise ValueError("dropout needs an rng when deterministic=False")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def layer_norm(dim: int, eps: float, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim,
    epsilon=eps,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_metadata=norm_metadata(NORM),
    bias_metadata=norm_metadata(NORM),
    rngs=rngs,
  )


class ConvPositionalEmbedding(nnx.Module):
  """Grouped conv over time with weight norm (per tap), 'same' length, GELU. [B,T,D] -> [B,T,D].

  Weight norm is kept as its two parameters (g per tap, direction v) so that HF/fairseq
  checkpoints load exactly and training follows the same parameterisation.
  """

  def __init__(
    self, dim: int, kernel: int, groups: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    if dim % groups:
      raise ValueError(f"hidden size {dim} not divisible by {groups} positional conv groups")
    self.kernel, self.groups, self.dtype = kernel, groups, dtype
    std = 2.0 * math.sqrt(1.0 / (kernel * dim))  # HF/fairseq init
    v = std * jax.random.normal(rngs.params(), (kernel, dim // groups, dim), param_dtype)
    self.weight_v = nnx.Param(v, out_sharding=(None, None, EMBED), eager_sharding=False)
    self.weight_g = nnx.Param(
      jnp.sqrt(jnp.sum(v * v, axis=(1, 2))), out_sharding=(None,), eager_sharding=False
    )  # [K]: the identity re-parameterisation
    self.bias = nnx.Param(
      jnp.zeros((dim,), param_dtype), out_sharding=(EMBED,), eager_sharding=False
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.weight_v[...]
    norm = jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))  # [K, 1, 1]
    w = v * (self.weight_g[...][:, None, None] / norm)  # [K, D/G, D]
    dtype = self.dtype or x.dtype
    conv = grouped_conv_cpu if jax.default_backend() == "cpu" else _grouped_conv
    y = conv(x.astype(dtype), w.astype(dtype), self.groups, self.kernel // 2)  # [B, T(+1), D]
    if self.kernel % 2 == 0:  # 'same' padding of an even kernel leaves one frame too many
      y = y[:, :-1]
    return jax.nn.gelu(y + self.bias[...].astype(dtype), approximate=False)


class DeepConvPositionalEmbedding(nnx.Module):
  """data2vec's positional encoder: `depth` x [grouped conv ('same' length), LayerNorm without
  affine, GELU], no weight norm. [B,T,D] (+ frame mask [B,T]) -> [B,T,D].

  fairseq `wav2vec2.py` `pos_conv_depth > 1` (data2vec, DinoSR `base.yaml`: 5 convs of kernel
  `max(3, conv_pos // depth)` = 95 // 5 = 19, 16 groups) and HF's
  `Data2VecAudioPositionalConvEmbedding`. Unlike both references, padded frames are zeroed again
  before every conv after the first: from the second conv on they would otherwise carry the
  previous layer's bias / LayerNorm / GELU output into the valid frames near the end, and a
  padded batch would no longer give the features of one utterance at a time. Without padding
  this changes nothing.
  """

  def __init__(
    self, dim: int, kernel: int, groups: int, depth: int, *, dtype=None, param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if dim % groups:
      raise ValueError(f"hidden size {dim} not divisible by {groups} positional conv groups")
    self.kernel, self.groups, self.dtype = kernel, groups, dtype
    # PyTorch's Conv1d default (fairseq builds these convs without an explicit init):
    # weight and bias U(+-1/sqrt(fan_in)), fan_in = D/G * K.
    bound = 1.0 / math.sqrt(kernel * dim // groups)

    def uniform(shape):
      return jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)

    self.layers = nnx.List([
      _PosConvLayer(
        nnx.Param(uniform((kernel, dim // groups, dim)), out_sharding=(None, None, EMBED),
                  eager_sharding=False),  # [K, D/G, D]
        nnx.Param(uniform((dim,)), out_sharding=(EMBED,), eager_sharding=False),
      )
      for _ in range(depth)
    ])
    # fairseq / HF: LayerNorm(D, elementwise_affine=False), torch's default eps (not the
    # config's layer_norm_eps).
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, use_bias=False, use_scale=False,
                              use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

  def __call__(self, x: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    dtype = self.dtype or x.dtype
    conv = grouped_conv_cpu if jax.default_backend() == "cpu" else _grouped_conv
    x = x.astype(dtype)
    for i, layer in enumerate(self.layers):
      if i > 0 and frame_mask is not None:
        x = jnp.where(frame_mask[..., None], x, 0.0)  # see the class docstring
      y = conv(x, layer.kernel[...].astype(dtype), self.groups, self.kernel // 2)  # [B, T(+1), D]
      if self.kernel % 2 == 0:  # 'same' padding of an even kernel leaves one frame too many
        y = y[:, :-1]
      x = jax.nn.gelu(self.norm(y + layer.bias[...].astype(dtype)), approximate=False)
    return x


class _PosConvLayer(nnx.Module):
  """The parameters of one conv of `DeepConvPositionalEmbedding`."""

  def __init__(self, kernel: nnx.Param, bias: nnx.Param):
    self.kernel, self.bias = kernel, bias


def _grouped_conv(x: jax.Array, w: jax.Array, groups: int, pad: int) -> jax.Array:
  """Grouped conv over time, zero padding `pad` each side. x [B,T,D], w [K, D/G, D]."""
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1,), padding=[(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=groups)


# XLA:CPU computes the kernel gradient of this wide grouped conv (K=128, 16 groups) ~30x slower
# than the forward (measured 0.91 s of a 2.2 s HuBERT-base train step on 2 x 4 s). On CPU the
# kernel gradient is taken as one matmul over im2col patches instead; values are the same.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv_cpu(x: jax.Array, w: jax.Array, groups: int, pad: int) -> jax.Array:
  return _grouped_conv(x, w, groups, pad)


def _grouped_conv_fwd(x, w, groups, pad):
  return _grouped_conv(x, w, groups, pad), (x, w)


def _grouped_conv_bwd(groups, pad, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda a: _grouped_conv(a, w, groups, pad), x)
  (dx,) = vjp_x(dy)
  b, _, d = x.shape
  k, cg = w.shape[0], d // groups
  t_out = dy.shape[1]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
  idx = jnp.arange(t_out)[:, None] + jnp.arange(k)[None, :]  # [T', K]
  patches = xp[:, idx].reshape(b, t_out, k, groups, cg)  # [B, T', K, G, D/G]
  dw = jnp.einsum("btkgc,btgj->kcgj", patches, dy.reshape(b, t_out, groups, cg))
  return dx, dw.reshape(k, cg, d).astype(w.dtype)


grouped_conv_cpu.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


class FeedForward(nnx.Module):
  def __init__(
    self,
    dim: int,
    hidden: int,
    act: str,
    *,
    activation_dropout: float,
    hidden_dropout: float,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.intermediate_dense = dense(dim, hidden, (EMBED, MLP), **kw)
    self.output_dense = dense(hidden, dim, (MLP, EMBED), **kw)
    self.act = act
    self.activation_dropout, self.hidden_dropout = activation_dropout, hidden_dropout

  def __call__(self, x, *, deterministic=True, rng=None):
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    h = activation(self.act)(self.intermediate_dense(x))  # [B, T, F]
    h = constrain(h, ACT_BATCH, ACT_LENGTH, ACT_MLP)
    h = dropout(h, self.activation_dropout, deterministic, r1)
    return dropout(self.output_dense(h), self.hidden_dropout, deterministic, r2)


class TransformerBlock(nnx.Module):
  """One encoder layer. post-LN (base models): LN(x + attn(x)) then LN(x + ff(x));
  pre-LN ("stable layer norm", large models): x + attn(LN(x)) then x + ff(LN(x))."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    ffn_dim: int,
    *,
    pre_norm: bool,
    act: str,
    eps: float,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    activation_dropout: float = 0.0,
    gated_rel_pos: bool = False,
    has_rel_embed: bool = False,
    num_buckets: int = 320,
    max_distance: int = 800,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_norm = pre_norm
    self.hidden_dropout = hidden_dropout
    self.attention = SelfAttention(
      dim,
      num_heads,
      gated_rel_pos=gated_rel_pos,
      has_rel_embed=has_rel_embed,
      num_buckets=num_buckets,
      max_distance=max_distance,
      dropout=attention_dropout,
      **kw,
    )
    self.layer_norm = layer_norm(dim, eps, **kw)
    self.feed_forward = FeedForward(
      dim, ffn_dim, act, activation_dropout=activation_dropout, hidden_dropout=hidden_dropout, **kw
    )
    self.final_layer_norm = layer_norm(dim, eps, **kw)

  def __call__(self, x, mask, position_bias=None, *, deterministic=True, rng=None,
               return_ffn=False):
    """`[B, T, D] -> [B, T, D]`; with `return_ffn` also the feed-forward output before the
    residual add (and before the final LayerNorm of post-LN blocks): data2vec / DinoSR's
    `layer_result` target."""
    r_att, r_drop, r_ff = (None,) * 3 if rng is None else jax.random.split(rng, 3)
    x = constrain(x, ACT_BATCH, ACT_LENGTH, ACT_EMBED)  # [B, T, D]
    kw = dict(deterministic=deterministic)
    if self.pre_norm:
      h = self.attention(self.layer_norm(x), mask, position_bias, rng=r_att, **kw)
      x = x + dropout(h, self.hidden_dropout, deterministic, r_drop)
      f = self.feed_forward(self.final_layer_norm(x), rng=r_ff, **kw)
      return (x + f, f) if return_ffn else x + f
    h = self.attention(x, mask, position_bias, rng=r_att, **kw)
    x = self.layer_norm(x + dropout(h, self.hidden_dropout, deterministic, r_drop))
    f = self.feed_forward(x, rng=r_ff, **kw)
    out = self.final_layer_norm(x + f)
    return (out, f) if return_ffn else out
