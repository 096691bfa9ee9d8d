r"""PARP (prune, adjust, re-prune) on top of `experiments/ctc.py`; any of its variants.

  python -m jaxspeech.main --config experiments/parp.py:tiny --workdir W \
      --config.init_from=<HF checkpoint or CTC workdir>     # one run (PARP / MPI / none)
  python -m jaxspeech.prune --config experiments/parp.py:tiny \
      --workdir runs/parp_tiny --config.init_from=runs/hubert_tiny --config.prune.sparsity=0.7

Same fields as experiments/ctc.py with `prune.method='parp'`, `prune.sparsity=0.5`,
`prune.every=50` and `method.name='parp'` (the same Method as `ctc`); switch to a baseline
with `--config.prune.method=omp|imp|mpi|none`.
"""

from __future__ import annotations

import ml_collections

from experiments import ctc

VARIANTS = ctc.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ctc.get_config(arg)
  c.method.name = 'parp'
  c.prune.method = 'parp'
  c.prune.sparsity = 0.5
  c.prune.every = 50
  return c
