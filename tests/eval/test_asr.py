"""Edit distance and PER/WER/CER against hand-checked values and jiwer 4.0 (WER/CER on strings:
jiwer's tokenisation of whitespace, empty references)."""

from __future__ import annotations

import itertools
import re

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


def test_cer_counts_spaces():
  assert asr.cer(['abc'], ['abd']) == pytest.approx(1 / 3)
  assert asr.cer(['a b'], ['ab']) == pytest.approx(1 / 3)  # the space is a character


NBSP = '\u00a0'


@pytest.mark.parametrize('ref,hyp,want_wer,want_cer', [
  ('a  b', 'a b', 0.0, 1 / 4),  # words: runs of spaces collapse; characters: both spaces count
  ('a\tb', 'a b', 2.0, 1 / 3),  # a lone tab joins "a\tb" into one word (1 sub + 1 ins)
  (f'a{NBSP}b', 'a b', 2.0, 1 / 3),  # so does a lone no-break space
  ('a \t b', 'a b', 0.0, 2 / 5),  # a run of any whitespace is one space between words
  (f' {NBSP}a b\n', 'a b', 0.0, 0.0),  # leading and trailing whitespace stripped
])
def test_wer_cer_whitespace_as_jiwer(ref, hyp, want_wer, want_cer):
  jiwer = pytest.importorskip('jiwer')
  assert asr.wer([ref], [hyp]) == pytest.approx(want_wer)
  assert asr.cer([ref], [hyp]) == pytest.approx(want_cer)
  assert asr.wer([ref], [hyp]) == jiwer.wer(ref, hyp)
  assert asr.cer([ref], [hyp]) == jiwer.cer(ref, hyp)


def test_wer_cer_empty_references_as_jiwer():
  pytest.importorskip('jiwer')
  # Every reference empty (after stripping): the count of hypothesis tokens, not a rate.
  assert asr.wer(['', '  '], ['a b', 'c']) == 3.0
  assert asr.cer(['', '  '], ['a b', 'c']) == 4.0  # 'a', ' ', 'b', 'c'
  assert asr.wer([''], ['']) == 0.0 and asr.cer([''], [' ']) == 0.0
  assert asr.wer([], []) == 0.0
  # An empty reference among others adds insertions and no reference token.
  assert asr.wer(['', 'a b'], ['x', 'a b']) == pytest.approx(1 / 2)
  with pytest.raises(ValueError, match='2 references but 1'):
    asr.wer(['a', 'b'], ['a'])


def _jiwer_words(s):
  """jiwer 4.0's default WER transform, as the module docstring states it."""
  return [w for w in re.sub(r'\s\s+', ' ', s).strip().split(' ') if w]


def test_wer_cer_match_documented_tokenisation_on_random_strings():
  pytest.importorskip('jiwer')
  rng = np.random.default_rng(0)
  alphabet = ['a', 'b', 'c', ' ', ' ', '\t', NBSP, '\n']
  for _ in range(200):
    n = int(rng.integers(1, 4))
    refs = [''.join(rng.choice(alphabet, rng.integers(0, 10))) for _ in range(n)]
    hyps = [''.join(rng.choice(alphabet, rng.integers(0, 10))) for _ in range(n)]
    for tokens, got in ((_jiwer_words, asr.wer(refs, hyps)),
                        (lambda s: list(s.strip()), asr.cer(refs, hyps))):
      r, h = [tokens(x) for x in refs], [tokens(x) for x in hyps]
      edits = sum(asr.edit_distance(a, b) for a, b in zip(r, h))
      total = sum(len(a) for a in r)
      want = edits / total if total else float(sum(len(b) for b in h))
      assert got == pytest.approx(want), (refs, hyps)


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
