"""A phone n-gram LM (interpolated Kneser-Ney) and wav2vec-U's unsupervised selection metric.

wav2vec-U scores decoded phone sequences with a 4-gram KenLM phone LM of the unpaired text
(fairseq `scripts/prepare_text.sh`: `lmplz -o 4`). KenLM is a C++ build with no wheel for this
stack, and the phone vocabulary is ~40 symbols, so this is a small pure-Python LM: interpolated
Kneser-Ney with one absolute discount D = 0.75 per order, continuation counts for the lower
orders, and a uniform distribution below the unigrams (so unseen phones get a small, nonzero
probability). Sentences are padded with order-1 `<s>` and end with `</s>`; perplexity counts
the `</s>` of every sentence, as KenLM's (and `w2vu_generate.py`'s `num_words + num_sentences`).

    lm = PhoneLM.fit(sequences, order=4); lm.save('text.lm.json'); PhoneLM.load(...)
    weighted_lm_ppl(hyps, lm) -> {'lm_ppl', 'vocab_seen', 'weighted_lm_ppl'}
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterable, Sequence

import numpy as np

BOS, EOS = '<s>', '</s>'
DISCOUNT = 0.75


class PhoneLM:
  """Interpolated Kneser-Ney n-gram model over phone symbols."""

  def __init__(self, order: int, counts: dict[tuple[str, ...], int]):
    if order < 1:
      raise ValueError(f'PhoneLM: order must be >= 1, got {order}')
    self.order = order
    self.counts = dict(counts)  # top-order n-gram counts (the data)
    self.vocab = sorted({w for g in self.counts for w in g} - {BOS, EOS})
    self._outcomes = self.vocab + [EOS]
    # Per order k: c_k(g) = raw counts at the top order, continuation counts below.
    self._c: dict[int, dict[tuple[str, ...], int]] = {order: self.counts}
    for k in range(order - 1, 0, -1):
      cc: dict[tuple[str, ...], int] = collections.Counter()
      for g in self._c[k + 1]:
        cc[g[1:]] += 1
      self._c[k] = dict(cc)
    # Context totals and distinct followers per order.
    self._tot: dict[int, dict] = {}
    self._types: dict[int, dict] = {}
    for k, c in self._c.items():
      tot, types = collections.Counter(), collections.Counter()
      for g, n in c.items():
        tot[g[:-1]] += n
        types[g[:-1]] += 1
      self._tot[k], self._types[k] = dict(tot), dict(types)
    self._cache: dict[tuple[str, ...], float] = {}

  @classmethod
  def fit(cls, sequences: Iterable[Sequence[str]], order: int = 4) -> PhoneLM:
    counts: dict[tuple[str, ...], int] = collections.Counter()
    for s in sequences:
      toks = [BOS] * (order - 1) + list(s) + [EOS]
      for i in range(order - 1, len(toks)):
        counts[tuple(toks[i - order + 1:i + 1])] += 1
    if not counts:
      raise ValueError('PhoneLM.fit: no sequences')
    return cls(order, counts)

  def prob(self, history: Sequence[str], token: str) -> float:
    """P(token | the last order-1 symbols of history), history padded with <s>."""
    h = ([BOS] * (self.order - 1) + list(history))[len(history):] if self.order > 1 else []
    key = (*h, token)
    p = self._cache.get(key)
    if p is None:
      p = self._cache[key] = self._prob(tuple(h), token)
    return p

  def _prob(self, h: tuple[str, ...], w: str) -> float:
    p = 1.0 / (len(self._outcomes) + 1)  # uniform over the phones, </s> and one unknown
    for k in range(1, self.order + 1):
      ctx = h[len(h) - (k - 1):] if k > 1 else ()
      tot = self._tot[k].get(ctx, 0)
      if tot == 0:
        continue  # unseen context: the lower order's estimate stands
      c = self._c[k].get((*ctx, w), 0)
      p = max(c - DISCOUNT, 0) / tot + DISCOUNT * self._types[k][ctx] / tot * p
    return p

  def log_prob(self, sequence: Sequence[str]) -> float:
    """Natural-log probability of the whole sentence, </s> included."""
    s = list(sequence)
    return sum(math.log(self.prob(s[:i], w)) for i, w in enumerate(s + [EOS]))

  def perplexity(self, sequences: Sequence[Sequence[str]]) -> float:
    n = sum(len(s) + 1 for s in sequences)
    if n == 0:
      raise ValueError('PhoneLM.perplexity: no sequences')
    return math.exp(-sum(self.log_prob(s) for s in sequences) / n)

  def unigram_counts(self) -> dict[str, int]:
    """How often each phone occurs in the fitted text."""
    out: dict[str, int] = collections.Counter()
    for g, n in self.counts.items():
      if g[-1] != EOS:
        out[g[-1]] += n
    return dict(out)

  def sample(self, rng: np.random.Generator, n: int, max_len: int = 200) -> list[list[str]]:
    """`n` sentences drawn from the model (ancestral sampling, stopped at </s>)."""
    out = []
    for _ in range(n):
      s: list[str] = []
      while len(s) < max_len:
        p = np.array([self.prob(s, w) for w in self._outcomes])
        w = self._outcomes[rng.choice(len(p), p=p / p.sum())]
        if w == EOS:
          break
        s.append(w)
      out.append(s)
    return out

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump({'order': self.order, 'discount': DISCOUNT,
                 'counts': [[' '.join(g), n] for g, n in sorted(self.counts.items())]}, f)

  @classmethod
  def load(cls, path: str) -> PhoneLM:
    with open(path) as f:
      d = json.load(f)
    try:
      return cls(int(d['order']), {tuple(g.split(' ')): int(n) for g, n in d['counts']})
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{path}: not a PhoneLM file ({e})') from e


def weighted_lm_ppl(hyps: Sequence[Sequence[str]], lm: PhoneLM, vocab_size: int | None = None,
                    ignore: Sequence[str] = ('_',)) -> dict[str, float]:
  """fairseq `w2vu_generate.py`: lm_ppl of the hypotheses (ignored symbols dropped),
  vocab_seen = distinct phones used / vocab_size (default: the LM's vocabulary without the
  ignored symbols), weighted_lm_ppl = lm_ppl / vocab_seen^2 (inf when nothing is decoded)."""
  hyps = [[p for p in h if p not in ignore] for h in hyps]
  if vocab_size is None:
    vocab_size = len([p for p in lm.vocab if p not in ignore])
  seen = len({p for h in hyps for p in h}) / max(vocab_size, 1)
  ppl = lm.perplexity(hyps) if hyps else float('inf')
  return {'lm_ppl': ppl, 'vocab_seen': seen,
          'weighted_lm_ppl': ppl / seen ** 2 if seen > 0 else float('inf')}
