"""The `parp` method: CTC fine-tuning (`jaxspeech.methods.ctc`) with magnitude pruning on
(`config.prune.method`, PARP by default). The pruning settings and hooks (`PruneSpec`,
`prune_config`) live in `jaxspeech.methods.prune_spec`, shared with `ctc`; see its docstring for
PARP, OMP, IMP and MPI.
"""

from __future__ import annotations

from jaxspeech.methods.ctc import CtcFinetuning
from jaxspeech.methods.prune_spec import (  # noqa: F401  (re-exported: experiments use them)
  DEFAULT_PATTERN,
  FIXED_MASK,
  METHODS,
  PruneSpec,
  prune_config,
)


class ParpFinetuning(CtcFinetuning):
  """CTC fine-tuning with magnitude pruning (`config.prune.method`, PARP by default)."""

  name = 'parp'
