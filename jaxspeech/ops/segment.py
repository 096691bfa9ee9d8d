"""JOIN segmentation of frame logits (wav2vec-U 2.0, fairseq `JoinSegmenter.logit_segment`).

Consecutive frames with the same argmax form one segment; each segment becomes one position of
the output. Training (`mean=False`, the w2vu2 config's `mean_pool_join: false`): a uniformly
random frame of each segment represents it; evaluation (`mean=True`): the segment's mean.
Padded frames never join a segment; segments are packed to the front and the rest is padding.

Static shapes: the output keeps the input's T positions (at most T segments) and a mask; the
random pick is one uniform score per frame and the arg-max inside each segment, written as a
[T, T] selection matrix (T' <= a few hundred generator frames, so the matrix is cheap) instead
of fairseq's per-utterance Python loop over `unique_consecutive`.

Legend: B batch, T frames, V classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_ids(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Run index of every frame and the number of runs.

  logits [B, T, V], mask [B, T] (True = valid) -> (ids [B, T] int32, -1 on padding; n [B])."""
  pred = jnp.argmax(logits, axis=-1)  # [B, T]
  prev = jnp.pad(pred, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  prev_valid = jnp.pad(mask, ((0, 0), (1, 0)), constant_values=False)[:, :-1]
  start = mask & ((pred != prev) | ~prev_valid)  # [B, T]
  ids = jnp.cumsum(start, axis=1) - 1
  return jnp.where(mask, ids, -1).astype(jnp.int32), jnp.sum(start, axis=1).astype(jnp.int32)


def join_segment(logits: jax.Array, mask: jax.Array, rng: jax.Array | None = None, *,
                 mean: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [B, T, V], mask [B, T] -> (segment logits [B, T, V], segment mask [B, T], n [B]).

  Position s < n[b] of the output is segment s of utterance b (a random member frame's logits,
  or with `mean=True` the mean over its frames); positions >= n[b] are zeros and masked."""
  ids, n = segment_ids(logits, mask)
  t = logits.shape[1]
  member = ids[:, None, :] == jnp.arange(t)[None, :, None]  # [B, S=T, T]: frame t in segment s
  if mean:
    sel = member.astype(logits.dtype)
    sel = sel / jnp.maximum(jnp.sum(sel, axis=-1, keepdims=True), 1)
  else:
    if rng is None:
      raise ValueError('join_segment: a random representative needs rng (or mean=True)')
    score = jax.random.uniform(rng, ids.shape)  # [B, T]
    masked = jnp.where(member, score[:, None, :], -1.0)
    pick = jnp.argmax(masked, axis=-1)  # [B, S]
    sel = jax.nn.one_hot(pick, t, dtype=logits.dtype) * jnp.any(member, -1, keepdims=True)
  out = jnp.einsum('bst,btv->bsv', sel, logits)
  smask = jnp.arange(t)[None, :] < n[:, None]
  return out, smask, n
