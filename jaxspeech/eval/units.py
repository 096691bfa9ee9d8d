"""Unit quality against frame phone labels: PNMI, phone purity, cluster purity (HuBERT, §IV-B).

Shape legend: N frames (any leading shape such as ``[B, T]``, flattened), P phone classes,
U unit ids.

From the frame pairs (phone ``y``, unit ``z``) of the valid frames, the joint distribution is
``p(y, z) = count(y, z) / N`` and (Hsu et al., HuBERT, 2021)::

  phone purity   = E_z[max_y p(y | z)] = sum_z max_y p(y, z)
  cluster purity = E_y[max_z p(z | y)] = sum_y max_z p(y, z)
  PNMI           = I(y; z) / H(y)

The same ratio with speaker labels in place of phones, ``speaker_nmi = I(s; z) / H(s)``, is the
fraction of the speaker identity the units reveal (0 = speaker-invariant units, 1 = the units
determine the speaker): a unit-level speaker measure that does not saturate like a probe does.

Labels may be any hashable values (ints, strings); numpy is enough here (the statistics are a
single pass over the frames).
"""

from __future__ import annotations

import numpy as np


def contingency(phones, units, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Counts ``[P, U]`` of (phone, unit) pairs over valid frames, with the phone and unit values.

  Args:
    phones: ``[...]`` frame phone labels.
    units: ``[...]`` frame unit ids (same shape).
    mask: optional ``[...]`` bool, True = frame counts.

  Returns:
    ``(counts [P, U] int64, phone_values [P], unit_values [U])`` for the values that occur.
  """
  phones, units = np.asarray(phones).reshape(-1), np.asarray(units).reshape(-1)
  if phones.shape != units.shape:
    raise ValueError(f"phones {phones.shape} and units {units.shape} differ in size")
  if mask is not None:
    keep = np.asarray(mask, bool).reshape(-1)
    phones, units = phones[keep], units[keep]
  pv, pi = np.unique(phones, return_inverse=True)
  uv, ui = np.unique(units, return_inverse=True)
  counts = np.zeros((len(pv), len(uv)), np.int64)
  np.add.at(counts, (pi, ui), 1)
  return counts, pv, uv


def _xlogx_ratio(p_yz, p_y, p_z):
  nz = p_yz > 0
  return np.sum(p_yz[nz] * np.log(p_yz[nz] / np.outer(p_y, p_z)[nz]))


def scores_from_counts(counts: np.ndarray) -> dict[str, float]:
  """PNMI, phone purity, cluster purity (and the entropies) from a ``[P, U]`` count table."""
  counts = np.asarray(counts, np.float64)
  n = counts.sum()
  if n == 0:
    raise ValueError("no valid frames")
  p_yz = counts / n  # [P, U]
  p_y, p_z = p_yz.sum(1), p_yz.sum(0)  # [P], [U]
  h_y = -np.sum(p_y[p_y > 0] * np.log(p_y[p_y > 0]))
  h_z = -np.sum(p_z[p_z > 0] * np.log(p_z[p_z > 0]))
  mi = _xlogx_ratio(p_yz, p_y, p_z)
  return {
    # H(y) = 0 (one phone only): nothing to explain; report 0 information as 0 PNMI.
    "pnmi": float(mi / h_y) if h_y > 0 else 0.0,
    "phone_purity": float(p_yz.max(0).sum()),
    "cluster_purity": float(p_yz.max(1).sum()),
    "mutual_information": float(mi),
    "phone_entropy": float(h_y),
    "unit_entropy": float(h_z),
    "unit_perplexity": float(np.exp(h_z)),
    "num_units_used": int((p_z > 0).sum()),
    "num_frames": int(n),
  }


def unit_quality(phones, units, mask=None) -> dict[str, float]:
  """All unit-quality scores for frame phone labels and unit ids (see the module docstring)."""
  counts, _, _ = contingency(phones, units, mask)
  return scores_from_counts(counts)


def pnmi(phones, units, mask=None) -> float:
  """Phone-normalised mutual information ``I(y; z) / H(y)``."""
  return unit_quality(phones, units, mask)["pnmi"]


def phone_purity(phones, units, mask=None) -> float:
  """``E_z[max_y p(y | z)]``: accuracy of labelling each unit by its majority phone."""
  return unit_quality(phones, units, mask)["phone_purity"]


def cluster_purity(phones, units, mask=None) -> float:
  """``E_y[max_z p(z | y)]``: how concentrated each phone is on its most frequent unit."""
  return unit_quality(phones, units, mask)["cluster_purity"]


def speaker_nmi(speakers, units, mask=None) -> float:
  """``I(s; z) / H(s)``: the share of the speaker entropy explained by the units, ``[N]`` frame
  speaker labels and unit ids (lower = more speaker-invariant units). Needs >= 2 speakers."""
  counts, values, _ = contingency(speakers, units, mask)
  if len(values) < 2:
    raise ValueError(f"speaker_nmi needs frames of at least 2 speakers, got {len(values)}")
  return scores_from_counts(counts)["pnmi"]
