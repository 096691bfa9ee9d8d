"""benchmarks/cmcm_study.py: the summary, checks, tables and the co-occurrence PNG from hand-made
runs (fast), and a 3-step run of both variants end to end (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import cmcm_study


def _run(variant, seed, base):
  r = {'variant': variant, 'seed': seed, 'cmcm_weight': 1.0 if variant == 'on' else 0.0,
       'wall_s': 100.0 + seed, 'train_loss': 1.0, 'num_audio': 1000.0, 'num_images': 359.0,
       'codebook/size': 64.0}
  for i, p in enumerate(('', 'summary/', 'codes/')):
    for d in ('a2i', 'i2a'):
      for k in (1, 5, 10):
        r[f'{p}{d}/R@{k}'] = base + 0.01 * seed + 0.02 * k - 0.05 * i
        r[f'chance/{d}/R@{k}'] = 1 - 0.9 ** k
  for k in ('used_audio', 'used_visual', 'used_both', 'used_both_1pct', 'same_class_1pct'):
    r[f'codebook/{k}'] = 10.0 + seed
  return r


def test_summary_checks_and_tables():
  runs = [_run(v, s, 0.5 if v == 'on' else 0.4) for s in (0, 1, 2) for v in ('on', 'off')]
  summary = cmcm_study.summarize(runs)
  s = summary['on']['a2i/R@1']
  assert s['mean'] == pytest.approx(0.52 + 0.01) and s['n'] == 3
  assert s['std'] == pytest.approx(0.01) and (s['min'], s['max']) == (0.52, 0.54)
  c = cmcm_study.checks(runs, summary)
  assert c['above_chance'] is True
  assert c['cmcm_minus_off']['a2i/R@1'] == pytest.approx(0.1)
  runs[1]['i2a/R@1'] = 0.05  # one run below chance (0.1)
  assert cmcm_study.checks(runs, cmcm_study.summarize(runs))['above_chance'] is False
  md = cmcm_study.tables(runs, summary)
  assert '| CMCM on | 53.0 ± 1.0 |' in md
  assert '| chance | 10.0 | 41.0 | 65.1 | 10.0 | 41.0 | 65.1 | - | - |' in md


def test_cooccurrence_png(tmp_path):
  from PIL import Image

  v, k = 16, 10
  audio = np.zeros((v, k), int)
  visual = np.zeros((v, k), int)
  for d in range(k):  # codeword d means digit d in both modalities; 12-15 audio only
    audio[d, d], visual[d, d] = 50, 20
  audio[12:, 3] = 5
  path = str(tmp_path / 'c.png')
  w, h = cmcm_study.draw_cooccurrence({'audio': audio, 'visual': visual}, path, 'test')
  img = np.asarray(Image.open(path).convert('RGB'))
  assert img.shape == (h, w, 3)
  assert h > 14 * 14  # one row per used codeword: 10 shared + 4 audio-only
  # The darkest blue of each panel: a full-probability cell (P(digit | codeword) = 1).
  assert (np.all(img == (0, 76, 255), axis=-1)).sum() > 20 * 12 * 12


@pytest.mark.slow  # ~50 s: 2 compilations, the test split's MFCCs, 4 evaluations
def test_three_step_study_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXSPEECH_CACHE', str(tmp_path / 'cache'))
  out = tmp_path / 'study'
  assert cmcm_study.main(['--out', str(out), '--steps', '3', '--seeds', '0']) == 0
  res = json.loads((out / 'results.json').read_text())
  assert res['steps'] == 3 and {r['variant'] for r in res['runs']} == {'on', 'off'}
  for r in res['runs']:
    assert 0.0 <= r['a2i/R@1'] <= 1.0 and r['num_audio'] == 1000
    assert np.asarray(r['cooccurrence']['audio']).shape == (64, 10)
    assert np.asarray(r['cooccurrence']['audio']).sum() > 1000  # every valid unit counted
  for v in ('on', 'off'):
    assert os.path.getsize(out / f'cooccurrence_{v}.png') > 1000
  assert 'chance' in (out / 'results.md').read_text()
