"""wav2vec-U 2.0 ops vs numpy / torch: JOIN segmentation, perplexities, smoothness, masked
BatchNorm, gradient penalty."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.ops import gan, segment


def _logits(seed=0, b=3, t=12, v=4):
  rng = np.random.default_rng(seed)
  # Few classes and a bias toward repeats, so that runs of several frames occur.
  ids = np.cumsum(rng.random((b, t)) < 0.4, axis=1) % v
  x = rng.normal(size=(b, t, v)).astype(np.float32) + 4 * np.eye(v, dtype=np.float32)[ids]
  lens = np.array([t, t - 5, 1][:b])
  mask = np.arange(t)[None] < lens[:, None]
  return x, mask


def _np_runs(x, m):
  """fairseq's loop: unique_consecutive of the argmax over the valid frames."""
  pred = x.argmax(-1)[:m.sum()]
  runs, start = [], 0
  for i in range(1, len(pred) + 1):
    if i == len(pred) or pred[i] != pred[i - 1]:
      runs.append(np.arange(start, i))
      start = i
  return runs


def test_join_segment_mean_matches_the_reference_loop():
  x, mask = _logits()
  out, smask, n = jax.jit(segment.join_segment, static_argnames='mean')(x, mask, mean=True)
  for b in range(len(x)):
    runs = _np_runs(x[b], mask[b])
    assert int(n[b]) == len(runs) and smask[b].sum() == len(runs)
    want = np.stack([x[b, r].mean(0) for r in runs])
    np.testing.assert_allclose(np.asarray(out[b, :len(runs)]), want, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out[b, len(runs):]) == 0)


def test_join_segment_random_member_is_uniform_and_differentiable():
  x, mask = _logits(1, b=2)
  f = jax.jit(jax.vmap(lambda k: segment.join_segment(x, mask, k)[0]))
  outs = np.asarray(f(jax.random.split(jax.random.key(0), 400)))  # [R, B, T, V]
  runs = _np_runs(x[0], mask[0])
  longest = max(runs, key=len)
  s = next(i for i, r in enumerate(runs) if r is longest)
  # Every draw is exactly one member frame of the segment; each member is drawn about equally.
  which = [int(np.flatnonzero((x[0, longest] == o[0, s]).all(-1))[0]) for o in outs]
  freq = np.bincount(which, minlength=len(longest)) / len(which)
  assert len(longest) >= 2 and np.all(np.abs(freq - 1 / len(longest)) < 0.1), freq
  # Gradient reaches exactly the selected frames.
  g = jax.grad(lambda z: jnp.sum(segment.join_segment(z, mask, jax.random.key(3))[0]))(x)
  picked = np.abs(np.asarray(g)).sum(-1) > 0  # [B, T]
  for b in range(2):
    assert picked[b].sum() == len(_np_runs(x[b], mask[b])) and not picked[b][~mask[b]].any()


def test_code_and_prob_perplexity_match_numpy():
  x, mask = _logits(2)
  code, prob = jax.jit(gan.code_perplexity)(x, mask)
  v = x[mask]
  hard = np.bincount(v.argmax(-1), minlength=x.shape[-1]) / len(v)
  soft = np.exp(v - v.max(-1, keepdims=True))
  soft = (soft / soft.sum(-1, keepdims=True)).mean(0)
  ent = lambda p: -(p * np.log(p + 1e-7)).sum()  # noqa: E731
  np.testing.assert_allclose(float(code), np.exp(ent(hard)), rtol=1e-5)
  np.testing.assert_allclose(float(prob), np.exp(ent(soft)), rtol=1e-5)
  assert 1 <= float(code) <= x.shape[-1]


def test_smoothness_penalty_matches_numpy():
  x, mask = _logits(3)
  d = (x[:, 1:] - x[:, :-1]) ** 2
  d[~mask[:, 1:]] = 0
  np.testing.assert_allclose(float(gan.smoothness_penalty(x, mask)), d.mean(), rtol=1e-6)


def test_masked_batch_norm_matches_torch_on_valid_frames():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(4)
  x = rng.normal(2.0, 3.0, size=(3, 7, 5)).astype(np.float32)
  mask = np.arange(7)[None] < np.array([7, 4, 2])[:, None]
  scale, bias = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
  mean, var = rng.normal(size=5).astype(np.float32), rng.random(5).astype(np.float32) + 0.5
  bn = torch.nn.BatchNorm1d(5)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(scale))
    bn.bias.copy_(torch.from_numpy(bias))
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
  for train in (True, False):
    bn.train(train)
    with torch.no_grad():
      want = x.copy()
      want[mask] = bn(torch.from_numpy(x[mask])).numpy()
    y, (m2, v2) = gan.masked_batch_norm(x, mask, scale, bias, mean, var, train=train)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m2), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v2), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    mean, var = np.asarray(m2), np.asarray(v2)


def test_gradient_penalty_matches_torch_autograd():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(5)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  real = rng.random((3, 6, 4)).astype(np.float32)
  fake = rng.random((2, 9, 4)).astype(np.float32)  # cropped to batch 2, length 6

  def d_jax(z):  # a nonlinear per-utterance score [B]
    return jnp.mean(jnp.tanh(z @ w).sum(-1) ** 2, axis=1)

  key = jax.random.key(0)
  got = float(gan.gradient_penalty(d_jax, real, fake, key))
  alpha = np.asarray(jax.random.uniform(key, (2, 1, 1)))
  x = torch.tensor(alpha * real[:2, :6] + (1 - alpha) * fake[:2, :6], requires_grad=True)
  y = (torch.tanh(x @ torch.from_numpy(w)).sum(-1) ** 2).mean(1)
  (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
  want = ((g.norm(2, dim=1) - 1) ** 2).sum().item()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Differentiable with respect to D's parameters (second order).
  gw = jax.grad(lambda w_: gan.gradient_penalty(
    lambda z: jnp.mean(jnp.tanh(z @ w_).sum(-1) ** 2, axis=1), real, fake, key))(w)
  assert np.all(np.isfinite(np.asarray(gw))) and np.abs(np.asarray(gw)).sum() > 0
