"""Self-distillation helpers: EMA teacher, DinoSR decay schedule, per-utterance instance norm.

Shape legend: B batch, T frames, D width, Lyr stacked layers.

Reference: Alexander-H-Liu/dinosr ``models/dinosr.py`` (``get_annealed_rate``, ``set_num_updates``,
``F.instance_norm`` of the teacher's top layers); values from ``config/base.yaml`` and SEEDS §2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_update(teacher, student, decay):
  """``teacher <- decay * teacher + (1 - decay) * student`` on matching pytrees.

  Computed in float32 and cast back to each teacher leaf's dtype. ``decay`` may be a traced
  scalar (e.g. from :func:`ema_decay_schedule`); ``decay == 1`` leaves the teacher unchanged.
  """
  decay = jnp.asarray(decay, jnp.float32)

  def upd(t, s):
    new = decay * t.astype(jnp.float32) + (1.0 - decay) * s.astype(jnp.float32)
    return new.astype(t.dtype)

  return jax.tree.map(upd, teacher, student)


def ema_decay_schedule(
  step,
  start: float = 0.999,
  end: float = 0.9999,
  anneal_steps: int = 30_000,
  freeze_step: int | None = 200_000,
) -> jax.Array:
  """DinoSR teacher decay at update ``step`` (float32 scalar).

  Linear from ``start`` at step 0 to ``end`` at ``anneal_steps`` (``ema_decay``,
  ``ema_end_decay``, ``ema_anneal_end_step``), then constant; from ``freeze_step`` on
  (``freeze_teacher_step``) the decay is 1: the teacher no longer moves. ``None`` never freezes.
  """
  step = jnp.asarray(step, jnp.float32)
  frac = jnp.clip(step / float(anneal_steps), 0.0, 1.0)
  decay = end - (end - start) * (1.0 - frac)
  if freeze_step is not None:
    decay = jnp.where(step >= freeze_step, 1.0, decay)
  return decay.astype(jnp.float32)


def instance_norm_over_time(x: jax.Array, mask: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Normalise each channel of each utterance over its valid frames (``F.instance_norm``).

  Args:
    x: ``[..., B, T, D]`` features (e.g. ``[Lyr, B, T, D]`` for the teacher's top layers).
    mask: ``[B, T]`` bool, True = valid frame.
    eps: added to the (biased) variance, as in ``torch.nn.functional.instance_norm``.

  Returns:
    float32 ``[..., B, T, D]``: zero mean and unit (biased) variance per (utterance, channel) over
    valid frames; padded frames are 0 and do not enter the statistics.
  """
  x = x.astype(jnp.float32)
  m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  n = jnp.maximum(jnp.sum(m, axis=-2, keepdims=True), 1.0)  # [B, 1, 1]
  mean = jnp.sum(x * m, axis=-2, keepdims=True) / n  # [..., B, 1, D]
  centred = (x - mean) * m  # [..., B, T, D]
  var = jnp.sum(jnp.square(centred), axis=-2, keepdims=True) / n  # [..., B, 1, D]
  return centred * jax.lax.rsqrt(var + eps)
