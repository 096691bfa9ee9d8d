"""VQ straight-through, commitment loss, pooled EMA codebook, CMCM vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.ops.vq import (
  cmcm_loss,
  cmcm_similarity,
  code_distribution,
  ema_codebook_init,
  ema_codebook_update,
  vector_quantize,
)


def _case(seed=0, b=2, t=9, d=4, v=6):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  e = rng.normal(size=(v, d)).astype(np.float32)
  mask = np.arange(t)[None] < np.minimum(t - np.arange(b) * 3, t).clip(1)[:, None]
  return h, e, mask


def test_quantize_forward_and_losses_match_numpy():
  h, e, mask = _case()
  out = jax.jit(vector_quantize)(h, e, mask, 0.25)
  d = ((h[..., None, :] - e) ** 2).sum(-1)
  codes = d.argmin(-1)
  q = e[codes]
  np.testing.assert_array_equal(np.asarray(out.codes), codes)
  np.testing.assert_allclose(np.asarray(out.quantized)[mask], q[mask], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.quantized)[~mask], h[~mask])
  mse = ((h - q) ** 2).mean(-1)[mask].mean()
  np.testing.assert_allclose(float(out.commitment_loss), 0.25 * mse, rtol=1e-5)
  np.testing.assert_allclose(float(out.codebook_loss), mse, rtol=1e-5)


def test_straight_through_gradients():
  h, e, mask = _case(1)
  w = np.random.default_rng(2).normal(size=h.shape).astype(np.float32)
  # d/dh sum(w * quantized) = w at valid frames (identity through the quantiser) and w at padded
  # frames (pass-through) -- the straight-through estimator.
  g = jax.grad(lambda x: jnp.sum(w * vector_quantize(x, e, mask).quantized))(jnp.asarray(h))
  np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)
  # Commitment loss pulls h towards its codeword only: grad = beta * 2 (h - q) / (N * D).
  out = vector_quantize(h, e, mask)
  q = e[np.asarray(out.codes)]
  gc = jax.grad(lambda x: vector_quantize(x, e, mask, 0.25).commitment_loss)(jnp.asarray(h))
  want = 0.25 * 2 * (h - q) / (mask.sum() * h.shape[-1]) * mask[..., None]
  np.testing.assert_allclose(np.asarray(gc), want, rtol=1e-5, atol=1e-8)
  # No gradient reaches the codebook through the quantised output or the commitment loss.
  ge = jax.grad(lambda c: jnp.sum(w * vector_quantize(h, c, mask).quantized)
                + vector_quantize(h, c, mask).commitment_loss)(jnp.asarray(e))
  np.testing.assert_array_equal(np.asarray(ge), 0.0)


def _np_ema(state, feats, codes, masks, decay, eps):
  cb, cs, es = (np.asarray(x, np.float64) for x in state)
  v = cs.shape[0]
  allh = np.concatenate([f[m] for f, m in zip(feats, masks)])
  allc = np.concatenate([c[m] for c, m in zip(codes, masks)])
  o = np.eye(v)[allc]
  cs = decay * cs + (1 - decay) * o.sum(0)
  es = decay * es + (1 - decay) * o.T @ allh
  n = cs.sum()
  return es / ((cs + eps) / (n + v * eps) * n)[:, None], cs, es


def test_ema_update_pooled_over_modalities():
  h_a, e, mask_a = _case(3, t=9)
  h_b, _, mask_b = _case(4, b=3, t=5)
  state = ema_codebook_init(e)
  codes_a = np.asarray(vector_quantize(h_a, e, mask_a).codes)
  codes_b = np.asarray(vector_quantize(h_b, e, mask_b).codes)
  new = jax.jit(ema_codebook_update)(state, [h_a, h_b], [codes_a, codes_b], [mask_a, mask_b])
  want_cb, want_cs, want_es = _np_ema(state, [h_a, h_b], [codes_a, codes_b], [mask_a, mask_b],
                                      0.99, 1e-5)
  np.testing.assert_allclose(np.asarray(new.cluster_size), want_cs, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new.embed_sum), want_es, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.codebook), want_cb, rtol=1e-5, atol=1e-6)
  # Pooling = one update on the concatenated units.
  one = ema_codebook_update(
    state, [np.concatenate([h_a[mask_a], h_b[mask_b]])],
    [np.concatenate([codes_a[mask_a], codes_b[mask_b]])],
    [np.ones(mask_a.sum() + mask_b.sum(), bool)])
  np.testing.assert_allclose(np.asarray(one.codebook), np.asarray(new.codebook), rtol=1e-5)


def test_cmcm_matches_numpy_and_prefers_matched_pairs():
  rng = np.random.default_rng(5)
  e = rng.normal(size=(8, 4)).astype(np.float32)
  h_a = rng.normal(size=(3, 6, 4)).astype(np.float32)
  h_b = rng.normal(size=(3, 7, 4)).astype(np.float32)
  m_a = np.arange(6)[None] < np.array([6, 4, 2])[:, None]
  m_b = np.ones((3, 7), bool)
  code_dist = jax.jit(code_distribution)
  pa = np.asarray(code_dist(h_a, e, m_a))
  dist = np.sqrt(((h_a[..., None, :].astype(np.float64) - e) ** 2).sum(-1))
  sm = np.exp(-dist) / np.exp(-dist).sum(-1, keepdims=True)
  want_pa = np.stack([sm[i][m_a[i]].mean(0) for i in range(3)])
  np.testing.assert_allclose(pa, want_pa, rtol=1e-5)
  pb = np.asarray(code_dist(h_b, e, m_b))
  s = np.asarray(jax.jit(cmcm_similarity)(pa, pb))
  want_s = pa @ np.log(pb).T + np.log(pa) @ pb.T
  np.testing.assert_allclose(s, want_s, rtol=1e-5)
  logsm_r = want_s - np.log(np.exp(want_s).sum(1, keepdims=True))
  logsm_c = want_s - np.log(np.exp(want_s).sum(0, keepdims=True))
  want = -(np.trace(logsm_r) + np.trace(logsm_c)) / 3
  assert float(cmcm_loss(pa, pb)) == pytest.approx(want, rel=1e-5)
  # Matched pairs with identical code distributions score lower loss than mismatched ones.
  peaked = np.eye(8)[[0, 3, 5]] * 0.9 + 0.1 / 8
  assert float(cmcm_loss(peaked, peaked)) < float(cmcm_loss(peaked, peaked[[1, 2, 0]]))
  # A padded instance neither anchors nor serves as a negative.
  valid = np.array([True, True, False])
  sub = float(cmcm_loss(pa[:2], pb[:2]))
  assert float(cmcm_loss(pa, pb, valid)) == pytest.approx(sub, rel=1e-5)
