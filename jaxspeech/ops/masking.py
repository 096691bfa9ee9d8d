"""Span masking of frames (jit-able, static shapes), two styles (``span_mask(style=...)``).

Shape legend: B batch, T frames, D width, L valid length of an utterance (``mask.sum(-1)``),
N the static upper bound of the span count.

``'fairseq'`` (:func:`fairseq_span_mask`) is fairseq's ``data_utils.compute_mask_indices`` as
wav2vec 2.0 / HuBERT / DinoSR call it (``mask_type='static'``, ``no_overlap=False``,
``require_same_masks=True``, ``mask_dropout=0``), redrawn as array code: per utterance,
``n = max(min_masks, floor(p * L / span + u))`` spans (``u ~ U[0, 1)``: probabilistic
rounding) whose starts are drawn without replacement from ``[0, L - span)``, so spans overlap;
then every row is cut down to the smallest masked count of the batch by keeping a random subset
of its masked frames. The count varies with the draw, and the masked share is well below ``p``:
p=0.8, span 10 on 49-frame crops masks 58% of a single crop, 43% of a batch of 8 (measured, same
as a numpy port of fairseq's code: tests/ops/test_masking.py).

``'exact'`` (:func:`exact_span_mask`, the default) masks a count that is a deterministic function
of the valid length, :func:`num_masked_frames`, equal to the expected coverage when every valid
start position opens a span with probability ``p / span``::

  n(L) = round(L * (1 - (1 - p / span) ** span))        # p=0.8, span=10: 56.6% of the frames

and the frames are chosen by opening spans at valid starts in a random order (one uniform score
per start), taking the union in that order and cutting the last span short so that exactly
``n(L)`` frames are masked. The result is a union of whole spans plus at most one partial span,
never touches padding, and is a pure function of the PRNG key.

Valid frames are assumed to be a prefix of each row (right padding), as produced by the data
pipelines; masked frames are in any case restricted to ``mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_masked_frames(
  lengths: jax.Array, mask_prob: float = 0.8, span: int = 10, min_spans: int = 1
) -> jax.Array:
  """Number of frames to mask for each valid length ``[B] -> [B]`` int32.

  ``min_spans`` mirrors fairseq's ``min_masks`` (DinoSR: 1): at least ``min(min_spans * span, L)``
  frames are masked.
  """
  lengths = jnp.asarray(lengths)
  coverage = 1.0 - (1.0 - mask_prob / span) ** span
  n = jnp.round(lengths.astype(jnp.float32) * coverage).astype(jnp.int32)
  n = jnp.maximum(n, jnp.minimum(min_spans * span, lengths).astype(jnp.int32))
  return jnp.clip(n, 0, lengths).astype(jnp.int32)


MASK_STYLES = ('exact', 'fairseq')


def span_mask(
  key: jax.Array,
  mask: jax.Array,
  mask_prob: float = 0.8,
  span: int = 10,
  min_spans: int = 1,
  style: str = 'exact',
) -> jax.Array:
  """Boolean span mask ``[B, T]`` of the given ``style`` (one of ``MASK_STYLES``, see the module
  docstring): :func:`exact_span_mask` or :func:`fairseq_span_mask` (with
  ``require_same_masks``)."""
  if style == 'exact':
    return exact_span_mask(key, mask, mask_prob, span, min_spans)
  if style == 'fairseq':
    return fairseq_span_mask(key, mask, mask_prob, span, min_spans)
  raise ValueError(f'span_mask: unknown style {style!r} (one of {MASK_STYLES})')


def exact_span_mask(
  key: jax.Array,
  mask: jax.Array,
  mask_prob: float = 0.8,
  span: int = 10,
  min_spans: int = 1,
) -> jax.Array:
  """Boolean span mask ``[B, T]`` with exactly ``num_masked_frames(mask.sum(-1))`` True per row.

  Args:
    key: PRNG key; the same key gives the same mask.
    mask: ``[B, T]`` bool, True = valid frame (right padded).
    mask_prob: fairseq ``mask_prob`` (probability of a frame starting a span; DinoSR 0.8).
    span: span length (fairseq ``mask_length``; DinoSR 10).
    min_spans: fairseq ``min_masks``.
  """
  b, t = mask.shape
  lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B]
  n = num_masked_frames(lengths, mask_prob, span, min_spans)  # [B]
  pos = jnp.arange(t)[None, :]  # [1, T]
  # A span may start where it fits inside the valid region (at 0 when L < span).
  start_ok = pos <= jnp.maximum(lengths - span, 0)[:, None]  # [B, T]
  score = jnp.where(start_ok, jax.random.uniform(key, (b, t)), jnp.inf)  # [B, T]
  # cover[t] = score of the first-opened span that covers frame t: min over starts t-span+1..t.
  cover = score
  for j in range(1, span):
    shifted = jnp.pad(score, ((0, 0), (j, 0)), constant_values=jnp.inf)[:, :t]  # [B, T]
    cover = jnp.minimum(cover, shifted)
  cover = jnp.where(mask, cover, jnp.inf)
  # Take the n frames covered earliest; a stable sort breaks ties within a span by position, so
  # the last span is cut short from its end.
  order = jnp.argsort(cover, axis=-1, stable=True)  # [B, T]
  rank = jnp.argsort(order, axis=-1, stable=True)  # [B, T] inverse permutation
  return (rank < n[:, None]) & mask


def _ranks(score: jax.Array) -> jax.Array:
  """Rank of every entry of ``score [B, W]`` in its row (0 = smallest): ``[B, W]`` int32."""
  order = jnp.argsort(score, axis=-1)  # [B, W]
  return jnp.argsort(order, axis=-1).astype(jnp.int32)  # inverse permutation


def fairseq_span_mask(
  key: jax.Array,
  mask: jax.Array,
  mask_prob: float = 0.8,
  span: int = 10,
  min_spans: int = 1,
  require_same_masks: bool = True,
) -> jax.Array:
  """fairseq's ``compute_mask_indices`` (static spans, overlaps allowed) as a ``[B, T]`` bool mask.

  Args:
    key: PRNG key; the same key gives the same mask (fairseq draws from numpy's global state).
    mask: ``[B, T]`` bool, True = valid frame (right padded).
    mask_prob: fairseq ``mask_prob`` (DinoSR 0.8): ``p * L / span`` spans are opened on average.
    span: fairseq ``mask_length`` (DinoSR 10).
    min_spans: fairseq ``min_masks`` (DinoSR's ``apply_mask`` passes 1).
    require_same_masks: cut every row down to the smallest masked count of the batch (fairseq's
      default, DinoSR ``base.yaml``), keeping a uniformly random subset of its masked frames. Rows
      without valid frames do not take part in the minimum (fairseq never sees one; counting it
      would unmask the whole batch). The minimum is over the rows of ``mask``: under jit the
      global batch, where fairseq takes it over each GPU's own batch.

  Static shapes: the span count ``n`` of a row is data-dependent, so every position of a static
  grid of ``max(T, N + 1)`` candidate starts gets a uniform score (``N`` = the largest ``n``
  possible for ``T`` frames) and a row keeps the ``n`` candidates of lowest score inside its start
  range, a uniformly random ``n``-subset as fairseq's ``rng.choice(..., replace=False)``.
  fairseq's start range is ``[0, L - span)`` (so the last frame is never masked), or
  ``[0, n + 1)`` when ``L - span <= n``; spans are cut at ``L``. Where fairseq raises (a whole
  utterance masked, possible only in that short case) this masks the whole utterance.
  """
  b, t = mask.shape
  k_num, k_start, k_keep = jax.random.split(key, 3)
  lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B]
  # Probabilistic rounding of the expected span count, at least min_spans.
  u = jax.random.uniform(k_num, (b,))
  n = jnp.floor(mask_prob * lengths.astype(jnp.float32) / span + u).astype(jnp.int32)
  n = jnp.maximum(n, min_spans)  # [B]
  r = jnp.where(lengths - span > n, lengths - span, n + 1)  # [B] size of the start range
  # r <= max(T - span, N + 1) with N the largest possible n: the static width of the start grid.
  n_max = max(int(min_spans), int(mask_prob * t / span) + 1)
  w = max(t, n_max + 1)
  pos = jnp.arange(w)[None, :]  # [1, W]
  score = jnp.where(pos < r[:, None], jax.random.uniform(k_start, (b, w)), jnp.inf)  # [B, W]
  starts = (_ranks(score) < n[:, None]).astype(jnp.int32)  # [B, W] n True per row
  # Frame i is masked when a span starts in (i - span, i]: a windowed sum of the start indicator.
  c = jnp.cumsum(starts, axis=-1)  # [B, W]
  c_before = jnp.pad(c, ((0, 0), (span, 0)))[:, :w]  # [B, W] c[i - span], 0 before the row
  masked = ((c - c_before) > 0)[:, :t] & mask  # [B, T] spans cut at L
  if not require_same_masks:
    return masked
  counts = jnp.sum(masked, axis=-1).astype(jnp.int32)  # [B]
  big = jnp.iinfo(jnp.int32).max
  target = jnp.min(jnp.where(lengths > 0, counts, big))
  target = jnp.where(target == big, 0, target)  # no valid row at all
  keep = jnp.where(masked, jax.random.uniform(k_keep, (b, t)), jnp.inf)  # [B, T]
  return masked & (_ranks(keep) < target)


def apply_span_mask(x: jax.Array, masked: jax.Array, mask_embedding: jax.Array) -> jax.Array:
  """Replace masked frames of ``x [B, T, D]`` by the learned ``mask_embedding [D]``."""
  return jnp.where(masked[..., None], mask_embedding.astype(x.dtype), x)  # [B, T, D]
