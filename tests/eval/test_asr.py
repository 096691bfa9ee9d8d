"""Edit distance and PER/WER/CER against hand-checked values (jiwer/sclite definitions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxspeech.eval import asr


@pytest.mark.parametrize('ref,hyp,want', [
  ('kitten', 'sitting', 3),  # k->s, e->i, +g
  ('flaw', 'lawn', 2),  # -f, +n
  ('intention', 'execution', 5),  # the textbook example with unit substitution cost
  ('', 'abc', 3),
  ('abc', '', 3),
  ('', '', 0),
  ('same', 'same', 0),
  ('ab', 'ba', 2),  # no transpositions in Levenshtein
])
def test_edit_distance_hand_checked(ref, hyp, want):
  assert asr.edit_distance(ref, hyp) == want
  assert asr.edit_distance(hyp, ref) == want  # symmetric with unit costs


def _brute(ref, hyp):
  """Minimum edits by the recursive definition (exponential; tiny inputs only)."""
  if not ref:
    return len(hyp)
  if not hyp:
    return len(ref)
  return min(_brute(ref[1:], hyp) + 1, _brute(ref, hyp[1:]) + 1,
             _brute(ref[1:], hyp[1:]) + (ref[0] != hyp[0]))


def test_edit_distance_matches_recursive_definition_on_all_short_strings():
  words = [''.join(p) for n in range(4) for p in itertools.product('ab', repeat=n)]
  for ref in words:
    for hyp in words:
      assert asr.edit_distance(ref, hyp) == _brute(ref, hyp), (ref, hyp)


def test_edit_distance_on_token_lists():
  assert asr.edit_distance(['the', 'cat', 'sat'], ['the', 'bat', 'sat', 'down']) == 2
  assert asr.edit_distance(['sh', 'iy'], ['sh', 'iy']) == 0


def test_wer_is_corpus_level():
  # utt 1: 'a' for 'the' (1 sub) + 'sat' deleted = 2 of 3; utt 2: 1 insertion over 2 words.
  refs = ['the cat sat', 'hello world']
  hyps = ['a cat', 'hello big world']
  assert asr.wer(refs, hyps) == pytest.approx(3 / 5)
  assert asr.wer(['a b c'], ['a b c']) == 0.0
  assert asr.wer(['one'], ['two three four']) == pytest.approx(3.0)  # can exceed 1


def test_cer_counts_spaces_and_normalises_whitespace():
  assert asr.cer(['abc'], ['abd']) == pytest.approx(1 / 3)
  assert asr.cer(['a b'], ['ab']) == pytest.approx(1 / 3)  # the space is a character
  assert asr.cer(['a  b '], ['a b']) == 0.0  # runs of whitespace collapse


def test_per_on_phone_strings():
  assert asr.per(['D @ k { t', 's I t'], ['D @ k { t s', 's t']) == pytest.approx(2 / 8)


def test_error_rate_errors():
  with pytest.raises(ValueError, match='2 references but 1'):
    asr.error_rate([['a'], ['b']], [['a']])
  with pytest.raises(ValueError, match='no token'):
    asr.error_rate([[]], [['a']])


def test_edit_distance_random_bounds():
  rng = np.random.default_rng(0)
  for _ in range(50):
    a = list(rng.integers(0, 3, rng.integers(0, 8)))
    b = list(rng.integers(0, 3, rng.integers(0, 8)))
    d = asr.edit_distance(a, b)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
