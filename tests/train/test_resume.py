"""Pre-emption: a run SIGKILLed after step 4 and restarted equals an uninterrupted 6-step run,
loss for loss and batch for batch (the Grain iterator state is checkpointed with the model)."""

from __future__ import annotations

import signal
import textwrap

import numpy as np

from tests.train.common import read_metrics, run_python

_SCRIPT = textwrap.dedent('''
  from tests.train.common import small_config
  from jaxspeech.train import trainer
  config = small_config(**{OVERRIDES})
  trainer.train_and_evaluate(config, {WORKDIR!r})
''')


def _train(workdir, **overrides):
  base = {'train.num_steps': 6, 'train.checkpoint_every': 2, 'train.keep_checkpoints': 2}
  code = _SCRIPT.replace('{OVERRIDES}', repr({**base, **overrides})).replace(
    '{WORKDIR!r}', repr(str(workdir)))
  return run_python(code, devices=1, timeout=600)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
  full = _train(tmp_path / 'full')
  assert full.returncode == 0, full.stderr[-4000:]

  killed = _train(tmp_path / 'resumed', **{'train.kill_after_step': 4})
  assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
  rows_before = read_metrics(tmp_path / 'resumed')
  assert [r['step'] for r in rows_before] == [1, 2, 3, 4]

  resumed = _train(tmp_path / 'resumed')
  assert resumed.returncode == 0, resumed.stderr[-4000:]

  want = read_metrics(tmp_path / 'full')
  got = read_metrics(tmp_path / 'resumed')
  assert [r['step'] for r in want] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in got] == [1, 2, 3, 4, 5, 6]
  # Same batches in the same order (utterance indices and crop offsets of every step).
  assert [r['data_crc'] for r in got] == [r['data_crc'] for r in want]
  assert len({r['data_crc'] for r in want}) == 6
  w = np.asarray([r['loss'] for r in want])
  g = np.asarray([r['loss'] for r in got])
  print('max |loss difference| resumed vs uninterrupted:', np.abs(g - w).max())
  np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
  for key in ('grad_norm', 'param_norm', 'acc_masked'):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-6)
