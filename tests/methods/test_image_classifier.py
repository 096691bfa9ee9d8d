"""A non-encoder model (digit-image classifier on scikit-learn's real 8x8 scans) trains and
evaluates through `main`, the method-declared batch path and the evaluator registry."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.common import REPO


def test_digits_manifest_split_is_seeded_and_disjoint():
  from data_pipelines.tabular import digits_rows

  a, b = digits_rows(seed=0), digits_rows(seed=0)
  assert a == b and len(a) == 1797
  test = [r for r in a if r['split'] == 'test']
  assert len(test) == round(0.2 * 1797)
  assert {r['id'] for r in test} != {r['id'] for r in digits_rows(seed=1) if r['split'] == 'test'}
  assert all(len(r['image']) == 64 and 0 <= r['label'] <= 9 for r in a)


def test_host_fields_check_rows():
  from experiments import digits
  from jaxspeech.methods.image_classifier import ImageClassification

  m = ImageClassification(digits.get_config('tiny'))
  f = m.host_fields({'image': list(range(64)), 'label': 3})
  assert f['image'].shape == (8, 8) and f['image'][1, 0] == 8 and f['label'] == 3
  with pytest.raises(ValueError, match='image has 63 values'):
    m.host_fields({'id': 'bad', 'image': [0] * 63, 'label': 1})
  with pytest.raises(ValueError, match='label 10'):
    m.host_fields({'id': 'bad', 'image': [0] * 64, 'label': 10})


def test_digits_train_and_evaluate_through_main(tmp_path):
  workdir = tmp_path / 'digits'
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAXSPEECH_CACHE=str(tmp_path / 'cache'))
  r = subprocess.run(
    [sys.executable, '-m', 'jaxspeech.main', '--config', 'experiments/digits.py:tiny',
     '--workdir', str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [row for row in rows if 'eval/test/accuracy' in row]
  assert [row['step'] for row in evals] == [300, 600]  # config.train.eval_every = 300
  final = json.loads((workdir / 'final_metrics.json').read_text())
  # 10 balanced classes: chance is 0.1; a small convnet reaches > 0.9 on unseen images.
  assert final['eval/test/accuracy'] > 0.9, final
  assert final['eval/test/num_examples'] == 359
  # The CLI runs the same task on the workdir and gets the same number.
  os.environ['JAXSPEECH_CACHE'] = str(tmp_path / 'cache')
  try:
    from jaxspeech import evaluate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = evaluate.main(['--checkpoint', str(workdir), '--task', 'classification',
                          '--split', 'test'])
  finally:
    del os.environ['JAXSPEECH_CACHE']
  assert rc == 0
  got = json.loads(out.getvalue().strip().splitlines()[-1])
  assert np.isclose(got['accuracy'], final['eval/test/accuracy']), (got, final)
