"""The paired audio-visual manifest (FSDD x load_digits): test speakers and test images unseen in
training, pairs of one class, every image of a split used about equally, reproducible by seed."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from data_pipelines import av_pairs
from tests.data_pipelines.conftest import shared


def _images():
  from data_pipelines.tabular import digits_rows

  return digits_rows(0.2, 0)


def _fake_audio(rng, n_speakers=5, per=40):
  return [{'id': f'{d}_spk{s}_{k}', 'path': f'/x/{d}_spk{s}_{k}.wav', 'n_samples': 4000,
           'sample_rate': 8000, 'speaker': f'spk{s}', 'digit': int(d)}
          for s in range(n_speakers) for k in range(per)
          for d in [rng.integers(0, 10)]]


def _check(rows, audio, images, test_speakers):
  by_id = {a['id']: a for a in audio}
  assert [list(r) for r in rows] == [list(av_pairs.KEYS)] * len(rows)  # the exact row format
  assert sorted(r['id'] for r in rows) == sorted(by_id)  # every clip once
  split = {s: [r for r in rows if r['split'] == s] for s in ('train', 'test')}
  # Speakers: test speakers only in test, the others only in train.
  assert {r['speaker'] for r in split['test']} == set(test_speakers)
  assert not {r['speaker'] for r in split['train']} & set(test_speakers)
  # Images: a test clip only gets test images, a train clip only train images.
  assert all(images[r['image_index']]['split'] == r['split'] for r in rows)
  assert not ({r['image_index'] for r in split['train']}
              & {r['image_index'] for r in split['test']})
  for r in rows:
    a = by_id[r['id']]
    assert r['label'] == a['digit'] == images[r['image_index']]['label']  # one class
    assert r['image'] == images[r['image_index']]['image']
    assert (r['path'], r['speaker']) == (a['path'], a['speaker'])
  # Balance: within a (split, class), images are used equally often (+-1); all are used when
  # there are at least as many clips as images.
  for s, rs in split.items():
    for c in range(10):
      uses = collections.Counter(r['image_index'] for r in rs if r['label'] == c)
      pool = [i for i, im in enumerate(images) if im['split'] == s and im['label'] == c]
      n_clips = sum(uses.values())
      if n_clips >= len(pool):
        assert set(uses) == set(pool)
      assert not uses or max(uses.values()) - min(uses.values()) <= 1


@pytest.mark.parametrize('seed', [0, 1, 7, 123])
def test_pairing_properties_on_random_clips(seed):
  rng = np.random.default_rng(seed)
  audio = _fake_audio(rng)
  images = _images()
  test = av_pairs.choose_test_speakers([a['speaker'] for a in audio], 2, seed)
  rows = av_pairs.pair_rows(audio, images, test, seed)
  _check(rows, audio, images, test)
  assert rows == av_pairs.pair_rows(audio, images, test, seed)  # deterministic
  other = av_pairs.pair_rows(audio, images, test, seed + 1)
  assert [r['image_index'] for r in rows] != [r['image_index'] for r in other]


def test_choose_test_speakers_is_seeded_and_checked():
  spk = ['a', 'b', 'c', 'd', 'e', 'f'] * 3
  picks = {tuple(av_pairs.choose_test_speakers(spk, 2, s)) for s in range(10)}
  assert all(len(set(p)) == 2 and set(p) <= set(spk) for p in picks)
  assert len(picks) > 3  # the seed matters
  assert av_pairs.choose_test_speakers(spk, 2, 3) == av_pairs.choose_test_speakers(spk, 2, 3)
  with pytest.raises(ValueError, match='test_speakers=6'):
    av_pairs.choose_test_speakers(spk, 6, 0)


def test_a_class_without_images_is_an_error():
  audio = [{'id': '3_a_0', 'path': '/x', 'n_samples': 1, 'sample_rate': 8000, 'speaker': 'a',
            'digit': 3}]
  images = [{'image': [0] * 64, 'label': 3, 'split': 'test'}]
  with pytest.raises(ValueError, match='no train image of digit 3'):
    av_pairs.pair_rows(audio, images, [], 0)


def test_real_fsdd_manifest_through_the_cli(tmp_path, capsys):
  root = shared('fsdd')
  out = tmp_path / 'av.jsonl'
  assert av_pairs.main(['--fsdd', root, '--out', str(out), '--seed', '0']) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 3000
  audio = [{'id': r['id'], 'path': r['path'], 'speaker': r['speaker'],
            'digit': int(r['id'].split('_')[0])} for r in rows]  # FSDD: {digit}_{speaker}_{k}
  assert {r['speaker'] for r in rows} == {'george', 'jackson', 'lucas', 'nicolas', 'theo',
                                          'yweweler'}
  test = sorted({r['speaker'] for r in rows if r['split'] == 'test'})
  assert len(test) == 2 and sum(r['split'] == 'test' for r in rows) == 1000
  _check(rows, audio, _images(), test)
  assert all(r['sample_rate'] == 8000 and r['n_samples'] > 0 for r in rows)
  assert 'test speakers' in capsys.readouterr().out
  # The cached manifest (what experiments/uavm.py defaults to) holds the same rows.
  cached = av_pairs.cached_manifest(str(tmp_path / 'cache'), root, seed=0)
  assert [json.loads(line) for line in open(cached)] == rows
  assert av_pairs.cached_manifest(str(tmp_path / 'cache'), root, seed=0) == cached


def test_cli_errors_are_one_line(tmp_path, capsys):
  from jaxspeech.errors import run_cli

  rc = run_cli(av_pairs.main, ['--fsdd', str(tmp_path / 'nope'), '--out', str(tmp_path / 'x')],
               prog='av_pairs')
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith('av_pairs: error:') and 'nope' in err and '\n' not in err
  assert not (tmp_path / 'x').exists()
