"""Chaos: a 200-step run SIGKILLed 20 times at random moments (start-up, k-means set-up, training,
asynchronous checkpoint saves, metrics writes), each time simply re-run, ends bit-identical to an
uninterrupted run: the same parameters and optimizer state, and metrics.jsonl with every step
exactly once and the same losses. Slow (several minutes):
`pytest -m slow tests/train/test_chaos.py`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.train.common import REPO, read_metrics

NUM_STEPS = 200
KILLS = int(os.environ.get('JAXSPEECH_CHAOS_KILLS', 20))

_SCRIPT = textwrap.dedent('''
  import sys
  from tests.train.common import small_config
  from jaxspeech.train import trainer
  config = small_config(**{'train.num_steps': NUM_STEPS, 'train.checkpoint_every': 10,
                           'train.keep_checkpoints': 2, 'train.log_every': 1})
  trainer.train_and_evaluate(config, sys.argv[1])
''').replace('NUM_STEPS', str(NUM_STEPS))


def _start(workdir) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=1')
  return subprocess.Popen([sys.executable, '-c', _SCRIPT, str(workdir)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_state(workdir) -> dict[str, np.ndarray]:
  """Every array of the last checkpoint's train state (params, optimizer state, extra), as
  stored, by path."""
  import jax
  import orbax.checkpoint as ocp

  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(NUM_STEPS), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_twenty_random_sigkills_end_bit_identical(tmp_path):
  ref = _start(tmp_path / 'ref')
  t0 = time.perf_counter()
  _, err = ref.communicate(timeout=1200)
  ref_s = time.perf_counter() - t0
  assert ref.returncode == 0, err[-3000:]

  rng = random.Random(0)
  chaos = tmp_path / 'chaos'

  def logged() -> int:
    return max((r['step'] for r in read_metrics(chaos)), default=0) if (
      chaos / 'metrics.jsonl').exists() else 0

  kills = []
  for i in range(KILLS):
    p = _start(chaos)
    if i % 5 == 4:  # every fifth kill at a random moment of start-up / restore / set-up
      when = f'{rng.uniform(1.0, 12.0):.1f}s'
      time.sleep(float(when[:-1]))
    else:  # the others a random 0-300 ms after a random step 1-15 steps ahead
      target = min(logged() + rng.randint(1, 15), NUM_STEPS - 1)
      when = f'step {target}'
      while logged() < target and p.poll() is None:
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.3))
    p.send_signal(signal.SIGKILL)
    p.wait()
    kills.append((when, p.returncode, logged()))
    if p.returncode == 0:  # finished before its kill
      break
  last = _start(chaos)
  _, err = last.communicate(timeout=1200)
  assert last.returncode == 0, err[-3000:]
  print(f'uninterrupted run {ref_s:.1f} s; (kill point, exit code, last logged step) per kill:',
        kills)
  assert sum(rc == -signal.SIGKILL for _, rc, _ in kills) >= min(KILLS, 10)

  want, got = _final_state(tmp_path / 'ref'), _final_state(chaos)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  ref_rows, rows = read_metrics(tmp_path / 'ref'), read_metrics(chaos)
  assert [r['step'] for r in rows] == list(range(1, NUM_STEPS + 1))
  for key in ('loss', 'grad_norm', 'data_crc'):
    assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
  history = [json.loads(x) for x in open(chaos / 'history.jsonl')]
  print('segments (start step):', [h['start_step'] for h in history if h['event'] == 'start'])
