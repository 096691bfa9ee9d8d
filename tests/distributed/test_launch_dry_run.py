"""`launch/*` with `--dry-run`: the exact commands they would run, and clear errors for missing
variables. The printed lines are shell words (pasteable); they are parsed back with shlex here."""

from __future__ import annotations

import os
import shlex
import subprocess

from jaxspeech.train.distributed import Plan, plan
from tests.train.common import REPO

TPU = {'TPU_NAME': 'js-v5e-16', 'ZONE': 'us-west4-a', 'ACCELERATOR_TYPE': 'v5litepod-16',
       'CONFIG': 'experiments/hubert.py:paper', 'WORKDIR': 'gs://bucket/hubert base'}


def _run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'TPU_', 'CONFIG', 'WORKDIR', 'NUM_GPUS', 'MODE',
                                'QUEUED', 'KEEP', 'REPO_URL', 'PROJECT'))}
  return subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args],
                        env={**clean, **env}, capture_output=True, text=True, timeout=60)


def _lines(proc) -> list[list[str]]:
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(ln) for ln in proc.stdout.splitlines() if ln and not ln.startswith('#')]


def _remote(words: list[str]) -> str:
  return words[words.index('--command') + 1]


def test_tpu_vm_queued_resource():
  cmds = _lines(_run('tpu_vm.sh', {**TPU, 'QUEUED': '1', 'PROJECT': 'my-proj'}, '--dry-run',
                     '--', '--config.data.manifest=/data/it\'s.jsonl'))
  gc = ['gcloud', '--project', 'my-proj', 'compute', 'tpus']
  assert cmds[0] == gc + ['queued-resources', 'create', 'js-v5e-16', '--node-id', 'js-v5e-16',
                          '--zone', 'us-west4-a', '--accelerator-type', 'v5litepod-16',
                          '--runtime-version', 'v2-alpha-tpuv5-lite']
  assert cmds[1][:7] == gc + ['queued-resources', 'describe']
  assert cmds[-1] == gc + ['queued-resources', 'delete', 'js-v5e-16', '--zone', 'us-west4-a',
                           '--force', '--quiet']
  ssh = [c for c in cmds if c[:7] == gc + ['tpu-vm', 'ssh']]
  assert [c[c.index('--worker=all') if '--worker=all' in c else c.index('--worker=0')]
          for c in ssh] == ['--worker=all'] * 3 + ['--worker=0', '--worker=all']
  # The training command, unwrapped from ssh -> nohup bash -c: the same jaxspeech.main call on
  # every worker, with the user's arguments intact (even a quote and a space).
  train = shlex.split(_remote(ssh[2]))
  inner = shlex.split(train[train.index('-c') + 1].split(';')[0])
  assert inner == ['cd', 'jaxspeech', '&&', '.venv/bin/python', '-m', 'jaxspeech.main',
                   '--config', 'experiments/hubert.py:paper', '--workdir',
                   'gs://bucket/hubert base', "--config.data.manifest=/data/it's.jsonl"]
  assert "'jax[tpu]==0.10.2'" in _remote(ssh[1])


