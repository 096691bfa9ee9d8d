"""The evaluation registry: unknown tasks are errors naming them, a task run through the registry
equals the same task through `python -m jaxspeech.evaluate` and through a run's own manifest
(`config.evals`), and `due` schedules entries by `every` and the last step."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from jaxspeech import evaluate
from jaxspeech.eval import common, registry
from jaxspeech.eval.registry import EvalError

PHONES = ('a', 'i', 's', 'm')


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
  """8 utterances of 2 speakers: 0.1 s segments of tones (vowels) and noise (s, m), with their
  alignments; every utterance is 'sil' + 9 segments + 'sil'."""
  d = tmp_path_factory.mktemp('tones')
  rng = np.random.default_rng(0)
  sr, seg = 16000, 1600
  rows = []
  for i in range(8):
    phones = [PHONES[j] for j in rng.integers(0, len(PHONES), 9)]
    pitch = 1.0 if i % 2 else 1.3  # speaker
    parts, ali = [np.zeros(seg, np.float32)], [['sil', 0.0, 0.1]]
    t = np.arange(seg) / sr
    for k, p in enumerate(phones):
      if p in ('a', 'i'):
        f0 = pitch * (300 if p == 'a' else 800)
        x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2 * f0 * t)
      else:
        x = (0.2 if p == 's' else 0.05) * rng.normal(size=seg)
      parts.append(x.astype(np.float32))
      ali.append([p, 0.1 * (k + 1), 0.1 * (k + 2)])
    parts.append(np.zeros(seg, np.float32))
    ali.append(['sil', 1.0, 1.1])
    wav = np.concatenate(parts) + 1e-3 * rng.normal(size=11 * seg).astype(np.float32)
    sf.write(d / f'u{i}.wav', wav, sr)
    rows.append({'path': f'u{i}.wav', 'n_samples': len(wav), 'sample_rate': sr,
                 'speaker': f's{i % 2}', 'alignment': ali, 'split': 'test' if i < 6 else 'x'})
  path = d / 'manifest.jsonl'
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


def test_unknown_task_is_an_error_naming_it(manifest, capsys):
  ctx = common.mfcc_context()
  with pytest.raises(EvalError, match='nosuchtask'):
    registry.run_task(ctx, 'nosuchtask')
  with pytest.raises(EvalError, match="'Bad-Name' is not a valid name"):
    registry.run_task(ctx, 'Bad-Name')
  with pytest.raises(EvalError, match='has no run'):
    registry.run_task(ctx, 'common')  # a module of jaxspeech/eval that is not a task
  rc = evaluate.main(['--checkpoint', 'mfcc', '--manifest', manifest, '--task', 'nosuchtask'])
  _, err = capsys.readouterr()
  assert rc == 2 and 'nosuchtask' in err  # a user error: one line, exit 2
  # A task the model cannot do names the missing prediction.
  with pytest.raises(EvalError, match="no 'logits' prediction"):
    registry.run_task(ctx, 'ctc', manifest=manifest)


def test_registry_equals_cli_and_the_runs_own_manifest(manifest, capsys):
  ctx = common.mfcc_context()
  direct = registry.run_task(ctx, 'units', manifest=manifest, split='test', k=6)
  assert set(direct) == {'pnmi', 'phone_purity', 'cluster_purity', 'speaker_nmi'}
  assert 0.2 < direct['pnmi'] < 1.0  # tones and noise bursts: MFCC k-means finds the phones
  rc = evaluate.main(['--checkpoint', 'mfcc', '--manifest', manifest, '--task', 'units',
                      '--split', 'test', '--k', '6'])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert json.loads(out) == direct
  # During training (`config.evals`) a task reads the run's own manifest and split.
  config = ml_collections.ConfigDict({'data': {'manifest': manifest, 'split': 'test'}})
  method = common.MfccBaseline(config)
  in_run = registry.EvalContext(config=config, method=method, model=None, extra={},
                                predict=method.predict_fns(None, {}), normalize=False)
  assert registry.run_task(in_run, 'units', k=6) == direct
  out = registry.run_evals(in_run, {'u': {'task': 'units', 'every': 5, 'k': 6}})
  assert out == {f'eval/u/{k}': v for k, v in direct.items()}
  # A flag the task does not take is an error naming it.
  rc = evaluate.main(['--checkpoint', 'mfcc', '--manifest', manifest, '--task', 'speaker_probe',
                      '--k', '6'])
  _, err = capsys.readouterr()
  assert rc == 2 and '--k does not apply to --task speaker_probe' in err


def test_due_every_last_step_and_never():
  config = ml_collections.ConfigDict({
    'train': {'eval_every': 4},
    'evals': {'a': {'task': 'units', 'every': 3}, 'never': {'task': 'abx', 'every': 0},
              'default': {'task': 'speaker_probe'}},
  })
  assert registry.entries(config)['default']['every'] == 4  # config.train.eval_every
  due = {s: sorted(registry.due(config, s, 10)) for s in range(1, 11)}
  assert due == {1: [], 2: [], 3: ['a'], 4: ['default'], 5: [], 6: ['a'], 7: [],
                 8: ['default'], 9: ['a'], 10: ['a', 'default']}  # 10: the last step
  config.train.eval_every = 0  # entries without `every` never run, not even at the end
  assert sorted(registry.due(config, 10, 10)) == ['a']
  assert registry.due(ml_collections.ConfigDict({'train': {'eval_every': 2}}), 2, 2) == {}
  with pytest.raises(ValueError, match='config.evals.x: no `task`'):
    registry.entries(ml_collections.ConfigDict({'train': {}, 'evals': {'x': {'every': 1}}}))
