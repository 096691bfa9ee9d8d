r"""Command line: `python -m jaxspeech.main --config experiments/hubert.py:tiny --workdir DIR`.

Thin by design: parses the ml_collections config (`--config.a.b=value` overrides), joins the
other hosts with `jax.distributed.initialize()` when the environment says this is a multi-host run
(see `jaxspeech/train/distributed.py`: a TPU VM pod slice, `srun` under SLURM, or the explicit
flags below), and hands the config to `jaxspeech.train.trainer.train_and_evaluate`. Running it
again in the same workdir resumes. The same command works on a laptop and on every host of a pod:

  python -m jaxspeech.main --config experiments/hubert.py:paper --workdir gs://bucket/run1
  # by hand, two hosts (run on each, I = 0 and 1):
  python -m jaxspeech.main --config ... --workdir /shared/run1 \
      --coordinator_address host0:12345 --num_processes 2 --process_id I

Launchers for TPU VMs, one GPU node and SLURM clusters are in `launch/`.
"""

from __future__ import annotations

import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxspeech import errors
from jaxspeech.train import distributed

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'experiments/<method>.py:<variant>', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics (shared '
                               'by all hosts of a multi-host run).')
_DISTRIBUTED = flags.DEFINE_enum(
  'distributed', 'auto', distributed.MODES,
  'auto: jax.distributed.initialize() when flags, JAX_* variables, SLURM (srun) or a Cloud TPU VM '
  'say this is a multi-host run; on: always; off: never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 (multi-host by hand).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300,
                                     'Seconds to wait for all processes to join.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of Orbax (several lines per save) unless --verbosity >= 1."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    the_plan = distributed.plan(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  # Before anything else touches a JAX backend.
  distributed.initialize(the_plan, timeout_s=_INIT_TIMEOUT.value)
  if logging.get_verbosity() < 1:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.quiet_unless_main()
  import jax

  from jaxspeech.train import trainer

  logging.info('JAX %s, process %d/%d, %d local devices of %d: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.local_devices())
  # User errors (config values, paths, data, a refused workdir): one line, exit 2.
  code = errors.run_cli(lambda: trainer.train_and_evaluate(errors.loaded_config(_CONFIG),
                                                          _WORKDIR.value),
                        prog='jaxspeech.main')
  if code:
    sys.exit(code)


parse_flags = errors.absl_flags_parser('jaxspeech.main')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
