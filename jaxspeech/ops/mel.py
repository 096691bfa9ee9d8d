"""Log-mel spectrograms for synthesis (HiFi-GAN / librosa conventions) and Griffin-Lim.

The TTS acoustic model predicts, and the vocoder inverts, `log_mel`: the magnitude STFT
(centre-padded by reflection, Hann window) through librosa's Slaney mel filters
(`librosa.filters.mel(htk=False, norm='slaney')`), natural log with a 1e-5 floor -- HiFi-GAN's
`mel_spectrogram`, at 16 kHz: n_fft 1024, hop 256 (62.5 frames/s), 80 bins, 0-8 kHz. (The MFCC
front end of the SSL methods is Kaldi's, 100 frames/s, in `jaxspeech.methods.hubert`; a vocoder
needs a hop that its upsampling factors multiply to, hence a second front end.) The filters are
written here (a few lines of numpy) rather than importing librosa at run time; their parity with
librosa is a test.

`griffin_lim` is the non-learned vocoder baseline: mel -> linear magnitude by non-negative least
squares-like projection (the filters' pseudo-inverse, clipped at 0; librosa's `mel_to_stft` uses
NNLS), then Griffin-Lim with momentum 0.99 (librosa's "fast Griffin-Lim", Perraudin et al. 2013).

Legend: B batch, S samples, T frames (`num_frames(S)`), F = n_fft // 2 + 1 bins, M mel bins.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LOG_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class MelConfig:
  sample_rate: int = 16_000
  n_fft: int = 1024
  hop: int = 256
  win: int = 1024
  n_mels: int = 80
  fmin: float = 0.0
  fmax: float = 8000.0

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.hop

  def num_frames(self, num_samples):
    """Frames of `num_samples` samples (centre padding: 1 + S // hop); int or int array."""
    return 1 + num_samples // self.hop


def _hz_to_mel(f):  # Slaney: linear below 1 kHz, logarithmic above (librosa htk=False)
  f = np.asarray(f, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  logstep = np.log(6.4) / 27.0
  return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz)
                  / logstep, f / f_sp)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_banks(cfg: MelConfig = MelConfig()) -> np.ndarray:
  """Slaney-normalised triangular filters `[F, M]` (librosa.filters.mel(...).T)."""
  fft_hz = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
  mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2))
  fdiff = np.diff(mel_hz)
  ramps = mel_hz[:, None] - fft_hz[None, :]  # [M+2, F]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  w = np.maximum(0.0, np.minimum(lower, upper))  # [M, F]
  w *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]  # equal area (norm='slaney')
  return w.T.astype(np.float32)


def _window(cfg: MelConfig) -> np.ndarray:
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.win) / cfg.win)  # periodic Hann
  pad = (cfg.n_fft - cfg.win) // 2
  return np.pad(w, (pad, cfg.n_fft - cfg.win - pad)).astype(np.float32)


def _frame_index(cfg: MelConfig, num_samples: int) -> np.ndarray:
  t = cfg.num_frames(num_samples)
  return np.arange(t)[:, None] * cfg.hop + np.arange(cfg.n_fft)[None, :]  # [T, n_fft]


def stft(wav: jax.Array, cfg: MelConfig = MelConfig()) -> jax.Array:
  """Complex STFT `[B, S] -> [B, T, F]`, centred (reflect padding of n_fft // 2)."""
  p = cfg.n_fft // 2
  x = jnp.pad(wav.astype(jnp.float32), ((0, 0), (p, p)), mode='reflect')
  frames = x[:, _frame_index(cfg, wav.shape[1])] * _window(cfg)  # [B, T, n_fft]
  return jnp.fft.rfft(frames, axis=-1)


def istft(spec: jax.Array, num_samples: int, cfg: MelConfig = MelConfig()) -> jax.Array:
  """Inverse of `stft` by weighted overlap-add: `[B, T, F] -> [B, num_samples]`."""
  w = _window(cfg)
  frames = jnp.fft.irfft(spec, n=cfg.n_fft, axis=-1) * w  # [B, T, n_fft]
  idx = _frame_index(cfg, num_samples)[: spec.shape[1]]
  total = num_samples + cfg.n_fft
  out = jnp.zeros((spec.shape[0], total), jnp.float32).at[:, idx].add(frames)
  # (np.add.at with a broadcast [T, n_fft] index crashed numpy 2.4 here: bincount instead.)
  norm = np.bincount(idx.ravel(), weights=np.tile(w.astype(np.float64) ** 2, idx.shape[0]),
                     minlength=total)
  p = cfg.n_fft // 2
  norm = np.where(norm > 1e-8, norm, 1.0)[p:p + num_samples].astype(np.float32)
  return out[:, p:p + num_samples] / norm


def log_mel(wav: jax.Array, cfg: MelConfig = MelConfig()) -> jax.Array:
  """HiFi-GAN log-mel `[B, S] -> [B, T, M]` (magnitude, Slaney filters, log floor 1e-5).

  Frame t is centred on sample t * hop; on a zero-padded batch the frames past
  `cfg.num_frames(length)` (and the last couple before it, whose window reaches the padding)
  differ from the utterance alone."""
  mag = jnp.abs(stft(wav, cfg))  # [B, T, F]
  return jnp.log(jnp.maximum(mag @ mel_banks(cfg), LOG_FLOOR))


def mel_to_magnitude(logmel: jax.Array, cfg: MelConfig = MelConfig()) -> jax.Array:
  """Approximate linear magnitude `[B, T, M] -> [B, T, F]`: pseudo-inverse of the filters,
  clipped at 0 (librosa solves NNLS; the pseudo-inverse is the jit-able closed form)."""
  inv = np.linalg.pinv(mel_banks(cfg).astype(np.float64)).astype(np.float32)  # [M, F]
  return jnp.maximum(jnp.exp(logmel) @ inv, 0.0)


def griffin_lim(logmel: jax.Array, num_samples: int, rng: jax.Array, n_iter: int = 60,
                momentum: float = 0.99, cfg: MelConfig = MelConfig()) -> jax.Array:
  """Waveform `[B, num_samples]` whose log-mel approximates `logmel [B, T, M]` (fast GL)."""
  mag = mel_to_magnitude(logmel, cfg)  # [B, T, F]
  phase = jnp.exp(2j * jnp.pi * jax.random.uniform(rng, mag.shape))
  t = mag.shape[1]

  def proj(spec):
    s = stft(istft(spec, num_samples, cfg), cfg)[:, :t]
    return s

  def body(_, carry):
    angles, prev = carry
    rebuilt = proj(mag * angles)
    angles = rebuilt - (momentum / (1 + momentum)) * prev
    angles = angles / jnp.maximum(jnp.abs(angles), 1e-16)
    return angles, rebuilt

  angles, _ = jax.lax.fori_loop(0, n_iter, body, (phase.astype(jnp.complex64),
                                                  jnp.zeros_like(phase, jnp.complex64)))
  return istft(mag * angles, num_samples, cfg)
