"""Evaluation task `sample_moments`: a generator's samples against the data's first two moments.

    config.evals.moments = {task: 'sample_moments', num_samples: 8192, field: 'x'}

Returns {'mean', 'std'} of `num_samples` generated values (predict 'samples', fixed key), the
data's {'data_mean', 'data_std'} over the rows' `field`, and 'mean_error' (|mean - data_mean| in
units of data_std) and 'std_ratio' (std / data_std).
"""

from __future__ import annotations

import numpy as np


def run(ctx, num_samples: int = 8192, field: str = 'x', split: str = '',
        seed: int = 0) -> dict[str, float]:
  import jax

  sample = ctx.need('samples')
  x = np.asarray(jax.jit(sample, static_argnums=1)(jax.random.key(seed), int(num_samples)),
                 np.float64).reshape(-1)
  data = np.asarray([float(r[field]) for r in ctx.rows(split)], np.float64)
  mean, std, dm, ds = x.mean(), x.std(), data.mean(), data.std()
  return {'mean': mean, 'std': std, 'data_mean': dm, 'data_std': ds,
          'mean_error': abs(mean - dm) / ds, 'std_ratio': std / ds}
