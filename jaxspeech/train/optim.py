"""Optimizers from config: one per parameter group (`Method.param_groups`), each an optax chain of
global-norm clipping + AdamW / Adam / SGD with a warm-up/decay schedule + frozen parameters.

`config.optim` is either one flat block (it has a `name`; every group gets its own instance of
it: today's single-group methods) or one block per group (`config.optim.generator`,
`config.optim.discriminator`, ...). A block's keys: name (adamw | adam | sgd), learning_rate,
schedule, warmup_steps, init_lr_ratio, end_lr_ratio, tri_stage_ratios, b1, b2, eps (adam*),
momentum (sgd), weight_decay, clip_norm, and optionally frozen (a regex of parameters of the group
that never update), every / phase (the group updates at steps with step % every == phase).

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

from jaxspeech.errors import ConfigError

SCHEDULES = ('constant', 'linear', 'cosine', 'tri_stage')
OPTIMIZERS = ('adamw', 'adam', 'sgd')


def param_paths(params) -> Any:
  """Tree (same structure) of '/'-joined key paths."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: jax.tree_util.keystr(p, simple=True, separator='/'), params)


def trainable_mask(params, pattern: str) -> Any:
  """Tree of bools: True where the '/'-joined path matches `pattern` (re.search)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'config.train.trainable={pattern!r} is not a valid regex: {e}') from e
  mask = jax.tree.map(lambda path: bool(rx.search(path)), param_paths(params))
  if not any(jax.tree.leaves(mask)):
    raise ConfigError(f'config.train.trainable={pattern!r} matches no parameter; paths look like '
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
    raise ConfigError(f'config.optim.schedule={kind!r}; choose one of {SCHEDULES}')
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
  """One group's optimizer: clipping + AdamW (decoupled weight decay on >=2-D weights only), Adam
  (weight decay as an L2 term added to the gradient, torch.optim.Adam's convention, >=2-D weights)
  or SGD (momentum, same L2 term); parameters where `trainable` is False get no update, no
  optimizer moments and no share of the clipped norm."""
  c = optim_config
  name = str(c.name)
  if name not in OPTIMIZERS:
    raise ConfigError(f'config.optim.name={name!r}: choose one of {OPTIMIZERS}')
  schedule = make_schedule(c, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: getattr(p, 'ndim', 0) >= 2, params)
  wd = float(c.weight_decay)
  parts = []
  if c.clip_norm and float(c.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(c.clip_norm)))
  if name == 'adamw':
    parts.append(optax.adamw(schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                             weight_decay=wd, mask=decay_mask))
  else:
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    if name == 'adam':
      parts.append(optax.adam(schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)))
    else:
      momentum = float(c.get('momentum', 0.0) or 0.0)
      parts.append(optax.sgd(schedule, momentum=momentum or None))
  inner = optax.chain(*parts)
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
  if all(jax.tree.leaves(trainable)):
    return inner, schedule
  # Frozen grads are zeroed before the (trainable-only) transform, so clipping sees only the
  # trainable group's norm.
  tx = optax.multi_transform({'train': inner, 'freeze': optax.set_to_zero()}, labels)
  return tx, schedule


def group_masks(params, groups: dict, config) -> dict:
  """{group: bool tree}: the method's group membership AND `config.train.trainable` AND NOT
  `config.optim.<group>.frozen`. Groups must be disjoint (a parameter in two groups would be
  updated twice); every group must keep at least one trainable parameter."""
  from jaxspeech.methods.base import group_optim_config

  if not groups:
    raise ValueError('Method.param_groups returned no group')
  global_mask = trainable_mask(params, str(config.train.trainable))
  paths = param_paths(params)
  count = jax.tree.map(lambda *ms: sum(bool(m) for m in ms), *groups.values())
  twice = [p for p, n in zip(jax.tree.leaves(paths), jax.tree.leaves(count)) if n > 1]
  if twice:
    raise ValueError(f'Method.param_groups: parameters in more than one group: {twice[:3]}')
  out = {}
  for g, member in groups.items():
    c = group_optim_config(config.optim, g)
    frozen = str(c.get('frozen', '') or '')
    rx = re.compile(frozen) if frozen else None
    out[g] = jax.tree.map(
      lambda m, t, path, rx=rx: bool(m) and bool(t) and not (rx and rx.search(path)),
      member, global_mask, paths)
    if not any(jax.tree.leaves(out[g])):
      raise ValueError(f'parameter group {g!r} has no trainable parameter (config.train.trainable'
                       f'={str(config.train.trainable)!r}, config.optim.{g}.frozen={frozen!r})')
  return out
