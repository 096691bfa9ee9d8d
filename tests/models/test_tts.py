"""The FastSpeech-style acoustic model: length regulation with static shapes, padding
invariance, synthesis shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.models import tts


def test_length_regulate_is_numpy_repeat():
  rng = np.random.default_rng(0)
  h = rng.standard_normal((3, 6, 4)).astype(np.float32)
  dur = np.array([[2, 0, 3, 1, 0, 0], [1, 1, 1, 1, 1, 1], [5, 4, 0, 0, 0, 0]], np.int32)
  out, mask, idx = tts.length_regulate(jnp.asarray(h), jnp.asarray(dur), 8)
  out, mask, idx = np.asarray(out), np.asarray(mask), np.asarray(idx)
  for b in range(3):
    ref = np.repeat(h[b], dur[b], axis=0)[:8]
    n = len(ref)
    np.testing.assert_array_equal(out[b, :n], ref)
    assert mask[b].sum() == n and not out[b, n:].any()
    np.testing.assert_array_equal(idx[b, :n], np.repeat(np.arange(6), dur[b])[:8])


def _model(**kw):
  cfg = tts.TtsConfig(num_phones=10, num_speakers=3, dim=32, heads=2, ffn_dim=64,
                      encoder_layers=1, decoder_layers=1, predictor_dim=16, dropout=0.0, **kw)
  return tts.FastSpeech(cfg, rngs=nnx.Rngs(0))


def test_padding_changes_nothing():
  model = _model()
  phones = jnp.array([[3, 5, 1, 7]], jnp.int32)
  dur = jnp.array([[2, 3, 1, 4]], jnp.int32)
  spk = jnp.array([2])
  a, ma, la = model(phones, spk, dur, 12)
  b, mb, lb = model(jnp.pad(phones, ((0, 0), (0, 3))), spk, jnp.pad(dur, ((0, 0), (0, 3))), 16)
  assert int(ma.sum()) == int(mb.sum()) == 10
  np.testing.assert_allclose(np.asarray(a)[0, :10], np.asarray(b)[0, :10], atol=1e-5)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb)[:, :4], atol=1e-5)
  assert not np.asarray(lb)[:, 4:].any()


def test_speaker_changes_the_output_and_synthesis_shapes():
  model = _model()
  phones = jnp.array([[3, 5, 1, 7], [2, 2, 0, 0]], jnp.int32)
  mel, mask, dur = jax.jit(model.synthesize, static_argnums=(2,))(phones, jnp.array([0, 1]), 40)
  assert mel.shape == (2, 40, 80) and mask.shape == (2, 40) and dur.shape == (2, 4)
  dur = np.asarray(dur)
  assert (dur[0] >= 1).all() and (dur[1, :2] >= 1).all() and (dur[1, 2:] == 0).all()
  np.testing.assert_array_equal(np.asarray(mask).sum(1), np.minimum(dur.sum(1), 40))
  m0, _, _ = model(phones[:1], jnp.array([0]), jnp.array([[2, 2, 2, 2]]), 8)
  m1, _, _ = model(phones[:1], jnp.array([1]), jnp.array([[2, 2, 2, 2]]), 8)
  assert float(jnp.abs(m0 - m1).max()) > 1e-3