def test_tpu_vm_direct_create_and_clone():
  cmds = _lines(_run('tpu_vm.sh', {**TPU, 'REPO_URL': 'https://github.com/me/jaxspeech',
                                   'BRANCH': 'dev', 'KEEP': '1'}, '--dry-run'))
  assert cmds[0][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']
  assert cmds[0][cmds[0].index('--version') + 1] == 'v2-alpha-tpuv5-lite'
  assert 'git clone --depth 1 --branch dev https://github.com/me/jaxspeech jaxspeech' in \
    _remote(cmds[1])
  # KEEP=1: nothing deleted, the delete command is shown for later.
  assert not any(c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete'] for c in cmds[:-1])
  assert 'KEEP=1' in _run('tpu_vm.sh', {**TPU, 'KEEP': '1'}, '--dry-run').stdout


def test_tpu_vm_missing_variables():
  proc = _run('tpu_vm.sh', {'TPU_NAME': 'x', 'CONFIG': 'c'}, '--dry-run')
  assert proc.returncode == 2 and proc.stdout == ''
  assert 'set ZONE ACCELERATOR_TYPE WORKDIR' in proc.stderr
  proc = _run('tpu_vm.sh', TPU, '--dryrun')
  assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr


def test_gpu_one_process_all_gpus():
  cmds = _lines(_run('gpu.sh', {'CONFIG': 'experiments/dinosr.py:paper', 'WORKDIR': 'runs/d',
                                'NUM_GPUS': '4'}, '--dry-run', '--', '--config.train.seed=3'))
  assert cmds == [['env', 'CUDA_VISIBLE_DEVICES=0,1,2,3', '.venv/bin/python', '-m',
                   'jaxspeech.main', '--config', 'experiments/dinosr.py:paper', '--workdir',
                   'runs/d', '--distributed=off', '--config.mesh.shape.data=-1',
                   '--config.train.seed=3']]


def test_gpu_one_process_per_gpu_joins_with_jax_distributed():
  cmds = _lines(_run('gpu.sh', {'CONFIG': 'c.py:paper', 'WORKDIR': 'w', 'NUM_GPUS': '3',
                                'MODE': 'per-gpu', 'PORT': '23456'}, '--dry-run', '--',
                     '--config.mesh.shape.fsdp=3'))
  assert len(cmds) == 3
  for i, c in enumerate(cmds):
    assert c[1] == f'CUDA_VISIBLE_DEVICES={i}'
    assert '--config.mesh.shape.data=-1' not in c  # the user's mesh wins
    flag = {k: c[c.index(k) + 1] for k in ('--coordinator_address', '--num_processes',
                                           '--process_id')}
    # What jaxspeech.main will do with these flags.
    assert plan('auto', coordinator_address=flag['--coordinator_address'],
                num_processes=int(flag['--num_processes']), process_id=int(flag['--process_id']),
                env={}) == Plan('flags', {'coordinator_address': '127.0.0.1:23456',
                                          'num_processes': 3, 'process_id': i})


def test_gpu_errors():
  proc = _run('gpu.sh', {'WORKDIR': 'w', 'NUM_GPUS': '2'}, '--dry-run')
  assert proc.returncode == 2 and 'set CONFIG' in proc.stderr
  proc = _run('gpu.sh', {'CONFIG': 'c', 'WORKDIR': 'w', 'NUM_GPUS': 'two'}, '--dry-run')
  assert proc.returncode == 2 and "NUM_GPUS must be a positive integer, got 'two'" in proc.stderr
  proc = _run('gpu.sh', {'CONFIG': 'c', 'WORKDIR': 'w', 'NUM_GPUS': '2', 'MODE': 'mpi'},
              '--dry-run')
  assert proc.returncode == 2 and 'MODE must be single or per-gpu' in proc.stderr


def test_slurm():
  cmds = _lines(_run('slurm.sbatch', {'CONFIG': 'experiments/hubert.py:paper',
                                      'WORKDIR': '/shared/run'}, '--dry-run', '--', '--x=1'))
  assert cmds == [['srun', '--kill-on-bad-exit=1', '.venv/bin/python', '-m', 'jaxspeech.main',
                   '--config', 'experiments/hubert.py:paper', '--workdir', '/shared/run',
                   '--x=1']]
  # One task per GPU (JAX's SLURM default gives each process GPU number SLURM_LOCALID).
  text = open(os.path.join(REPO, 'launch', 'slurm.sbatch')).read()
  assert '#SBATCH --ntasks-per-node=8' in text and '#SBATCH --gpus-per-node=8' in text
  proc = _run('slurm.sbatch', {'CONFIG': 'c', 'WORKDIR': 'w'})
  assert proc.returncode == 2 and 'not inside a SLURM job' in proc.stderr
  proc = _run('slurm.sbatch', {}, '--dry-run')
  assert proc.returncode == 2 and 'set CONFIG WORKDIR' in proc.stderr


def test_scripts_are_strict():
  for name in ('tpu_vm.sh', 'gpu.sh', 'slurm.sbatch'):
    text = open(os.path.join(REPO, 'launch', name)).read()
    assert 'set -euo pipefail' in text and '--dry-run' in text, name
    assert os.access(os.path.join(REPO, 'launch', name), os.X_OK), name
