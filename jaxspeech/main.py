r"""Command line: `python -m jaxspeech.main --config experiments/hubert.py:tiny --workdir DIR`.

Thin by design: parses the ml_collections config (`--config.a.b=value` overrides) and hands it to
`jaxspeech.train.trainer.train_and_evaluate`. Running it again in the same workdir resumes.
"""

from __future__ import annotations

import logging as logging_std

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'experiments/<method>.py:<variant>', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of Orbax (several lines per save) unless --verbosity >= 1."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if logging.get_verbosity() < 1:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax

  from jaxspeech.train import trainer

  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
