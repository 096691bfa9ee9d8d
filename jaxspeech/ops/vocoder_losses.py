"""HiFi-GAN and Parallel WaveGAN training losses as plain array functions (jik876/hifi-gan
`models.py`: `discriminator_loss`, `generator_loss`, `feature_loss`; kan-bayashi/ParallelWaveGAN
`losses/stft_loss.py`), used by `jaxspeech.methods.vocoder`.

Every loss takes row weights `w [B]` (0 for filler rows) and averages over the rows it weighs.
Legend: B batch, S samples, T frames, D / F features or STFT bins, N logits of one
sub-discriminator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspeech.ops.mel import MelConfig, stft

# Parallel WaveGAN's three (n_fft, hop, win) resolutions (`parallel_wavegan/losses/stft_loss.py`).
PWG_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))


def weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  """Mean over everything but the batch, then the `w`-weighted mean over rows. x [B, ...],
  w [B] -> []."""
  per_row = jnp.mean(x.reshape(x.shape[0], -1), axis=1)
  return jnp.sum(w * per_row) / jnp.maximum(jnp.sum(w), 1.0)


def lsgan_discriminator_loss(real_logits: list[jax.Array], fake_logits: list[jax.Array],
                             w: jax.Array) -> jax.Array:
  """sum_k mean (1 - D_k(real))^2 + mean D_k(fake)^2 (hifi-gan `discriminator_loss`).
  Each logits [B, N_k]; w [B] row weights."""
  return sum(weighted_mean(jnp.square(1.0 - r), w) + weighted_mean(jnp.square(f), w)
             for r, f in zip(real_logits, fake_logits))


def lsgan_generator_loss(fake_logits: list[jax.Array], w: jax.Array) -> jax.Array:
  """sum_k mean (1 - D_k(fake))^2 (hifi-gan `generator_loss`)."""
  return sum(weighted_mean(jnp.square(1.0 - f), w) for f in fake_logits)


def feature_matching_loss(real_fmaps: list[list[jax.Array]], fake_fmaps: list[list[jax.Array]],
                          w: jax.Array) -> jax.Array:
  """sum_k sum_l mean |F_kl(real) - F_kl(fake)| (hifi-gan `feature_loss`, without its x2: the
  weight is `config.method.fm_weight`)."""
  return sum(weighted_mean(jnp.abs(r - f), w)
             for rs, fs in zip(real_fmaps, fake_fmaps) for r, f in zip(rs, fs))


def frame_mask(lengths: jax.Array, num_frames: int, hop: int) -> jax.Array:
  """[B] valid samples -> [B, T]: the utterance's own frames, 1 + length // hop of them (as
  `MelConfig.num_frames`: a whole crop keeps all T)."""
  return jnp.arange(num_frames)[None, :] < (1 + lengths[:, None] // hop)


def masked_l1(x: jax.Array, y: jax.Array, mask: jax.Array, w: jax.Array) -> jax.Array:
  """Mean |x - y| over the valid frames (mask [B, T]) of x, y [B, T, D], rows weighted by w."""
  m = mask.astype(jnp.float32)[..., None] * w[:, None, None]
  return jnp.sum(m * jnp.abs(x - y)) / jnp.maximum(jnp.sum(m) * x.shape[-1], 1.0)


def multi_resolution_stft_loss(real: jax.Array, fake: jax.Array, lengths: jax.Array,
                               w: jax.Array, resolutions=PWG_RESOLUTIONS
                               ) -> tuple[jax.Array, jax.Array]:
  """(spectral convergence, log-magnitude L1), each averaged over the resolutions (Parallel
  WaveGAN `MultiResolutionSTFTLoss`: Hann window, centred frames, magnitudes floored at 1e-7).
  Spectral convergence ||real| - |fake||_F / ||real||_F is per utterance over its valid frames.
  real, fake [B, S]; lengths [B]; w [B] row weights."""
  sc_total = mag_total = 0.0
  for n_fft, hop, win in resolutions:
    cfg = MelConfig(n_fft=int(n_fft), hop=int(hop), win=int(win))
    r = jnp.maximum(jnp.abs(stft(real, cfg)), 1e-7)  # [B, T_r, F]
    f = jnp.maximum(jnp.abs(stft(fake, cfg)), 1e-7)
    m = frame_mask(lengths, r.shape[1], int(hop)).astype(jnp.float32)[..., None]  # [B, T_r, 1]
    num = jnp.sqrt(jnp.sum(m * jnp.square(r - f), axis=(1, 2)))  # [B]
    den = jnp.sqrt(jnp.sum(m * jnp.square(r), axis=(1, 2)))
    sc = num / jnp.maximum(den, 1e-7)
    sc_total += jnp.sum(w * sc) / jnp.maximum(jnp.sum(w), 1.0)
    mag_total += masked_l1(jnp.log(r), jnp.log(f), m[..., 0] > 0, w)
  k = len(resolutions)
  return sc_total / k, mag_total / k
