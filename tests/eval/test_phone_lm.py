"""Interpolated Kneser-Ney phone LM vs hand-computed values, normalisation, sampling, save /
load, and wav2vec-U's weighted LM perplexity."""

import math

import numpy as np
import pytest

from jaxspeech.eval.phone_lm import DISCOUNT, EOS, PhoneLM, weighted_lm_ppl

SEQS = [['a', 'b', 'a'], ['a', 'b', 'b', 'c'], ['b', 'a'], ['c', 'a', 'b']]


def test_bigram_matches_hand_computed_kneser_ney():
  lm = PhoneLM.fit(SEQS, order=2)
  d = DISCOUNT
  outcomes = 4  # a, b, c, </s>
  # Unigram continuation counts: distinct left neighbours (with <s>) of each symbol.
  # a: <s>,b,c -> 3; b: a,b,<s> -> 3; c: <s>,b -> 2; </s>: a,c,b -> 3; total 11 over 4 types.
  p_uni = {'a': 3, 'b': 3, 'c': 2, EOS: 3}
  uni = {w: (n - d) / 11 + d * 4 / 11 / (outcomes + 1) for w, n in p_uni.items()}
  # Bigram counts after 'a': a b x3, a </s> x2 -> total 5, 2 types.
  want = (3 - d) / 5 + d * 2 / 5 * uni['b']
  assert math.isclose(lm.prob(['a'], 'b'), want, rel_tol=1e-12)
  want_c = 0 / 5 + d * 2 / 5 * uni['c']
  assert math.isclose(lm.prob(['x', 'a'], 'c'), want_c, rel_tol=1e-12)


@pytest.mark.parametrize('order', [1, 2, 3, 4])
def test_distributions_sum_to_one(order):
  lm = PhoneLM.fit(SEQS, order=order)
  for hist in ([], ['a'], ['b', 'b'], ['c', 'a', 'b'], ['zzz']):
    total = sum(lm.prob(hist, w) for w in lm.vocab + [EOS]) + lm.prob(hist, '<unk-phone>')
    assert math.isclose(total, 1.0, rel_tol=1e-9), (order, hist, total)


def test_perplexity_sampling_and_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  data = [list('abcab' if rng.random() < 0.5 else 'cba') for _ in range(200)]
  lm = PhoneLM.fit(data, order=4)  # 4: 'ab' is followed by 'c' or the end
  # A two-sentence language: in-domain perplexity near 1, shuffled phones far higher.
  assert lm.perplexity(data[:20]) < 1.5
  shuffled = [list(rng.permutation(s)) for s in data[:20]]
  assert lm.perplexity(shuffled) > 2 * lm.perplexity(data[:20])
  samples = lm.sample(np.random.default_rng(1), 50)
  assert sum(''.join(s) in ('abcab', 'cba') for s in samples) >= 45
  lm.save(str(tmp_path / 'lm.json'))
  back = PhoneLM.load(str(tmp_path / 'lm.json'))
  assert back.perplexity(shuffled) == lm.perplexity(shuffled)
  assert lm.unigram_counts()['a'] == sum(s.count('a') for s in data)
  (tmp_path / 'bad.json').write_text('{"order": 2}')
  with pytest.raises(ValueError, match='bad.json'):
    PhoneLM.load(str(tmp_path / 'bad.json'))


def test_weighted_lm_ppl_penalises_a_small_vocabulary():
  lm = PhoneLM.fit(SEQS, order=2)
  hyps = [['a', '_', 'b'], ['c']]
  out = weighted_lm_ppl(hyps, lm)
  assert math.isclose(out['lm_ppl'], lm.perplexity([['a', 'b'], ['c']]))
  assert out['vocab_seen'] == 1.0 and out['weighted_lm_ppl'] == out['lm_ppl']
  few = weighted_lm_ppl([['a', 'b', 'a']], lm)
  assert math.isclose(few['vocab_seen'], 2 / 3)
  assert math.isclose(few['weighted_lm_ppl'], few['lm_ppl'] / (2 / 3) ** 2)
  assert weighted_lm_ppl([[]], lm)['weighted_lm_ppl'] == math.inf
