"""Multi-host start-up: when and how to call `jax.distributed.initialize()`.

One command runs everywhere; the environment decides whether this process is one of many:

  source    when                                                     initialize(...)
  flags     --coordinator_address HOST:PORT --num_processes N          (addr, N, I) as given
            --process_id I (all three)
  env       JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID  (addr, N, I) from env
  slurm     inside `srun` with SLURM_NTASKS > 1 (SLURM_JOB_ID,         () -- JAX's SLURM cluster
            SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID set)       reads those variables
  tpu       a Cloud TPU VM (TPU_WORKER_HOSTNAMES / MEGASCALE_* /         () -- JAX's TPU cluster
            TPU_PROCESS_ADDRESSES set, or a Google TPU PCI device)       asks the metadata server
  (none)    a laptop, one GPU node, one CPU: a single process, no initialize

`--distributed=off` never initializes; `--distributed=on` always does (no arguments unless flags
or env give them), failing loudly when JAX cannot find its peers.

After initialization each process sees its local devices plus every other host's (jax.devices());
the mesh spans all of them, the data pipeline reads this host's slice of every global batch
(`jax.process_index()` / `jax.process_count()`), Orbax writes checkpoints cooperatively, and only
process 0 writes logs and metrics.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping

from absl import logging

MODES = ('auto', 'on', 'off')
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')
_TPU_VARS = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'TPU_PROCESS_ADDRESSES')
_GOOGLE_PCI_VENDOR = '0x1ae0'  # Cloud TPU chips are PCI devices of this vendor (as JAX checks)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Whether and how to call `jax.distributed.initialize`: `source` says why (see the table)."""

  source: str
  kwargs: dict


def tpu_vm_present() -> bool:
  """A Cloud TPU chip on this machine's PCI bus (the check JAX itself uses)."""
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def plan(mode: str = 'auto', *, coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         env: Mapping[str, str] | None = None, tpu_present: bool | None = None) -> Plan | None:
  """Decides from flags and environment; None = single process (no initialize). Pure, so that
  every branch is tested without a cluster."""
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: must be one of {MODES}')
  env = os.environ if env is None else env
  explicit = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
              '--process_id': process_id}
  given = {k: v for k, v in explicit.items() if v not in (None, '')}
  if mode == 'off':
    if given:
      raise ValueError(f'--distributed=off contradicts {sorted(given)}')
    return None
  if given:
    missing = sorted(set(explicit) - set(given))
    if missing:
      raise ValueError(f'multi-host flags given ({sorted(given)}) but {missing} missing: pass '
                       'all three of --coordinator_address HOST:PORT --num_processes N '
                       '--process_id I')
    return Plan('flags', _checked(str(coordinator_address), int(num_processes), int(process_id),
                                  'flags'))
  jax_env = [env.get(k) for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                                  'JAX_PROCESS_ID')]
  if jax_env[0] and jax_env[1] and jax_env[2]:
    return Plan('env', _checked(jax_env[0], int(jax_env[1]), int(jax_env[2]), 'JAX_* env'))
  if all(k in env for k in _SLURM_VARS) and int(env['SLURM_NTASKS']) > 1:
    return Plan('slurm', {})
  if any(env.get(k) for k in _TPU_VARS):
    return Plan('tpu', {})
  if tpu_present is None:
    tpu_present = tpu_vm_present()
  if tpu_present:
    return Plan('tpu', {})
  if mode == 'on':
    return Plan('forced', {})
  return None


def _checked(address: str, n: int, i: int, what: str) -> dict:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(f'{what}: coordinator address {address!r} must be HOST:PORT')
  if n < 1 or not 0 <= i < n:
    raise ValueError(f'{what}: process id {i} out of range for {n} processes')
  return {'coordinator_address': address, 'num_processes': n, 'process_id': i}


def initialize(the_plan: Plan | None, *, timeout_s: int = 300) -> None:
  """Calls `jax.distributed.initialize` for `the_plan` (nothing for None); must run before any
  other JAX call touches a backend."""
  if the_plan is None:
    return
  import jax

  logging.info('jax.distributed.initialize (%s) %s', the_plan.source, the_plan.kwargs)
  jax.distributed.initialize(**the_plan.kwargs, initialization_timeout=int(timeout_s))
  logging.info('Process %d/%d: %d local devices of %d', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def quiet_unless_main() -> None:
  """Process 0 logs at the chosen verbosity; the others only warnings and errors."""
  import jax

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
