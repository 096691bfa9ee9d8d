import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from data_pipelines import perturb as praat
from data_pipelines import synth
from jaxspeech.ops import perturb as P

SR = 16000


def harmonic(f0, seconds=2.0):
  t = np.arange(int(SR * seconds)) / SR
  return (0.1 * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 20))).astype(np.float32)


def peak_hz(x):
  f, p = scipy.signal.welch(x, SR, nperseg=8192)
  return f[np.argmax(p)]


def identity(b):
  return P.PerturbParams(jnp.ones(b), jnp.ones(b), jnp.ones(b), jnp.zeros((b, 10)),
                         jnp.full((b, 10), 3.0))


def test_identity_reconstructs_and_keeps_length_and_mask():
  x = np.stack([harmonic(150), harmonic(220)])  # [2, S]
  m = np.ones_like(x, bool)
  m[1, 20000:] = False
  y = np.asarray(P.perturb_with_params(x, m, identity(2)))
  assert y.shape == x.shape
  assert np.abs(y[0, 2000:-2000] - x[0, 2000:-2000]).max() < 1e-3
  assert not y[1, 20000:].any()


@pytest.mark.parametrize("ratio", [0.7, 1.5])
def test_pitch_ratio_moves_f0(ratio):
  x = harmonic(150)[None]
  p = identity(1)._replace(pitch_ratio=jnp.array([ratio]))
  y = np.asarray(P.perturb_with_params(x, np.ones_like(x, bool), p))[0]
  assert abs(peak_hz(y) / peak_hz(x[0]) - ratio) < 0.03


def test_formant_warp_moves_envelope_not_pitch():
  x = harmonic(120)[None]
  p = identity(1)._replace(formant_ratio=jnp.array([1.4]))
  y = np.asarray(P.perturb_with_params(x, np.ones_like(x, bool), p))[0]
  f, px = scipy.signal.welch(x[0], SR, nperseg=2048)
  _, py = scipy.signal.welch(y, SR, nperseg=2048)
  centroid = lambda p: (f * p).sum() / p.sum()
  assert centroid(py) > 1.15 * centroid(px)  # energy moved up
  assert abs(peak_hz(y) - peak_hz(x[0])) < 5  # F0 stays


def test_eq_matches_scipy_biquads():
  rng = np.random.default_rng(0)
  g, q = rng.uniform(-12, 12, 10), rng.uniform(2, 5, 10)
  sos = P.eq_biquads(g, q, SR, xp=np)
  w, h = scipy.signal.sosfreqz(sos, worN=512, fs=SR)
  got = np.asarray(P.eq_magnitude(jnp.asarray(sos), jnp.asarray(w), SR))
  np.testing.assert_allclose(got, np.abs(h), rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(P.eq_biquads(jnp.asarray(g), jnp.asarray(q), SR)), sos,
                             rtol=1e-4, atol=1e-5)


def test_sampled_ranges_are_spins():
  p = P.sample_params(jax.random.key(0), 4000)
  for r, (lo, hi) in ((p.formant_ratio, P.FORMANT_RANGE), (p.pitch_ratio, P.PITCH_RANGE)):
    r = np.asarray(r)
    up = r >= 1
    assert 0.45 < up.mean() < 0.55
    assert r[up].min() >= lo and r[up].max() <= hi and (1 / r[~up]).max() <= hi
  assert np.abs(np.asarray(p.eq_gain_db)).max() <= 12
  assert 2 <= np.asarray(p.eq_q).min() and np.asarray(p.eq_q).max() <= 5


def test_perturb_batch_compiles_once():
  x = np.random.default_rng(0).normal(0, 0.1, (3, 8000)).astype(np.float32)
  m = np.ones_like(x, bool)
  f = jax.jit(P.perturb_batch)
  for i in range(3):
    y = f(jax.random.key(i), x, m)
  assert f._cache_size() == 1 and y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  assert np.abs(np.asarray(y)).max() <= 1.0


def test_praat_change_gender_moves_pitch(synth_corpus):
  pytest.importorskip("parselmouth")
  import parselmouth

  rows, _ = synth.load_corpus(synth_corpus)
  x = sf.read(rows[0]["path"], dtype="float32")[0]

  def median_f0(w):
    f = parselmouth.Sound(w.astype(np.float64), SR).to_pitch_ac().selected_array["frequency"]
    return np.median(f[f > 0])

  y = praat.change_gender(x, SR, 1.0, 1.5, 1.0)
  assert y.shape == x.shape
  assert abs(median_f0(y) / median_f0(x) - 1.5) < 0.1
  z = praat.praat_perturb(x, SR, np.random.default_rng(0))
  assert z.shape == x.shape and np.abs(z).max() <= 1.0
