"""Speaker perturbation as a jit-compiled JAX function (Spin's second view, on the accelerator).

Spin (Chang et al. 2023, `../shared/SEEDS.md` §1) perturbs the speaker with Praat's "Change
gender" (formant shift, pitch-median shift, pitch-range scaling; duration kept) followed by a
random 10-band parametric EQ. Praat runs on the CPU, one utterance at a time. This module does the
same kind of change on a whole padded batch in one compiled call, in the STFT domain:

  1. pitch shift by `pitch_ratio` with a phase vocoder: the short-time spectrum is resampled along
     frequency (bin k reads source position k / ratio), each partial's instantaneous frequency is
     scaled by the ratio and phases are re-integrated frame to frame, so durations do not change;
  2. formant shift by `formant_ratio`: the log spectrum is split into a cepstrally smoothed
     envelope and a fine structure; the fine structure follows the pitch, the envelope is warped
     on its own (k reads k / formant_ratio), so pitch and formants move independently;
  3. EQ: the magnitude response of the same 10 biquads as Spin's EQ (RBJ cookbook low shelf,
     8 peaking, high shelf) multiplies the spectrum (zero-phase, where Spin filters with IIRs);
  4. inverse STFT, crop to the input length, zero the padding, clip to [-1, 1].

Unlike Praat, the pitch-range ratio (scaling of F0 excursions around the median) is not modelled:
that needs a per-frame F0 track. Output length always equals input length (frames align 1:1).

Shape legend: B batch, S samples, K = n_fft // 2 + 1 frequency bins, T STFT frames,
E = 10 EQ bands.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EQ_BANDS = 10
EQ_LOW_HZ, EQ_HIGH_HZ = 60.0, 7600.0  # centre frequencies, log-spaced (Spin / ContentVec)
EQ_Q_MIN, EQ_Q_MAX = 2.0, 5.0  # Q = Q_min * (Q_max / Q_min) ** U(0, 1)
EQ_GAIN_DB = 12.0  # gain ~ U(-12, 12) dB
FORMANT_RANGE = (1.0, 1.4)  # ratio ~ U(1, 1.4), inverted with p = 0.5
PITCH_RANGE = (1.0, 2.0)  # ratio ~ U(1, 2), inverted with p = 0.5
PITCH_RANGE_RANGE = (1.0, 1.5)  # Praat's pitch-range factor ~ U(1, 1.5), inverted with p = 0.5


class PerturbParams(NamedTuple):
  """Per-utterance perturbation parameters. Leaves: [B] or [B, E]."""

  formant_ratio: jax.Array  # [B]
  pitch_ratio: jax.Array  # [B]
  pitch_range_ratio: jax.Array  # [B] (used by the Praat path only)
  eq_gain_db: jax.Array  # [B, E]
  eq_q: jax.Array  # [B, E]


def eq_centres(xp=jnp):
  """The 10 EQ centre frequencies in Hz. [E]."""
  return xp.geomspace(EQ_LOW_HZ, EQ_HIGH_HZ, EQ_BANDS)


def sample_params(key: jax.Array, batch: int) -> PerturbParams:
  """Spin's random ranges for `batch` utterances (jax.random; also usable outside jit)."""
  ks = jax.random.split(key, 7)

  def ratio(k_val, k_flip, lo_hi):
    r = jax.random.uniform(k_val, (batch,), minval=lo_hi[0], maxval=lo_hi[1])  # [B]
    return jnp.where(jax.random.bernoulli(k_flip, 0.5, (batch,)), 1.0 / r, r)

  key_f, key_p = jax.random.split(ks[6])
  return PerturbParams(
    formant_ratio=ratio(ks[0], key_f, FORMANT_RANGE),
    pitch_ratio=ratio(ks[1], key_p, PITCH_RANGE),
    pitch_range_ratio=ratio(ks[2], ks[3], PITCH_RANGE_RANGE),
    eq_gain_db=jax.random.uniform(ks[4], (batch, EQ_BANDS), minval=-EQ_GAIN_DB, maxval=EQ_GAIN_DB),
    eq_q=EQ_Q_MIN * (EQ_Q_MAX / EQ_Q_MIN) ** jax.random.uniform(ks[5], (batch, EQ_BANDS)),
  )


