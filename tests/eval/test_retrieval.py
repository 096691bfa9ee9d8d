"""The `retrieval` evaluation task: recall@k against a numpy argsort reference, the perfect,
reversed and tied cases, exact chance against enumeration and simulation, codebook usage, and
the task on hand-built embeddings (galleries of distinct images, class and pair matching)."""

from __future__ import annotations

import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.eval import retrieval


def _reference_recall(sim, relevant, k):
  """Rank every item by descending similarity (no ties in the inputs); hit = a correct item in
  the first k."""
  order = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  return float(np.mean([relevant[q, order[q]].any() for q in range(len(sim))]))


def test_recall_equals_an_argsort_reference():
  r = np.random.default_rng(0)
  sim = r.normal(size=(40, 30))
  relevant = r.random((40, 30)) < 0.1
  relevant[np.arange(40), r.integers(0, 30, 40)] = True  # every query has a correct item
  got = retrieval.recall_at_k(sim, relevant, ks=(1, 3, 5, 10, 30))
  for k, v in got.items():
    assert v == _reference_recall(sim, relevant, k), k
  assert got[30] == 1.0 and got[1] < got[5] < got[10] < 1.0


def test_perfect_reversed_and_tied_rankings():
  n = 12
  eye = np.eye(n, dtype=bool)
  assert retrieval.recall_at_k(np.eye(n), eye) == {1: 1.0, 5: 1.0, 10: 1.0}
  # The correct item scored lowest: it is found only once all n - 1 others were listed.
  rev = retrieval.recall_at_k(-np.eye(n), eye, ks=(1, 10, n - 1, n))
  assert rev == {1: 0.0, 10: 0.0, n - 1: 0.0, n: 1.0}
  # Ties are broken against the query: a constant similarity finds nothing ...
  assert retrieval.recall_at_k(np.zeros((n, n)), eye, ks=(1, n - 1, n)) == {
    1: 0.0, n - 1: 0.0, n: 1.0}
  # ... and a correct item tied with one incorrect item ranks second.
  sim = np.array([[1.0, 1.0, 0.0]])
  assert retrieval.recall_at_k(sim, np.array([[True, False, False]]), ks=(1, 2)) == {
    1: 0.0, 2: 1.0}
  with pytest.raises(ValueError, match='no correct item'):
    retrieval.recall_at_k(np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]))
  with pytest.raises(ValueError, match='non-finite'):
    retrieval.recall_at_k(np.array([[np.nan, 0.0]]), np.array([[True, False]]))


def test_chance_is_exact():
  # Enumerate every ranking of 6 items, 2 of them correct.
  relevant = np.array([[True, False, True, False, False, False]])
  for k in (1, 2, 3, 5):
    hits = [any(relevant[0, list(p[:k])]) for p in itertools.permutations(range(6))]
    assert retrieval.chance_recall_at_k(relevant, (k,))[k] == pytest.approx(np.mean(hits),
                                                                           abs=1e-12)
  # 10 equal classes: R@1 = 0.1 and R@5 = 1 - C(90, 5) / C(100, 5).
  labels = np.arange(100) % 10
  rel = labels[:, None] == labels[None, :]
  ch = retrieval.chance_recall_at_k(rel)
  assert ch[1] == pytest.approx(0.1)
  assert ch[5] == pytest.approx(1 - math.comb(90, 5) / math.comb(100, 5))
  # Random similarities score chance (4 standard errors over 4,000 queries).
  r = np.random.default_rng(1)
  labels_q = r.integers(0, 10, 4000)
  rel = labels_q[:, None] == labels[None, :]
  got = retrieval.recall_at_k(r.normal(size=rel.shape), rel)
  want = retrieval.chance_recall_at_k(rel)
  for k in (1, 5, 10):
    se = math.sqrt(want[k] * (1 - want[k]) / 4000)
    assert abs(got[k] - want[k]) < 4 * se, (k, got[k], want[k])


def test_codebook_usage_counts():
  codes = {'audio': np.array([[0, 1, 1, 5], [2, 2, 2, 2]]), 'visual': np.array([[1, 3], [2, 0]])}
  masks = {'audio': np.array([[True, True, True, False], [True] * 4]),
           'visual': np.ones((2, 2), bool)}
  labels = {'audio': np.array([0, 1]), 'visual': np.array([0, 1])}
  cc = retrieval.code_class_counts(codes['audio'], masks['audio'], labels['audio'], 6, 2)
  assert cc.tolist() == [[1, 0], [2, 0], [0, 4], [0, 0], [0, 0], [0, 0]]  # code 5 is padding
  s = retrieval.codebook_stats(codes, masks, labels, 6)
  assert s['codebook/used_audio'] == 3 and s['codebook/used_visual'] == 4
  assert s['codebook/used_both'] == 3  # 0, 1, 2
  assert s['codebook/used_both_1pct'] == 3
  # codeword 0: audio digit 0, image digit 1; 1: 0 / 0; 2: 1 / 1
  assert s['codebook/same_class_1pct'] == 2
  p = np.array([1, 2, 4]) / 7
  assert s['codebook/ppl_audio'] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  assert s['codebook/ppl_visual'] == pytest.approx(4.0)


