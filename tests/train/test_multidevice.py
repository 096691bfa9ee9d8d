"""1 device vs 8 fake CPU devices (data-parallel and data x fsdp): the same losses for 5 steps.

Each side runs in its own interpreter because the device count is fixed when jax is imported.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np

from tests.train.common import run_python

NUM_STEPS = 5

_SCRIPT = textwrap.dedent('''
  import json, sys
  import jax
  from tests.train.common import small_config, read_metrics
  from jaxspeech.train import trainer, step as step_lib, partitioning
  from jaxspeech.methods.base import get_method
  out = {}
  for name, shape in json.loads(sys.argv[1] if len(sys.argv) > 1 else '{SHAPES}').items():
    config = small_config(**{'train.num_steps': {NUM_STEPS}, 'mesh.shape': shape})
    workdir = '{TMP}/' + name
    trainer.train_and_evaluate(config, workdir)
    # Where the parameters actually live: the shardings the state was created with.
    setup = step_lib.build_setup(config, get_method(config),
                                 partitioning.create_mesh(config.mesh))
    specs = [s.spec for s in jax.tree.leaves(setup.state_shardings['params'])]
    out[name] = {'losses': [r['loss'] for r in read_metrics(workdir)],
                 'devices': jax.device_count(), 'sharded_params': sum(
                   any(a is not None for a in s) for s in specs)}
  print('RESULT ' + json.dumps(out))
''').replace('{NUM_STEPS}', str(NUM_STEPS))


def _run(tmp_path, devices, shapes):
  code = _SCRIPT.replace('{SHAPES}', json.dumps(shapes)).replace('{TMP}', str(tmp_path))
  proc = run_python(code, devices=devices, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def test_one_vs_eight_devices_same_losses(tmp_path):
  one = _run(tmp_path / 'one', 1, {'single': {'data': 1, 'fsdp': 1, 'model': 1}})
  eight = _run(tmp_path / 'eight', 8, {
    'data8': {'data': 8, 'fsdp': 1, 'model': 1},
    'data4_fsdp2': {'data': 4, 'fsdp': 2, 'model': 1},
  })
  ref = np.asarray(one['single']['losses'])
  assert one['single']['devices'] == 1 and len(ref) == NUM_STEPS
  assert np.all(np.isfinite(ref))
  assert eight['data8']['sharded_params'] == 0  # pure data parallel: params replicated
  assert eight['data4_fsdp2']['sharded_params'] > 0  # fsdp really shards parameters
  for name in ('data8', 'data4_fsdp2'):
    got = np.asarray(eight[name]['losses'])
    assert eight[name]['devices'] == 8 and got.shape == ref.shape
    rel = np.abs(got - ref) / np.abs(ref)
    print(f'{name}: losses {got.tolist()} vs 1 device {ref.tolist()}')
    print(f'{name}: max relative loss difference vs 1 device over {NUM_STEPS} steps: '
          f'{rel.max():.2e}')
    np.testing.assert_array_less(rel, 1e-5)
  # The losses move (the step really updates parameters), so agreement is not trivial.
  assert len(set(np.round(ref, 6))) == NUM_STEPS
