"""The wav2vec 2.0 convolutional waveform encoder (shared by wav2vec2 / HuBERT / WavLM).

Seven 1-D convolutions (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: 320x down-sampling to 50 Hz)
with GELU, normalised either by a GroupNorm with one group per channel on the first layer only
('group', the base models) or a LayerNorm over channels after every layer ('layer', the large
models).

Padding: convolutions without padding mean that every valid output frame only reads valid input
samples, so padding cannot leak through the convolutions. The one place it could is the first
layer's GroupNorm, whose statistics run over time: here they are computed over valid frames only
(HF transformers includes the padding, which is why its docs advise against batching those models
with an attention mask). Batched utterances therefore give the same features as one at a time.

Legend: B batch, S samples, T frames, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.partitioning import CONV_IN, CONV_OUT, KERNEL, NORM, logical, norm_metadata


def conv_output_lengths(lengths, kernels: Sequence[int], strides: Sequence[int]):
  """Valid length after each conv layer: floor((L - k) / s) + 1, >= 0. Ints or arrays."""
  out = []
  for k, s in zip(kernels, strides):
    lengths = (lengths - k) // s + 1
    lengths = jnp.maximum(lengths, 0) if not isinstance(lengths, int) else max(lengths, 0)
    out.append(lengths)
  return out


def lengths_to_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B] int -> [B, max_len] bool, True for positions < length."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]


class ConvLayer(nnx.Module):
  """Conv1d -> (norm) -> GELU, channels last. [B, S, C_in] -> [B, T, C_out]."""

  def __init__(
    self,
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int,
    *,
    bias: bool,
    norm: str | None,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      c_in,
      c_out,
      kernel_size=(kernel,),
      strides=(stride,),
      padding="VALID",
      use_bias=bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=logical(nnx.initializers.he_normal(), KERNEL, CONV_IN, CONV_OUT),
      bias_init=logical(nnx.initializers.zeros_init(), CONV_OUT),
      rngs=rngs,
    )
    self.norm_kind = norm
    if norm == "group":  # one group per channel = instance norm over time
      self.norm = nnx.GroupNorm(
        c_out,
        num_groups=c_out,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=norm_metadata(NORM),
        bias_metadata=norm_metadata(NORM),
        rngs=rngs,
      )
    elif norm == "layer":
      self.norm = nnx.LayerNorm(
        c_out,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=norm_metadata(NORM),
        bias_metadata=norm_metadata(NORM),
        rngs=rngs,
      )
    else:
      self.norm = None

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.conv(x)  # [B, T, C]
    if self.norm_kind == "group":
      # Statistics over valid frames only (mask [B, T]); see module docstring.
      m = None if mask is None else jnp.broadcast_to(mask[:, :, None], x.shape)
      x = self.norm(x, mask=m)
    elif self.norm_kind == "layer":
      x = self.norm(x)
    return jax.nn.gelu(x, approximate=False)


class ConvFeatureExtractor(nnx.Module):
  """Waveform -> frames. [B, S] (+ sample mask [B, S]) -> features [B, T, C], frame mask [B, T]."""

  def __init__(
    self,
    conv_dim: Sequence[int],
    conv_kernel: Sequence[int],
    conv_stride: Sequence[int],
    *,
    conv_bias: bool,
    norm: str,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if norm not in ("group", "layer"):
      raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {norm!r}")
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
      raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length")
    self.kernels = tuple(conv_kernel)
    self.strides = tuple(conv_stride)
    layers = []
    c_in = 1
    for i, (c, k, s) in enumerate(zip(conv_dim, conv_kernel, conv_stride)):
      layer_norm = "layer" if norm == "layer" else ("group" if i == 0 else None)
      layers.append(
        ConvLayer(
          c_in,
          c,
          k,
          s,
          bias=conv_bias,
          norm=layer_norm,
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=rngs,
        )
      )
      c_in = c
    self.conv_layers = nnx.List(layers)

  def num_frames(self, num_samples: int) -> int:
    return conv_output_lengths(num_samples, self.kernels, self.strides)[-1]

  def __call__(self, wav: jax.Array, lengths: jax.Array | None = None):
    """wav [B, S]; lengths [B] valid samples (None = all). Returns ([B, T, C], [B, T] bool)."""
    x = wav[:, :, None]  # [B, S, 1]
    layer_lengths = (
      None if lengths is None else conv_output_lengths(lengths, self.kernels, self.strides)
    )
    mask = None
    for i, layer in enumerate(self.conv_layers):
      mask = None if lengths is None else lengths_to_mask(layer_lengths[i], self._out_len(x, i))
      x = layer(x, mask)  # [B, T_i, C_i]
    if mask is None:
      mask = jnp.ones(x.shape[:2], dtype=bool)
    return x, mask

  def _out_len(self, x: jax.Array, i: int) -> int:
    return (x.shape[1] - self.kernels[i]) // self.strides[i] + 1
