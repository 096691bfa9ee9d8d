"""Swapped prediction loss and cosine helpers vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.ops.sinkhorn import sinkhorn
from jaxspeech.ops.swapped_prediction import (
  cosine_logits,
  normalize_codebook,
  spin_loss,
  swapped_prediction_loss,
)
from tests.ops.test_sinkhorn import np_sinkhorn


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _case(seed=0, b=3, t=10, d=6, k=5):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(b, t, d)).astype(np.float32)
  z2 = (z1 + 0.3 * rng.normal(size=(b, t, d))).astype(np.float32)
  c = rng.normal(size=(k, d)).astype(np.float32)
  mask = np.arange(t)[None] < np.array([t, 7, 4])[:, None]
  return z1, z2, c, mask


def test_normalize_and_cosine_logits():
  z1, _, c, _ = _case()
  cn = np.asarray(normalize_codebook(c))
  np.testing.assert_allclose(np.linalg.norm(cn, axis=-1), 1.0, rtol=1e-6)
  got = np.asarray(cosine_logits(z1, cn))
  want = (z1 / np.linalg.norm(z1, axis=-1, keepdims=True)) @ cn.T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cosine_logits(z1, c, normalize_codebook_rows=True)), want,
                             rtol=1e-5, atol=1e-6)


def test_loss_matches_numpy():
  z1, z2, c, mask = _case()
  c = np.asarray(normalize_codebook(c))
  tau, eps = 0.1, 0.02
  out = jax.jit(spin_loss)(z1, z2, c, mask)
  l1 = (z1 / np.linalg.norm(z1, axis=-1, keepdims=True)) @ c.T
  l2 = (z2 / np.linalg.norm(z2, axis=-1, keepdims=True)) @ c.T
  v1, v2 = l1[mask].astype(np.float64), l2[mask].astype(np.float64)
  t1, t2 = np_sinkhorn(v1, eps, 3), np_sinkhorn(v2, eps, 3)
  want = -0.5 * ((t1 * _np_log_softmax(v2 / tau)).sum(1).mean()
                 + (t2 * _np_log_softmax(v1 / tau)).sum(1).mean())
  np.testing.assert_allclose(float(out.loss), want, rtol=1e-4)
  want_acc = 0.5 * ((v1.argmax(1) == t2.argmax(1)).mean() + (v2.argmax(1) == t1.argmax(1)).mean())
  np.testing.assert_allclose(float(out.accuracy), want_acc, rtol=1e-6)
  codes = np.concatenate([v1.argmax(1), v2.argmax(1)])
  p = np.bincount(codes, minlength=c.shape[0]) / codes.size
  p = p[p > 0]
  np.testing.assert_allclose(float(out.code_perplexity), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


def test_gradient_matches_numpy_and_ignores_padding():
  z1, z2, c, mask = _case(seed=1)
  c = np.asarray(normalize_codebook(c))
  l1, l2 = cosine_logits(z1, c), cosine_logits(z2, c)
  t1, t2 = sinkhorn(l1, mask), sinkhorn(l2, mask)
  tau = 0.1
  g = np.asarray(jax.grad(lambda a: swapped_prediction_loss(a, l2, t1, t2, mask, tau))(l1))
  # d/d logits1 of -1/2 mean_n sum_k T2 log softmax(l1/tau) = (softmax(l1/tau) - T2) / (2 tau N).
  n = mask.sum()
  sm = np.exp(_np_log_softmax(np.asarray(l1, np.float64) / tau))
  want = (sm - np.asarray(t2)) / (2 * tau * n) * mask[..., None]
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
  # Garbage (even inf) logits at padded frames change neither the loss nor its finiteness.
  bad = jnp.where(mask[..., None], l2, jnp.inf)
  a = swapped_prediction_loss(l1, l2, t1, t2, mask)
  b = swapped_prediction_loss(l1, bad, t1, t2, mask)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
