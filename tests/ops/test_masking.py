"""Span masks: exact count, padding never masked, determinism, span structure; the fairseq style
against a numpy port of fairseq's `compute_mask_indices`."""

import chex
import jax
import numpy as np
import pytest

from jaxspeech.ops import masking
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


# fairseq style --------------------------------------------------------------------------------


def fairseq_reference(rng, lengths, t, mask_prob, span, min_masks=1, require_same_masks=True):
  """numpy port of fairseq `data_utils.compute_mask_indices` (mask_type 'static', no_overlap
  False, idc_select_ver 1, num_mask_ver 2, mask_dropout 0) on right-padded rows of valid lengths
  `lengths` -> [B, T] bool. Rows without valid frames are left out of the same-count minimum, as
  in `fairseq_span_mask` (fairseq never gets one)."""
  kept = []
  for sz in lengths:
    num = max(min_masks, int(mask_prob * sz / float(span) + rng.random()))
    min_len = span
    if sz - min_len <= num:
      min_len = sz - num - 1
    starts = rng.choice(sz - min_len, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
    kept.append(np.unique(idx[idx < sz]))
  out = np.zeros((len(lengths), t), bool)
  target = min((len(k) for k, sz in zip(kept, lengths) if sz > 0), default=0)
  for i, idx in enumerate(kept):
    if require_same_masks and len(idx) > target:
      idx = rng.choice(idx, target, replace=False)
    out[i, idx] = True
  return out


@pytest.mark.parametrize('lengths,mask_prob', [
  ([49] * 8, 0.8),  # the tiny DinoSR batch: 8 crops of 1 s
  ([49], 0.8),  # one crop: no same-count cut
  ([49] * 8, 0.65),
  ([120, 97, 49, 33, 20], 0.8),  # padded rows of different lengths
])
def test_fairseq_masked_share_matches_numpy_port(lengths, mask_prob):
  """Mean masked share over 2000 draws of the batch equals the numpy port's within 4 standard
  errors of the difference (per-draw shares are not binomial: spans and the same-count cut
  correlate the frames, so the bound uses both samples' per-draw variances); the per-row
  masked-count means agree the same way."""
  t, n = max(lengths), 2000
  valid = _mask(lengths, t)
  rng = np.random.default_rng(0)
  ref = np.stack([fairseq_reference(rng, lengths, t, mask_prob, 10) for _ in range(n)])
  f = jax.jit(jax.vmap(lambda k: masking.fairseq_span_mask(k, valid, mask_prob, 10)))
  got = np.asarray(f(jax.random.split(jax.random.key(0), n)))  # [n, B, T]
  share_ref, share = ref.sum((1, 2)) / valid.sum(), got.sum((1, 2)) / valid.sum()  # [n]
  se = np.sqrt(share_ref.var() / n + share.var() / n)
  assert abs(share.mean() - share_ref.mean()) < 4 * se, (share.mean(), share_ref.mean(), se)
  cnt_ref, cnt = ref.sum(-1), got.sum(-1)  # [n, B]
  se_rows = np.sqrt(cnt_ref.var(0) / n + cnt.var(0) / n) + 1e-9
  assert np.all(np.abs(cnt.mean(0) - cnt_ref.mean(0)) < 4 * se_rows)
  # Positions: the per-frame masking frequency has the port's shape (no frame is never masked
  # except those fairseq never masks: the last valid frame of a row, with start range L - span).
  np.testing.assert_allclose(got.mean(0), ref.mean(0), atol=0.05)
  assert not got[:, np.arange(len(lengths)), np.asarray(lengths) - 1].any()


def test_fairseq_mask_properties_and_single_trace():
  lengths = np.array([200, 137, 64, 49, 20, 0, 12, 150])
  valid = _mask(lengths, 200)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(key, m):
    return masking.span_mask(key, m, 0.8, 10, style='fairseq')

  for seed in range(20):
    m = f(jax.random.key(seed), valid)
    assert m.shape == valid.shape and m.dtype == bool
    m = np.asarray(m)
    assert not np.any(m & ~valid)  # padding never masked
    counts = m.sum(-1)
    assert len(set(counts[lengths > 0].tolist())) == 1, counts  # require_same_masks
    assert counts[lengths == 0].sum() == 0 and counts[0] > 0
  # Without the same-count cut rows differ, and each row is a union of whole spans cut at L.
  m = np.asarray(masking.fairseq_span_mask(jax.random.key(0), valid, 0.8, 10,
                                           require_same_masks=False))
  assert len(set(m.sum(-1)[lengths > 0].tolist())) > 1
  for row, length in zip(m, lengths):
    if length >= 20:
      assert np.all(_runs(row) >= 10), _runs(row)
  # Same key, same mask; another key, another mask.
  a, b = np.asarray(f(jax.random.key(3), valid)), np.asarray(f(jax.random.key(3), valid))
  np.testing.assert_array_equal(a, b)
  assert np.any(a != np.asarray(f(jax.random.key(4), valid)))
  with pytest.raises(ValueError, match='unknown style'):
    masking.span_mask(jax.random.key(0), valid, style='fair')
