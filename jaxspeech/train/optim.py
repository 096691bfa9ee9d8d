"""Optimizer from config: AdamW + warm-up/decay schedule + global-norm clipping + frozen groups.

Frozen parameter groups are config, not code: `config.train.trainable` is a regular expression
matched (`re.search`) against each parameter's '/'-joined path (e.g.
`encoder/encoder/layers/10/attention/q_proj/kernel`); parameters that do not match get
`optax.set_to_zero()` through `optax.multi_transform`, carry no optimizer moments, receive no
weight decay, and are excluded from the clipped gradient norm.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

SCHEDULES = ('constant', 'linear', 'cosine', 'tri_stage')


def param_paths(params) -> Any:
  """Tree (same structure) of '/'-joined key paths."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: jax.tree_util.keystr(p, simple=True, separator='/'), params)


def trainable_mask(params, pattern: str) -> Any:
  """Tree of bools: True where the '/'-joined path matches `pattern` (re.search)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.train.trainable={pattern!r} is not a valid regex: {e}') from e
  mask = jax.tree.map(lambda path: bool(rx.search(path)), param_paths(params))
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f'config.train.trainable={pattern!r} matches no parameter; paths look like '
                     f'{jax.tree.leaves(param_paths(params))[:3]}')
  return mask


def make_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Learning-rate schedule: warm-up from `init_lr_ratio * lr` to `lr`, then decay to
  `end_lr_ratio * lr` at `num_steps` (linear / cosine), or hold (constant), or HuBERT/wav2vec2's
  tri-stage (warm-up, hold, exponential decay; stage fractions in `tri_stage_ratios`)."""
  c = optim_config
  lr, warmup = float(c.learning_rate), int(c.warmup_steps)
  init_lr, end_lr = lr * float(c.init_lr_ratio), lr * float(c.end_lr_ratio)
  kind = c.schedule
  if kind not in SCHEDULES:
    raise ValueError(f'config.optim.schedule={kind!r}; choose one of {SCHEDULES}')
  decay_steps = max(num_steps - warmup, 1)
  if kind == 'tri_stage':
    w, h, d = (float(r) for r in c.tri_stage_ratios)
    ws, hs, ds = int(w * num_steps), int(h * num_steps), max(int(d * num_steps), 1)
    return optax.join_schedules([
      optax.linear_schedule(init_lr, lr, max(ws, 1)),
      optax.constant_schedule(lr),
      optax.exponential_decay(lr, ds, end_lr / lr if lr else 1.0),
    ], [ws, ws + hs])
  warm = optax.linear_schedule(init_lr, lr, max(warmup, 1))
  if kind == 'constant':
    after = optax.constant_schedule(lr)
  elif kind == 'linear':
    after = optax.linear_schedule(lr, end_lr, decay_steps)
  else:
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
  return optax.join_schedules([warm, after], [warmup])


def make_optimizer(optim_config, num_steps: int, trainable) -> tuple[optax.GradientTransformation,
                                                                    optax.Schedule]:
  """AdamW (decoupled weight decay on >=2-D weights only) with clipping and frozen groups."""
  c = optim_config
  if c.name != 'adamw':
    raise ValueError(f'config.optim.name={c.name!r}: only "adamw" is implemented')
  schedule = make_schedule(c, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: getattr(p, 'ndim', 0) >= 2, params)
  adamw = optax.adamw(schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                      weight_decay=float(c.weight_decay), mask=decay_mask)
  parts = []
  if c.clip_norm and float(c.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(c.clip_norm)))
  parts.append(adamw)
  inner = optax.chain(*parts)
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
  if all(jax.tree.leaves(trainable)):
    return inner, schedule
  # Frozen grads are zeroed before the (trainable-only) transform, so clipping sees only the
  # trainable group's norm.
  tx = optax.multi_transform({'train': inner, 'freeze': optax.set_to_zero()}, labels)
  return tx, schedule
