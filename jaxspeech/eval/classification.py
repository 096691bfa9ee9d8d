"""Evaluation task `classification`: accuracy of a classifier's `labels` prediction on the rows
of one split, batched through the method's own batch declaration (`host_fields`).

    config.evals.test = {task: 'classification', split: 'test'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task classification --split test

Returns {'accuracy', 'num_examples'}; the label of a row is its `label_field` (default 'label').
"""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
  """Fraction of equal entries. [N], [N] -> float."""
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape or pred.ndim != 1 or not len(pred):
    raise ValueError(f'accuracy: need two equal non-empty [N] arrays, got {pred.shape}, '
                     f'{target.shape}')
  return float(np.mean(pred == target))


def run(ctx, split: str = 'test', manifest: str = '', label_field: str = 'label',
        batch_size: int = 256) -> dict[str, float]:
  import jax
  import jax.numpy as jnp

  from jaxspeech.eval.registry import EvalError

  predict = ctx.need('labels')
  rows = ctx.rows(split, manifest)
  missing = [i for i, r in enumerate(rows) if label_field not in r]
  if missing:
    raise EvalError(f'classification: {len(missing)} rows of split {split!r} have no '
                    f'{label_field!r} (e.g. row {missing[0]})')
  spec = ctx.method.row_fields()
  fn = jax.jit(predict)
  preds = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    fields = [ctx.method.host_fields(r) for r in chunk]
    batch = {k: jnp.asarray(np.stack([np.asarray(f[k], spec[k].dtype) for f in fields]))
             for k in spec}
    batch['index'] = jnp.arange(start, start + len(chunk), dtype=jnp.int32)
    batch['valid'] = jnp.ones((len(chunk),), bool)
    preds.append(np.asarray(fn(batch)))
  pred = np.concatenate(preds)
  target = np.asarray([int(r[label_field]) for r in rows])
  return {'accuracy': accuracy(pred, target), 'num_examples': float(len(rows))}
