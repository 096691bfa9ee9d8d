"""The workdir contract (jaxspeech/train/workdir_contract.py), with the faults injected for real:
re-runs of a finished run, changed configs, a second process on the workdir, a SIGKILLed lock
owner, corrupt checkpoint files, torn metrics lines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.train.common import REPO, read_metrics, small_config


def _tree_digest(workdir, skip=()) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      p = os.path.join(root, name)
      rel = os.path.relpath(p, workdir)
      if rel not in skip:
        with open(p, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _fake_workdir(tmp_path, steps=(4,), **overrides):
  """A workdir with config.json of small_config and empty checkpoint folders `steps`."""
  from jaxspeech.train import workdir_contract as contract

  wd = tmp_path / 'wd'
  (wd / 'checkpoints').mkdir(parents=True)
  for s in steps:
    (wd / 'checkpoints' / str(s)).mkdir()
  (wd / 'checkpoints' / '8.orbax-checkpoint-tmp-123').mkdir()  # an unfinished save: not a step
  contract.record_start(str(wd), small_config(**overrides), 0, {})
  return str(wd)


def test_config_change_is_refused_naming_the_keys(tmp_path):
  from jaxspeech.train import workdir_contract as contract

  wd = _fake_workdir(tmp_path, **{'train.num_steps': 4})
  assert contract.checkpoint_steps(wd) == [4]
  before = _tree_digest(wd)
  with pytest.raises(contract.WorkdirError) as e:
    contract.check_config(wd, small_config(**{'train.num_steps': 4, 'optim.learning_rate': 2e-3,
                                              'model.hidden_size': 32}))
  msg = str(e.value)
  assert '\n' not in msg
  assert 'optim.learning_rate 0.001 -> 0.002' in msg and 'model.hidden_size 64 -> 32' in msg
  assert 'step 4' in msg
  # Run keys may change; num_steps only upwards of the latest checkpoint.
  changed = contract.check_config(wd, small_config(**{'train.num_steps': 9,
                                                      'train.log_every': 3}))
  assert changed == {'train.num_steps': (4, 9), 'train.log_every': (1, 3)}
  with pytest.raises(contract.WorkdirError, match=r'train.num_steps=3 is below .*step 4'):
    contract.check_config(wd, small_config(**{'train.num_steps': 3}))
  assert _tree_digest(wd) == before
  # No checkpoint yet: nothing to protect, the new config simply replaces the old one.
  wd2 = _fake_workdir(tmp_path / 'b', steps=())
  assert contract.check_config(wd2, small_config(**{'optim.learning_rate': 2e-3})) == {}
  # Checkpoints without their config: refused, not guessed.
  os.remove(os.path.join(wd, 'config.json'))
  with pytest.raises(contract.WorkdirError, match='no readable config.json'):
    contract.check_config(wd, small_config())


def test_workdir_that_is_a_file(tmp_path):
  from jaxspeech.train import workdir_contract as contract

  (tmp_path / 'f').write_text('x')
  with pytest.raises(contract.WorkdirError, match='is a file'):
    contract.prepare(str(tmp_path / 'f'))
  with pytest.raises(contract.WorkdirError, match='cannot be created'):
    contract.prepare(str(tmp_path / 'f' / 'sub'))


_HOLD = textwrap.dedent('''
  import sys, time
  from jaxspeech.train.workdir_contract import WorkdirLock
  WorkdirLock(sys.argv[1]).acquire()
  print('locked', flush=True)
  time.sleep(600)
''')


def test_lock_refuses_a_second_run_and_dies_with_its_owner(tmp_path):
  from jaxspeech.train import workdir_contract as contract

  wd = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  owner = subprocess.Popen([sys.executable, '-c', _HOLD, wd], stdout=subprocess.PIPE, env=env,
                           text=True)
  try:
    assert owner.stdout.readline().strip() == 'locked'
    with pytest.raises(contract.WorkdirError) as e:
      contract.WorkdirLock(wd).acquire()
    assert f'pid {owner.pid} on ' in str(e.value) and 'in use by another run' in str(e.value)
  finally:
    owner.send_signal(signal.SIGKILL)
    owner.wait()
  # The owner was SIGKILLed: its lock file is still there (stale), and no longer blocks.
  assert json.load(open(os.path.join(wd, 'lock')))['pid'] == owner.pid
  lock = contract.WorkdirLock(wd).acquire()
  with pytest.raises(contract.WorkdirError):  # held again, now by this process
    contract.WorkdirLock(wd).acquire()
  lock.release()
  contract.WorkdirLock(wd).acquire().release()


def test_metrics_truncated_to_the_restored_step(tmp_path):
  from jaxspeech.train import workdir_contract as contract

  rows = [{'step': s, 'loss': float(s)} for s in (1, 2, 3, 4)] + [{'step': 2, 'eval/x': 1.0}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 5, "lo')  # torn by a kill
  assert contract.truncate_metrics(str(tmp_path), 2) == 3
  assert read_metrics(tmp_path) == [rows[0], rows[1], rows[4]]
  assert contract.metrics_at(str(tmp_path), 2) == {'step': 2, 'loss': 2.0, 'eval/x': 1.0}


# Orbax leaves the sibling reads of a failed restore as never-awaited coroutines.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_workdir_contract_end_to_end(tmp_path):
  """One workdir through a run's life: only the last step checkpointed (checkpoint_every=0), an
  empty re-run, a refused config, a continued run, a corrupt latest checkpoint (refused, then
  the fallback), every step logged once."""
  from jaxspeech import errors
  from jaxspeech.train import trainer
  from jaxspeech.train import workdir_contract as contract

  wd = str(tmp_path / 'run')

  def train(**overrides):
    return trainer.train_and_evaluate(
      small_config(**{'train.checkpoint_every': 0, **overrides}), wd)

  first = train(**{'train.num_steps': 4})
  assert contract.checkpoint_steps(wd) == [4]  # checkpoint_every=0 still keeps the last step
  final = open(os.path.join(wd, 'final_metrics.json')).read()
  assert json.loads(final)['loss'] == first['loss']

  t0 = time.perf_counter()
  again = train(**{'train.num_steps': 4})  # nothing to do: final metrics kept, not rewritten
  assert time.perf_counter() - t0 < 5
  assert again == first
  assert open(os.path.join(wd, 'final_metrics.json')).read() == final

  before = _tree_digest(wd)
  with pytest.raises(contract.WorkdirError, match='optim.learning_rate'):
    train(**{'train.num_steps': 4, 'optim.learning_rate': 5e-3})
  assert _tree_digest(wd) == before  # lock file included: refused before it is taken

  train(**{'train.num_steps': 6, 'train.log_every': 2})  # continue: a new segment
  history = [json.loads(x) for x in open(os.path.join(wd, 'history.jsonl'))]
  assert [(h['start_step'], h['num_steps']) for h in history] == [(0, 4), (4, 6)]
  assert history[1]['changed'] == {'train.num_steps': [4, 6], 'train.log_every': [1, 2]}
  assert contract.checkpoint_steps(wd) == [4, 6]

  # Corrupt the newest checkpoint's array files for real.
  data_dir = os.path.join(wd, 'checkpoints', '6', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), 'r+b') as f:
      f.truncate(10)
  before = _tree_digest(wd, skip=('lock',))
  code = errors.run_cli(train, **{'train.num_steps': 8, 'train.log_every': 2,
                                  'train.allow_fallback': False})
  assert code == errors.USER_EXIT
  assert _tree_digest(wd, skip=('lock',)) == before
  with pytest.raises(contract.WorkdirError, match=r'step 6 cannot be restored .*from step 4'):
    train(**{'train.num_steps': 8, 'train.log_every': 2, 'train.allow_fallback': False})

  train(**{'train.num_steps': 8, 'train.log_every': 2})  # falls back to step 4, redoes 5-8
  assert os.listdir(os.path.join(wd, 'corrupt_checkpoints')) == ['6']
  assert contract.checkpoint_steps(wd) == [4, 8]
  rows = [r for r in read_metrics(wd) if 'loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 6, 8]  # each once (log_every 2 after step 4)
  events = [json.loads(x)['event'] for x in open(os.path.join(wd, 'history.jsonl'))]
  assert events == ['start', 'start', 'fallback', 'start']


@pytest.mark.parametrize('flags, expect', [
  (['--config.train.num_stepz=3'],
   "--config.train.num_stepz: the config has no field 'num_stepz' (did you mean 'num_steps'?)"),
  (['--config.data.manifest=/nonexistent/m.jsonl'], "/nonexistent/m.jsonl"),
  ('WORKDIR_IS_A_FILE', 'is a file, not a folder'),
])
def test_main_reports_user_errors_in_one_line(tmp_path, flags, expect):
  workdir = tmp_path / 'run'
  if flags == 'WORKDIR_IS_A_FILE':
    workdir.write_text('x')
    flags = []
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  p = subprocess.run([sys.executable, '-m', 'jaxspeech.main', '--config',
                      'experiments/hubert.py:tiny', '--workdir', str(workdir), *flags],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  errors = [ln for ln in p.stderr.splitlines() if 'error' in ln.lower()]
  assert len(errors) == 1 and errors[0].startswith('jaxspeech.main: error: '), p.stderr[-3000:]
  assert expect in errors[0]
  assert 'Traceback' not in p.stderr
  assert workdir.is_file() or not workdir.exists()  # nothing left behind