def eq_biquads(gain_db, q, sample_rate: float, xp=jnp):
  """RBJ-cookbook biquads of the 10-band EQ: low shelf, 8 peaking, high shelf.

  Written out because neither scipy nor jax has gain-parameterised shelf/peaking designs;
  `xp` = numpy gives coefficients for `scipy.signal.sosfilt` (the Praat path), jnp for jit.
  Args: gain_db, q: [..., E]. Returns sos [..., E, 6] = (b0, b1, b2, 1, a1, a2), normalised.
  """
  fc = eq_centres(xp)  # [E]
  a = xp.sqrt(10.0 ** (gain_db / 20.0))  # [..., E]
  w = 2 * np.pi * fc / sample_rate  # [E]
  cw, sw = xp.cos(w), xp.sin(w)
  # Peaking bands.
  alpha = sw / (2 * q)
  peak = (1 + alpha * a, -2 * cw + 0 * a, 1 - alpha * a, 1 + alpha / a, -2 * cw + 0 * a,
          1 - alpha / a)  # fmt: skip
  # Shelves (the JUCE / cookbook form with slope given through Q).
  beta = sw * xp.sqrt(a) / q
  am, ap = a - 1, a + 1
  low = (a * (ap - am * cw + beta), 2 * a * (am - ap * cw), a * (ap - am * cw - beta),
         ap + am * cw + beta, -2 * (am + ap * cw), ap + am * cw - beta)  # fmt: skip
  high = (a * (ap + am * cw + beta), -2 * a * (am + ap * cw), a * (ap + am * cw - beta),
          ap - am * cw + beta, 2 * (am - ap * cw), ap - am * cw - beta)  # fmt: skip
  band = xp.arange(EQ_BANDS)
  coefs = [
    xp.where(band == 0, lo, xp.where(band == EQ_BANDS - 1, hi, pk))
    for lo, pk, hi in zip(low, peak, high)
  ]  # 6 x [..., E]
  b0, b1, b2, a0, a1, a2 = coefs
  return xp.stack([b0 / a0, b1 / a0, b2 / a0, a0 / a0, a1 / a0, a2 / a0], axis=-1)  # [..., E, 6]


def eq_magnitude(sos, freqs_hz, sample_rate: float):
  """|H(f)| of a biquad cascade at `freqs_hz`. sos [..., E, 6], freqs [K] -> [..., K]."""
  z1 = jnp.exp(-1j * 2 * jnp.pi * freqs_hz / sample_rate)  # [K] = z^-1
  z2 = z1 * z1
  s = sos[..., None, :]  # [..., E, 1, 6]
  num = s[..., 0] + s[..., 1] * z1 + s[..., 2] * z2  # [..., E, K]
  den = s[..., 3] + s[..., 4] * z1 + s[..., 5] * z2  # [..., E, K]
  return jnp.prod(jnp.abs(num / den), axis=-2)  # [..., K]


def _interp_bins(values, pos):
  """Linear interpolation of `values` [K] at fractional bin positions `pos` [K]."""
  k = values.shape[0]
  p = jnp.clip(pos, 0.0, k - 1.0)
  lo = jnp.floor(p).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, k - 1)
  frac = p - lo
  return values[lo] * (1 - frac) + values[hi] * frac


