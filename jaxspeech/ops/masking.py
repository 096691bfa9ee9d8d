"""Span masking with a fixed number of masked frames per utterance (jit-able, static shapes).

Shape legend: B batch, T frames, D width, L valid length of an utterance (``mask.sum(-1)``).

fairseq's ``compute_mask_indices`` (wav2vec 2.0, HuBERT, DinoSR: ``mask_prob=0.8`` of frames
start a span, ``mask_length=10``) samples about ``p * L / span`` span starts without replacement;
spans overlap, so the masked count varies from utterance to utterance (in numpy, outside the
graph). Here the masked count is a deterministic function of the valid length,
:func:`num_masked_frames`, equal to the expected coverage when every valid start position opens a
span with probability ``p / span``::

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


def span_mask(
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


def apply_span_mask(x: jax.Array, masked: jax.Array, mask_embedding: jax.Array) -> jax.Array:
  """Replace masked frames of ``x [B, T, D]`` by the learned ``mask_embedding [D]``."""
  return jnp.where(masked[..., None], mask_embedding.astype(x.dtype), x)  # [B, T, D]
