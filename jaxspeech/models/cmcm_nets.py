"""Two-tower encoders for cross-modal discrete representation learning (Liu et al., ACL 2022;
SEEDS §9): per modality, fine-grained units and a summary embedding.

  ModalityEncoder  [B, T, C] input frames -> `av_nets.Stage` (LayerNorm -> Linear -> + learned
                   positions -> `depth` pre-LN transformer blocks; UAVM's modality-specific
                   stage) -> hidden states h [B, T, D], and from them
                     units    LayerNorm -> Linear (D -> code_dim) -> standardised per unit (zero
                              mean, unit variance over its code_dim features, no affine): the
                              fine-grained features that are vector-quantised against the shared
                              codebook. Standardising fixes their scale (norm sqrt(code_dim)), so
                              the codebook's initial N(0, 1) codewords and the code-distribution
                              temperature mean the same thing in both modalities and all along
                              training.
                     summary  masked mean of h over the valid frames -> LayerNorm -> Linear
                              (D -> embed_dim) -> L2-normalised: the high-level embedding of the
                              contrastive retrieval loss.
  CrossModalEncoder  one ModalityEncoder per modality (no weight is shared between them: the
                     shared space is the codebook of `jaxspeech.methods.cmcm`).
                     'audio': frames (e.g. 39-d MFCC at 100 Hz) stacked `audio_stack` at a time
                     (`av_nets.stack_frames`) before the stage. 'visual': the "visual clip" UAVM
                     uses for the 8 x 8 digit scans, the image's 8 rows read top to bottom as 8
                     frames of 8 features (`jaxspeech.methods.uavm.Uavm.host_fields`), or any
                     [T, C] visual features (e.g. a CNN's grid of 7 x 7 = 49 "pixels").

Legend: B batch, T frames (Ta audio after stacking, Tv visual), C input features, D width,
Q code_dim (the units' width = the codebook's), E embed_dim (the summary's width).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED
from jaxspeech.layers.transformer import layer_norm
from jaxspeech.models.av_nets import EPS, MODALITIES, Stage, masked_mean, stack_frames


@dataclasses.dataclass(frozen=True)
class CMCMConfig:
  """Sizes of a `CrossModalEncoder`."""

  audio_dim: int  # C of an audio frame (e.g. 39 MFCC + deltas)
  visual_dim: int  # C of a visual frame (e.g. 8 pixels of an image row)
  audio_frames: int  # Ta before stacking (static, padded)
  visual_frames: int  # Tv (static, padded)
  dim: int = 64  # D
  num_heads: int = 4
  depth: int = 2  # transformer blocks per modality
  mlp_ratio: int = 4
  code_dim: int = 32  # Q: width of the units and of the shared codebook's codewords
  embed_dim: int = 64  # E: width of the summary embedding
  audio_stack: int = 1  # audio frames stacked into one (downsampling by this factor)
  dropout: float = 0.0

  def __post_init__(self):
    if self.audio_frames % self.audio_stack:
      raise ValueError(f'audio_frames={self.audio_frames} is not a multiple of audio_stack='
                       f'{self.audio_stack}')
    if self.dim % self.num_heads:
      raise ValueError(f'dim={self.dim} is not divisible by num_heads={self.num_heads}')
    if self.code_dim < 2:
      raise ValueError(f'code_dim={self.code_dim}: the units are standardised, need >= 2')

  @property
  def audio_tokens(self) -> int:
    return self.audio_frames // self.audio_stack


class Encoded(NamedTuple):
  units: jax.Array  # [B, T, Q] standardised fine-grained units
  mask: jax.Array  # [B, T] bool, True = a real frame
  summary: jax.Array  # [B, E] L2-normalised
  hidden: jax.Array  # [B, T, D] the stage's last hidden state


def standardize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Zero mean, unit variance over the last axis (a LayerNorm without scale or offset)."""
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ModalityEncoder(nnx.Module):
  """Stage -> (units `[B, T, Q]`, summary `[B, E]`); see the module docstring."""

  def __init__(self, input_dim: int, seq_len: int, config: CMCMConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=None, param_dtype=jnp.float32, rngs=rngs)
    self.stage = Stage(input_dim, c.dim, seq_len, c.depth, c.num_heads, c.mlp_ratio, c.dropout,
                       rngs=rngs)
    self.unit_norm = layer_norm(c.dim, EPS, **kw)
    self.unit_proj = dense(c.dim, c.code_dim, (EMBED, None), **kw)
    self.summary_norm = layer_norm(c.dim, EPS, **kw)
    self.summary_proj = dense(c.dim, c.embed_dim, (EMBED, None), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> Encoded:
    h = self.stage(x, mask, deterministic=deterministic, rng=rng)[-1]  # [B, T, D]
    units = standardize(self.unit_proj(self.unit_norm(h)).astype(jnp.float32))  # [B, T, Q]
    pooled = masked_mean(h, mask)  # [B, D]
    summary = l2_normalize(self.summary_proj(self.summary_norm(pooled)).astype(jnp.float32))
    return Encoded(units, mask, summary, h)  # summary [B, E]


class CrossModalEncoder(nnx.Module):
  """An audio and a visual `ModalityEncoder` (nothing shared between them)."""

  def __init__(self, config: CMCMConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.audio = ModalityEncoder(c.audio_dim * c.audio_stack, c.audio_tokens, c, rngs=rngs)
    self.visual = ModalityEncoder(c.visual_dim, c.visual_frames, c, rngs=rngs)

  def encode(self, x: jax.Array, mask: jax.Array, modality: str, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> Encoded:
    """One modality's units, unit mask and summary. Audio frames are stacked first, so its
    unit mask is `[B, Ta / audio_stack]`."""
    if modality == 'audio':
      x, mask = stack_frames(x, mask, self.config.audio_stack)
      return self.audio(x, mask, deterministic=deterministic, rng=rng)
    if modality == 'visual':
      return self.visual(x, mask, deterministic=deterministic, rng=rng)
    raise ValueError(f'modality {modality!r}: one of {MODALITIES}')
