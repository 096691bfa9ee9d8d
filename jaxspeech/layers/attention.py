"""Multi-head self-attention with key padding masks and WavLM's gated relative position bias.

Legend: B batch, T frames, D width, N heads, H head dim (D = N * H), K relative-position buckets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.layers.partitioning import (
    ACT_BATCH,
    ACT_HEADS,
    ACT_LENGTH,
    EMBED,
    HEADS,
    constrain,
    logical,
)

DENSE_INIT = nnx.initializers.normal(0.02)  # HF initializer_range


def dense(d_in: int, d_out: int, names: tuple, *, dtype, param_dtype, rngs, use_bias=True):
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=logical(DENSE_INIT, *names),
    bias_init=logical(nnx.initializers.zeros_init(), names[-1]),
    rngs=rngs,
  )


def relative_position_buckets(t: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """WavLM/T5 bidirectional log buckets of (key - query) offsets. Returns int32 [T, T].

  Computed in float32 in the order transformers uses, so bucket edges agree exactly.
  """
  pos = np.arange(t, dtype=np.int64)
  rel = pos[None, :] - pos[:, None]  # [Tq, Tk] memory - context
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = np.log(rel.astype(np.float32) / np.float32(max_exact))
  large = large / np.float32(math.log(max_distance / max_exact))
  large = large * np.float32(half - max_exact)
  large = np.where(is_small, 0, (max_exact + large)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class SelfAttention(nnx.Module):
  """[B, T, D] -> [B, T, D]; optional gated relative position bias (WavLM).

  `position_bias` [N, T, T] is the ungated bias shared by all layers (computed by the first
  layer's `rel_attn_embed`); each layer gates it with its own `gru_rel_pos_*` parameters.
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    gated_rel_pos: bool = False,
    has_rel_embed: bool = False,
    num_buckets: int = 320,
    max_distance: int = 800,
    dropout: float = 0.0,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} not divisible by {num_heads} heads")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.dropout = dropout
    self.q_proj = dense(dim, dim, (EMBED, HEADS), **kw)
    self.k_proj = dense(dim, dim, (EMBED, HEADS), **kw)
    self.v_proj = dense(dim, dim, (EMBED, HEADS), **kw)
    self.out_proj = dense(dim, dim, (HEADS, EMBED), **kw)
    self.gated_rel_pos = gated_rel_pos
    self.num_buckets, self.max_distance = num_buckets, max_distance
    if gated_rel_pos:
      self.gru_rel_pos_const = nnx.Param(jnp.ones((num_heads,), param_dtype))
      self.gru_rel_pos_linear = dense(self.head_dim, 8, (None, None), **kw)
    self.rel_attn_embed = (
      nnx.Embed(
        num_buckets,
        num_heads,
        embedding_init=DENSE_INIT,
        param_dtype=param_dtype,
        dtype=dtype,
        rngs=rngs,
      )
      if has_rel_embed
      else None
    )

  def compute_position_bias(self, t: int) -> jax.Array:
    """Ungated relative position bias [N, T, T] from this layer's bucket embedding."""
    buckets = jnp.asarray(relative_position_buckets(t, self.num_buckets, self.max_distance))
    return jnp.transpose(self.rel_attn_embed(buckets), (2, 0, 1))  # [T,T,N] -> [N,T,T]

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    position_bias: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, T, D]; mask [B, T] bool valid keys; position_bias [N, T, T] or None."""
    b, t, d = x.shape
    n, h = self.num_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, n, h)  # [B, T, N, H]
    k = self.k_proj(x).reshape(b, t, n, h)
    v = self.v_proj(x).reshape(b, t, n, h)
    q, k, v = (constrain(a, ACT_BATCH, ACT_LENGTH, ACT_HEADS, None) for a in (q, k, v))
    bias = None
    if self.gated_rel_pos:
      if position_bias is None:
        raise ValueError("WavLM attention needs the position bias of the first layer")
      # Gate from the (input) hidden states of each head: [B,T,N,H] -> [B,T,N,8] -> [B,T,N,2].
      g = self.gru_rel_pos_linear(x.reshape(b, t, n, h))
      g = jax.nn.sigmoid(g.reshape(b, t, n, 2, 4).sum(-1))
      gate_a, gate_b = g[..., 0], g[..., 1]  # [B, T, N]
      gate = gate_a * (gate_b * self.gru_rel_pos_const[...] - 1.0) + 2.0
      bias = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias[None]  # [B, N, T, T]
      bias = bias.astype(q.dtype)
    key_mask = mask[:, None, None, :]  # [B, 1, 1, T]
    use_dropout = self.dropout > 0.0 and not deterministic
    if not use_dropout:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=key_mask)  # [B, T, N, H]
    else:
      if rng is None:
        raise ValueError("attention dropout needs an rng when deterministic=False")
      logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(h)  # [B, N, T, T]
      if bias is not None:
        logits = logits + bias
      logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, probs.shape)
      probs = jnp.where(keep, probs / (1.0 - self.dropout), 0.0)
      out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    return self.out_proj(out.reshape(b, t, d))
