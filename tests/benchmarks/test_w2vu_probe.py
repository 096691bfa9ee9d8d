"""The wav2vec-U discriminator probe: the perfect generator's output grid, and a discriminator
that separates what differs and not what is the same."""

from __future__ import annotations

from benchmarks.w2vu_probe import grid_phones, probe


def test_grid_phones_drops_phones_shorter_than_the_grid():
  row = {'n_samples': 16000 * 3 // 10, 'sample_rate': 16000,  # 0.3 s = 15 frames
         'alignment': [['a', 0.0, 0.1], ['b', 0.1, 0.13], ['c', 0.13, 0.3]]}
  assert grid_phones(row, 1) == ['a', 'b', 'c']
  # Frame centres every 60 ms: 0.01, 0.07, 0.13, 0.19, 0.25 -> 'b' (30 ms) is never sampled.
  assert grid_phones(row, 3) == ['a', 'c']


def test_probe_separates_shifted_sequences_and_not_identical_ones():
  rng = __import__('numpy').random.default_rng(0)
  text = [[str(x) for x in rng.integers(0, 6, 12)] for _ in range(200)]
  same = probe(text[:100], text[100:], steps=150, seed=0)
  # A different distribution: every sequence ends in a token the text never has.
  other = probe([s + ["z"] for s in text[:100]], text[100:], steps=150, seed=0)
  assert same['accuracy'] < 0.7, same
  assert other['accuracy'] > 0.9, other
