"""`jaxspeech.ops.mel`: librosa parity of the filters and the log-mel, exact STFT inversion,
Griffin-Lim converging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.ops import mel

librosa = pytest.importorskip('librosa')


def test_filters_match_librosa_slaney():
  cfg = mel.MelConfig()
  ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                            fmin=cfg.fmin, fmax=cfg.fmax).T  # htk=False, norm='slaney'
  got = mel.mel_banks(cfg)
  assert got.shape == (513, 80)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * ref.max())
  # Another band and size too (the formulas, not one table).
  cfg2 = mel.MelConfig(n_fft=512, n_mels=40, fmin=50.0, fmax=7000.0)
  ref2 = librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=50.0, fmax=7000.0).T
  np.testing.assert_allclose(mel.mel_banks(cfg2), ref2, rtol=0, atol=1e-6 * ref2.max())


def test_log_mel_matches_librosa_hifigan_recipe():
  rng = np.random.default_rng(0)
  x = (0.1 * rng.standard_normal((2, 12_345))).astype(np.float32)
  x[1, 6000:] = 0.0  # a quiet tail: the log floor
  cfg = mel.MelConfig()
  got = np.asarray(mel.log_mel(jnp.asarray(x), cfg))
  assert got.shape == (2, cfg.num_frames(12_345), 80) == (2, 49, 80)
  basis = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0)
  for b in range(2):
    spec = np.abs(librosa.stft(x[b], n_fft=1024, hop_length=256, win_length=1024,
                               window='hann', center=True, pad_mode='reflect'))
    ref = np.log(np.maximum(basis @ spec, 1e-5)).T
    np.testing.assert_allclose(got[b], ref, rtol=0, atol=2e-4)


def test_istft_inverts_stft_exactly():
  x = np.random.default_rng(1).standard_normal((2, 8000)).astype(np.float32)
  y = np.asarray(mel.istft(mel.stft(jnp.asarray(x)), 8000))
  np.testing.assert_allclose(y, x, rtol=0, atol=1e-4)


def test_griffin_lim_recovers_the_spectrogram():
  t = np.arange(16000) / 16000
  x = (0.5 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
       + 0.05 * np.random.default_rng(2).standard_normal(16000)).astype(np.float32)[None]
  target = mel.log_mel(jnp.asarray(x))
  n = (target.shape[1] - 1) * 256

  def dist(iters):
    y = mel.griffin_lim(target, n, jax.random.key(0), n_iter=iters)
    assert y.shape == (1, n) and bool(jnp.all(jnp.isfinite(y)))
    return float(jnp.mean(jnp.abs(mel.log_mel(y) - target)))

  d0, d30 = dist(0), dist(30)
  assert d30 < 0.5 * d0, (d0, d30)
