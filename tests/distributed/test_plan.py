"""`jaxspeech.train.distributed.plan`: when a run calls `jax.distributed.initialize`, and with
what, for each environment (no cluster needed: the decision is a pure function)."""

from __future__ import annotations

import pytest

from jaxspeech.train.distributed import Plan, plan

_SLURM = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'node[01-02]', 'SLURM_NTASKS': '16',
          'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'}


def test_laptop_is_single_process():
  assert plan('auto', env={}, tpu_present=False) is None
  assert plan('off', env=_SLURM, tpu_present=True) is None


def test_explicit_flags():
  p = plan(coordinator_address='10.0.0.2:1234', num_processes=4, process_id=3, env=_SLURM,
           tpu_present=False)
  assert p == Plan('flags', {'coordinator_address': '10.0.0.2:1234', 'num_processes': 4,
                             'process_id': 3})
  with pytest.raises(ValueError, match=r"\['--num_processes', '--process_id'\] missing"):
    plan(coordinator_address='h:1', env={}, tpu_present=False)
  with pytest.raises(ValueError, match='HOST:PORT'):
    plan(coordinator_address='h', num_processes=2, process_id=0, env={})
  with pytest.raises(ValueError, match='out of range'):
    plan(coordinator_address='h:1', num_processes=2, process_id=2, env={})
  with pytest.raises(ValueError, match='contradicts'):
    plan('off', coordinator_address='h:1', num_processes=2, process_id=0, env={})
  with pytest.raises(ValueError, match='must be one of'):
    plan('maybe', env={})


def test_jax_env_variables():
  env = {'JAX_COORDINATOR_ADDRESS': 'h0:5000', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'}
  assert plan(env=env, tpu_present=False) == Plan(
    'env', {'coordinator_address': 'h0:5000', 'num_processes': 2, 'process_id': 1})


def test_slurm_only_inside_a_multi_task_srun_step():
  assert plan(env=_SLURM, tpu_present=False) == Plan('slurm', {})
  # One task, or the batch script itself (no step node list): a single process.
  assert plan(env={**_SLURM, 'SLURM_NTASKS': '1'}, tpu_present=False) is None
  no_step = {k: v for k, v in _SLURM.items() if k != 'SLURM_STEP_NODELIST'}
  assert plan(env=no_step, tpu_present=False) is None


def test_tpu_vm():
  assert plan(env={'TPU_WORKER_HOSTNAMES': 't1-w-0,t1-w-1'}, tpu_present=False) == Plan('tpu', {})
  assert plan(env={}, tpu_present=True) == Plan('tpu', {})


def test_forced():
  assert plan('on', env={}, tpu_present=False) == Plan('forced', {})