@functools.partial(jax.jit, static_argnames=("sample_rate", "n_fft", "hop", "lifter"))
def perturb_with_params(
  audio: jax.Array,
  mask: jax.Array,
  params: PerturbParams,
  *,
  sample_rate: int = 16_000,
  n_fft: int = 1024,
  hop: int = 256,
  lifter: int = 24,
) -> jax.Array:
  """Applies pitch shift, formant warp and EQ. audio [B, S] float, mask [B, S] bool -> [B, S].

  `lifter`: cepstral coefficients kept for the envelope; 24 at 16 kHz = quefrencies < 1.5 ms,
  below the pitch period of any voice (F0 < 660 Hz), so the envelope holds formants, not pitch.
  """
  b, s = audio.shape
  x = jnp.where(mask, audio, 0.0).astype(jnp.float32)
  _, _, spec = jax.scipy.signal.stft(x, nperseg=n_fft, noverlap=n_fft - hop)  # [B, K, T]
  k = spec.shape[1]
  bins = jnp.arange(k, dtype=jnp.float32)  # [K]
  omega = 2 * jnp.pi * bins / n_fft  # [K] bin centre, radians/sample

  # Instantaneous frequency of each bin from the frame-to-frame phase advance.
  phase = jnp.angle(spec)  # [B, K, T]
  dphi = jnp.diff(phase, axis=-1, prepend=phase[..., :1]) - omega[:, None] * hop
  dphi = (dphi + jnp.pi) % (2 * jnp.pi) - jnp.pi  # wrap to [-pi, pi)
  inst = omega[:, None] + dphi / hop  # [B, K, T]

  # Envelope / fine structure split of the log magnitude (real cepstrum, low-quefrency lifter).
  logmag = jnp.log(jnp.abs(spec) + 1e-8)  # [B, K, T]
  cep = jnp.fft.irfft(logmag, n=n_fft, axis=1)  # [B, n_fft, T]
  q = jnp.arange(n_fft)
  keep = (q < lifter) | (q > n_fft - lifter)
  env = jnp.fft.rfft(jnp.where(keep[None, :, None], cep, 0.0), axis=1).real  # [B, K, T]
  fine = logmag - env

  def warp(fine_i, env_i, inst_i, phase0_i, r_pitch, r_formant):  # one utterance: [K, T]
    src = bins / r_pitch  # [K] source bin of each output bin
    inside = src <= k - 1
    f_out = jax.vmap(_interp_bins, in_axes=(1, None), out_axes=1)(fine_i, src)  # [K, T]
    e_out = jax.vmap(_interp_bins, in_axes=(1, None), out_axes=1)(env_i, bins / r_formant)
    near = jnp.clip(jnp.round(src).astype(jnp.int32), 0, k - 1)  # [K]
    w_out = inst_i[near] * r_pitch  # [K, T] scaled partial frequencies
    ph = phase0_i[near][:, None] + jnp.cumsum(w_out * hop, axis=-1) - w_out[:, :1] * hop
    mag = jnp.where(inside[:, None], jnp.exp(f_out + e_out), 0.0)
    return mag * jnp.exp(1j * ph)  # [K, T]

  out = jax.vmap(warp)(fine, env, inst, phase[..., 0], params.pitch_ratio, params.formant_ratio)
  sos = eq_biquads(params.eq_gain_db, params.eq_q, sample_rate)  # [B, E, 6]
  gain = eq_magnitude(sos, bins * sample_rate / n_fft, sample_rate)  # [B, K]
  out = out * gain[:, :, None]  # [B, K, T]
  _, y = jax.scipy.signal.istft(out, nperseg=n_fft, noverlap=n_fft - hop)  # [B, S']
  y = y[:, :s] if y.shape[1] >= s else jnp.pad(y, ((0, 0), (0, s - y.shape[1])))  # [B, S]
  return jnp.clip(jnp.where(mask, y, 0.0), -1.0, 1.0).astype(audio.dtype)


def perturb_batch(key: jax.Array, audio: jax.Array, mask: jax.Array, **kwargs) -> jax.Array:
  """Spin's random speaker perturbation of a padded batch. [B, S], [B, S] -> [B, S].

  Call it inside a jitted train step (the sampling is jit-able) or on its own.
  """
  return perturb_with_params(audio, mask, sample_params(key, audio.shape[0]), **kwargs)