class _Method:
  """Rows -> fields: the digit and a per-image 'look' (its pixels stand for the image)."""

  name = 'fake'

  def row_fields(self):
    return {'label': jax.ShapeDtypeStruct((), jnp.int32),
            'look': jax.ShapeDtypeStruct((), jnp.int32)}

  def host_fields(self, row):
    return {'label': np.int32(row['label']), 'look': np.int32(row['image_index'])}


def _ctx(rows, by='label'):
  """Summaries = one-hot of the row's `by` field (+ noise-free); codes = the label."""

  def pair_embeddings(batch, modality):
    key = batch[by] if by == 'label' else batch['look']
    z = jax.nn.one_hot(key, 64)
    codes = jnp.stack([batch['label'], batch['label']], 1)
    return {'summary': z, 'code_dist': jax.nn.one_hot(batch['label'], 10) * 0.9 + 0.01,
            'codes': codes, 'mask': jnp.ones(codes.shape, bool)}

  def pair_similarity(a, v, part='combined'):
    return a['summary'] @ v['summary'].T

  ctx = types.SimpleNamespace(method=_Method(), rows=lambda *a: rows)
  fns = {'pair_embeddings': pair_embeddings, 'pair_similarity': pair_similarity}
  ctx.need = lambda kind: fns[kind]
  return ctx


def _rows():
  # 30 clips of 10 digits; 12 distinct images (digit i % 10), clips cycling over their images.
  rows = []
  for i in range(30):
    label = i % 10
    image = label if (i // 10) % 2 == 0 or label >= 2 else 10 + label  # 0, 1 have 2 images
    rows.append({'id': f'c{i}', 'label': label, 'image_index': image})
  return rows


def test_task_on_hand_built_embeddings():
  rows = _rows()
  out, arrays = retrieval.retrieval_metrics(_ctx(rows), rows, batch_size=8)
  assert out['num_audio'] == 30 and out['num_images'] == 12  # one gallery item per image
  assert arrays['sim'].shape == (30, 12)
  for d in ('a2i', 'i2a'):
    for k in (1, 5, 10):
      assert out[f'{d}/R@{k}'] == 1.0  # class-identical summaries: perfect class retrieval
  assert out['chance/a2i/R@1'] == pytest.approx(np.mean([2 / 12 if r['label'] < 2 else 1 / 12
                                                         for r in rows]))
  # Pair level: same-class images tie, so the own image of digits 0 and 1 loses the tie.
  assert out['pair/a2i/R@1'] == pytest.approx(24 / 30)
  assert out['pair/a2i/R@5'] == 1.0
  assert out['codebook/used_both'] == 10 and out['codebook/same_class_1pct'] == 10
  # Summaries that identify the image: pair retrieval is perfect too.
  out, _ = retrieval.retrieval_metrics(_ctx(rows, by='look'), rows, batch_size=8)
  assert out['pair/a2i/R@1'] == 1.0 and out['pair/i2a/R@1'] == 1.0
  # i2a, pair level: an image with r of the 30 clips has chance r / 30 at R@1.
  counts = [sum(r['image_index'] == img for r in rows) for img in {r['image_index'] for r in rows}]
  assert sorted(counts) == [1, 1, 2, 2] + [3] * 8
  assert out['pair/chance/i2a/R@1'] == pytest.approx(np.mean(counts) / 30)


@pytest.mark.slow  # ~35 s: a 20-step run of experiments/cmcm.py:tiny, evaluated twice
def test_evaluate_cli_prints_the_numbers_the_run_logged(tmp_path, monkeypatch):
  import contextlib
  import io
  import json

  from experiments import cmcm
  from jaxspeech import evaluate
  from jaxspeech.train import trainer

  monkeypatch.setenv('JAXSPEECH_CACHE', str(tmp_path / 'cache'))
  c = cmcm.get_config('tiny')
  c.train.num_steps = c.train.eval_every = c.train.log_every = 20
  final = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = evaluate.main(['--checkpoint', str(tmp_path / 'w'), '--task', 'retrieval', '--split',
                        'test'])
  assert rc == 0
  got = json.loads(out.getvalue().strip().splitlines()[-1])
  assert got['num_audio'] == 1000 and 300 < got['num_images'] < 400
  for k, v in got.items():
    assert np.isclose(v, final[f'eval/test/{k}']), (k, v, final[f'eval/test/{k}'])
  assert got['chance/a2i/R@1'] == pytest.approx(0.1, abs=0.01)
