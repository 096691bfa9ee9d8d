"""A FastSpeech-2-style non-autoregressive acoustic model (Ren et al., 2021), flax NNX.

    phones [B, P] -> embedding + speaker embedding + sinusoidal positions -> encoder (FFT blocks)
      -> duration predictor (log(1 + frames) per phone)
      -> length regulator (each phone state repeated `duration` times; static T frames)
      -> + positions -> decoder (FFT blocks) -> Linear -> log-mel [B, T, M] (`jaxspeech.ops.mel`)

An FFT block is FastSpeech's: multi-head self-attention and a two-layer 1-D convolution
feed-forward (kernel 9), each with dropout, a residual and a post-LayerNorm; padding is masked in
the attention and zeroed after every block. The variance adaptor keeps the duration predictor
only (two conv + ReLU + LayerNorm + dropout layers and a linear head): FastSpeech 2's pitch and
energy predictors are not built -- the corpus's F0 follows espeak's rules from the phone
context, which the decoder sees. Training uses the true durations (teacher forcing); inference
the predicted ones, rounded, scaled by `duration_scale`.

Legend: B batch, P phones (padded), T mel frames (static), D model width, M mel bins,
S speakers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TtsConfig:
  num_phones: int  # inventory size; id 0 is padding, phones are 1..num_phones
  num_speakers: int
  dim: int = 256
  heads: int = 2
  ffn_dim: int = 1024
  ffn_kernel: int = 9
  encoder_layers: int = 4
  decoder_layers: int = 4
  predictor_dim: int = 256
  predictor_kernel: int = 3
  dropout: float = 0.2
  n_mels: int = 80


def sinusoids(length: int, dim: int) -> np.ndarray:
  """Transformer sinusoidal positions `[length, dim]` (sin on even, cos on odd channels)."""
  pos = np.arange(length)[:, None]
  i = np.arange(dim // 2)[None, :]
  angle = pos / np.power(10_000.0, 2 * i / dim)
  out = np.zeros((length, dim), np.float32)
  out[:, 0::2], out[:, 1::2] = np.sin(angle), np.cos(angle)
  return out


class FFTBlock(nnx.Module):
  """Self-attention + conv feed-forward, post-LN (FastSpeech). `[B, L, D] -> [B, L, D]`."""

  def __init__(self, cfg: TtsConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.attention = nnx.MultiHeadAttention(cfg.heads, d, qkv_features=d, out_features=d,
                                            decode=False, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
    self.conv1 = nnx.Conv(d, cfg.ffn_dim, (cfg.ffn_kernel,), padding='SAME', rngs=rngs)
    self.conv2 = nnx.Conv(cfg.ffn_dim, d, (1,), rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    m = mask[:, None, None, :] & mask[:, None, :, None]  # [B, 1, L, L]
    h = self.attention(x, mask=m, deterministic=True)
    x = self.attention_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))
    x = jnp.where(mask[..., None], x, 0.0)  # padding never leaks into the convolutions
    h = self.conv2(self.dropout(jax.nn.relu(self.conv1(x)), deterministic=deterministic,
                                rngs=rngs))
    x = self.ffn_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))
    return jnp.where(mask[..., None], x, 0.0)


class DurationPredictor(nnx.Module):
  """FastSpeech's variance predictor: `[B, P, D] -> [B, P]` log(1 + frames)."""

  def __init__(self, cfg: TtsConfig, *, rngs: nnx.Rngs):
    k, w = cfg.predictor_kernel, cfg.predictor_dim
    self.conv1 = nnx.Conv(cfg.dim, w, (k,), padding='SAME', rngs=rngs)
    self.norm1 = nnx.LayerNorm(w, rngs=rngs)
    self.conv2 = nnx.Conv(w, w, (k,), padding='SAME', rngs=rngs)
    self.norm2 = nnx.LayerNorm(w, rngs=rngs)
    self.out = nnx.Linear(w, 1, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    for conv, norm in ((self.conv1, self.norm1), (self.conv2, self.norm2)):
      x = jnp.where(mask[..., None], x, 0.0)
      x = self.dropout(norm(jax.nn.relu(conv(x))), deterministic=deterministic, rngs=rngs)
    return jnp.where(mask, self.out(x)[..., 0], 0.0)


def length_regulate(h: jax.Array, durations: jax.Array, num_frames: int):
  """Repeat phone states by their durations into a static frame axis.

  `h [B, P, D]`, `durations [B, P]` int (frames, 0 for padding) -> (`[B, T, D]`, frame mask
  `[B, T]`, `phone_of_frame [B, T]` int32). Frames past the total duration (or past T, which
  truncates) are masked and zero."""
  ends = jnp.cumsum(durations, axis=-1)  # [B, P]
  t = jnp.arange(num_frames)[None, :, None]  # [1, T, 1]
  idx = jnp.sum(ends[:, None, :] <= t, axis=-1)  # [B, T]: phones ending at or before t
  mask = jnp.arange(num_frames)[None, :] < ends[:, -1:]  # [B, T]
  idx = jnp.minimum(idx, h.shape[1] - 1).astype(jnp.int32)
  out = jnp.take_along_axis(h, idx[..., None], axis=1)
  return jnp.where(mask[..., None], out, 0.0), mask, idx


class FastSpeech(nnx.Module):
  """The acoustic model (see the module docstring)."""

  def __init__(self, cfg: TtsConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.phone_embed = nnx.Embed(cfg.num_phones + 1, cfg.dim, rngs=rngs)
    self.speaker_embed = nnx.Embed(cfg.num_speakers, cfg.dim, rngs=rngs)
    self.encoder = nnx.List([FFTBlock(cfg, rngs=rngs) for _ in range(cfg.encoder_layers)])
    self.duration = DurationPredictor(cfg, rngs=rngs)
    self.decoder = nnx.List([FFTBlock(cfg, rngs=rngs) for _ in range(cfg.decoder_layers)])
    self.mel_out = nnx.Linear(cfg.dim, cfg.n_mels, rngs=rngs)

  def encode(self, phones, speaker, *, deterministic=True, rngs=None):
    """`phones [B, P]` (0 = pad), `speaker [B]` -> (states [B, P, D], log-duration [B, P])."""
    mask = phones > 0
    x = self.phone_embed(phones) + sinusoids(phones.shape[1], self.cfg.dim)
    for block in self.encoder:
      x = block(x, mask, deterministic=deterministic, rngs=rngs)
    # The speaker joins after the encoder (as multi-speaker FastSpeech 2 implementations do):
    # durations and the decoder are speaker-dependent, the phone states are not.
    x = jnp.where(mask[..., None], x + self.speaker_embed(speaker)[:, None, :], 0.0)
    return x, self.duration(x, mask, deterministic=deterministic, rngs=rngs)

  def decode(self, h, durations, num_frames: int, *, deterministic=True, rngs=None):
    """Phone states + integer durations -> (log-mel [B, T, M], frame mask [B, T])."""
    x, mask, _ = length_regulate(h, durations, num_frames)
    x = jnp.where(mask[..., None], x + sinusoids(num_frames, self.cfg.dim), 0.0)
    for block in self.decoder:
      x = block(x, mask, deterministic=deterministic, rngs=rngs)
    return self.mel_out(x), mask

  def __call__(self, phones, speaker, durations, num_frames: int, *, deterministic=True,
               rngs=None):
    """Teacher-forced: (log-mel [B, T, M], frame mask [B, T], predicted log-duration [B, P])."""
    h, log_dur = self.encode(phones, speaker, deterministic=deterministic, rngs=rngs)
    mel, mask = self.decode(h, durations, num_frames, deterministic=deterministic, rngs=rngs)
    return mel, mask, log_dur

  def synthesize(self, phones, speaker, num_frames: int, duration_scale: float = 1.0):
    """Inference with predicted durations: (log-mel [B, T, M], frame mask, durations [B, P])."""
    h, log_dur = self.encode(phones, speaker)
    dur = jnp.round(jnp.maximum(jnp.exp(log_dur) - 1.0, 0.0) * duration_scale)
    dur = jnp.where(phones > 0, jnp.maximum(dur, 1.0), 0.0).astype(jnp.int32)
    mel, mask = self.decode(h, dur, num_frames)
    return mel, mask, dur
