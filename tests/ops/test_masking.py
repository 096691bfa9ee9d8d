"""Span masks: exact count, padding never masked, determinism, span structure."""

import chex
import jax
import numpy as np

from jaxspeech.ops.masking import apply_span_mask, num_masked_frames, span_mask


def _mask(lengths, t):
  return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def _runs(row):
  """Lengths of the runs of True in a 1-d bool array."""
  padded = np.concatenate([[False], row, [False]]).astype(int)
  d = np.diff(padded)
  return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def test_exact_count_and_no_padding():
  lengths = np.array([200, 137, 64, 9, 1, 0, 10, 11])
  valid = _mask(lengths, 200)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(key, m):
    return span_mask(key, m, 0.8, 10)

  for seed in range(5):
    m = np.asarray(f(jax.random.key(seed), valid))
    assert not np.any(m & ~valid)
    want = np.asarray(num_masked_frames(lengths, 0.8, 10))
    np.testing.assert_array_equal(m.sum(-1), want)
  # The count formula: expected coverage of spans opened with prob p/span per start, at least one
  # span (min_spans=1), never more than L.
  cov = 1 - (1 - 0.8 / 10) ** 10
  want = np.clip(np.maximum(np.round(lengths * cov), np.minimum(10, lengths)), 0, lengths)
  np.testing.assert_array_equal(np.asarray(num_masked_frames(lengths)), want)


def test_deterministic_for_key_and_varies_with_key():
  valid = _mask([120, 80], 120)
  a = np.asarray(span_mask(jax.random.key(3), valid))
  b = np.asarray(span_mask(jax.random.key(3), valid))
  c = np.asarray(span_mask(jax.random.key(4), valid))
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


def test_masks_are_unions_of_spans():
  t, span = 400, 10
  valid = _mask([400, 250, 120], t)
  m = np.asarray(span_mask(jax.random.key(0), valid, 0.8, span))
  for row, length in zip(m, [400, 250, 120]):
    runs = _runs(row)
    # Union of whole spans plus at most one partial span: at most one run is shorter than span.
    assert np.sum(runs < span) <= 1, runs
    # Masked frames sit inside the valid prefix and overall close to the target fraction.
    assert row[length:].sum() == 0
  # Over many keys, every valid position gets masked sometimes (no blind spots at the edges).
  keys = jax.random.split(jax.random.key(1), 200)
  many = np.asarray(jax.vmap(lambda k: span_mask(k, valid[:1]))(keys))[:, 0]
  freq = many.mean(0)
  # As in fairseq, frame 0 is only covered by a span starting at 0 (probability ~p/span = 0.08);
  # 0.02 is three standard errors below that for 200 draws.
  assert freq.min() > 0.02, freq.min()
  np.testing.assert_allclose(freq.mean(), float(num_masked_frames(np.array([400]))[0]) / 400)
  assert freq[span:-span].mean() >= freq.mean()


def test_apply_span_mask():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 30, 4)).astype(np.float32)
  valid = _mask([30, 20], 30)
  m = np.asarray(span_mask(jax.random.key(0), valid))
  emb = np.arange(4, dtype=np.float32)
  y = np.asarray(apply_span_mask(x, m, emb))
  np.testing.assert_array_equal(y[m], np.broadcast_to(emb, (m.sum(), 4)))
  np.testing.assert_array_equal(y[~m], x[~m])
