"""PNMI / phone purity / cluster purity from their definitions, on small cases and invariances."""

import math
from collections import Counter

import numpy as np
import pytest

from jaxspeech.eval.units import cluster_purity, phone_purity, pnmi, speaker_nmi, unit_quality


def _by_definition(phones, units):
  """Scores computed with plain Python dictionaries straight from the definitions."""
  n = len(phones)
  joint = Counter(zip(phones, units))
  py, pz = Counter(phones), Counter(units)
  mi = sum(c / n * math.log((c / n) / ((py[y] / n) * (pz[z] / n))) for (y, z), c in joint.items())
  hy = -sum(c / n * math.log(c / n) for c in py.values())
  pp = sum(max(joint.get((y, z), 0) for y in py) / pz[z] * pz[z] / n for z in pz)
  cp = sum(max(joint.get((y, z), 0) for z in pz) / py[y] * py[y] / n for y in py)
  return mi / hy, pp, cp


def test_hand_worked_example():
  phones = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "a"]
  units = [0, 0, 1, 1, 1, 2, 2, 0, 2, 1]
  want_pnmi, want_pp, want_cp = _by_definition(phones, units)
  got = unit_quality(phones, units)
  assert got["pnmi"] == pytest.approx(want_pnmi, rel=1e-12)
  assert got["phone_purity"] == pytest.approx(want_pp, rel=1e-12)
  assert got["cluster_purity"] == pytest.approx(want_cp, rel=1e-12)
  # Purities by counting: units 0 {a,a,c}, 1 {a,b,b,a}, 2 {c,c,c} -> majority 2 + 2 + 3 of 10
  # (unit 1 is a tie a/b: either majority counts 2).
  assert got["phone_purity"] == pytest.approx(7 / 10)
  # phones a {0,0,1,1}, b {1,1}, c {2,2,0,2} -> 2 + 2 + 3 of 10.
  assert got["cluster_purity"] == pytest.approx(7 / 10)


def test_mask_and_random_small_cases_against_definition():
  rng = np.random.default_rng(0)
  for _ in range(5):
    phones = rng.integers(0, 6, size=(4, 30))
    units = rng.integers(0, 9, size=(4, 30))
    mask = rng.random((4, 30)) < 0.7
    want = _by_definition(phones[mask].tolist(), units[mask].tolist())
    got = unit_quality(phones, units, mask)
    np.testing.assert_allclose([got["pnmi"], got["phone_purity"], got["cluster_purity"]], want,
                               rtol=1e-12)
    assert got["num_frames"] == mask.sum()


def test_invariances_and_extremes():
  rng = np.random.default_rng(1)
  phones = rng.integers(0, 10, size=2000)
  noise = rng.random(2000) < 0.3
  units = np.where(noise, rng.integers(0, 20, size=2000), phones * 2 + rng.integers(0, 2, 2000))
  base = unit_quality(phones, units)
  # Renaming units (any permutation/injection of ids) changes nothing.
  perm = rng.permutation(1000)
  renamed = unit_quality(phones, perm[units])
  for key in ("pnmi", "phone_purity", "cluster_purity"):
    assert renamed[key] == pytest.approx(base[key], rel=1e-12)
  # Perfect clustering (units = phones relabelled): PNMI 1, both purities 1.
  perfect = unit_quality(phones, perm[phones])
  assert perfect["pnmi"] == pytest.approx(1.0, rel=1e-12)
  assert perfect["phone_purity"] == pytest.approx(1.0) == perfect["cluster_purity"]
  # One unit per frame: phone purity 1, PNMI 1 (z determines y), cluster purity small.
  one_each = unit_quality(phones, np.arange(2000))
  assert one_each["phone_purity"] == pytest.approx(1.0)
  assert one_each["pnmi"] == pytest.approx(1.0, rel=1e-12)
  # A single unit: no information, PNMI 0, cluster purity 1.
  single = unit_quality(phones, np.zeros(2000, int))
  assert single["pnmi"] == pytest.approx(0.0, abs=1e-12) and single["cluster_purity"] == 1.0
  # Units independent of phones: PNMI near 0 (positive bias ~ (P-1)(U-1)/(2N H) nats).
  indep = pnmi(phones, rng.integers(0, 20, size=2000))
  assert 0.0 <= indep < 0.05
  # The noisy clustering lies in between and the functional forms agree with unit_quality.
  assert indep < base["pnmi"] < 1.0
  assert pnmi(phones, units) == base["pnmi"]
  assert phone_purity(phones, units) == base["phone_purity"]
  assert cluster_purity(phones, units) == base["cluster_purity"]
  # Merging units never increases PNMI (data processing inequality).
  merged = unit_quality(phones, units // 2)
  assert merged["pnmi"] <= base["pnmi"] + 1e-12


def test_speaker_nmi():
  rng = np.random.default_rng(0)
  spk = np.repeat(["a", "b", "c"], 400)  # [N]
  # Units that carry the speaker (one private unit range per speaker) explain all of it.
  private = rng.integers(0, 4, spk.size) + 4 * np.searchsorted(["a", "b", "c"], spk)
  assert speaker_nmi(spk, private) == pytest.approx(1.0)
  # Units drawn independently of the speaker explain (almost) none of it.
  shared = rng.integers(0, 8, spk.size)
  assert speaker_nmi(spk, shared) < 0.02
  # Same value as PNMI with speakers as labels, from the definition.
  mixed = np.where(rng.random(spk.size) < 0.5, private, shared + 100)
  assert speaker_nmi(spk, mixed) == pytest.approx(_by_definition(list(spk), list(mixed))[0])
  assert 0.2 < speaker_nmi(spk, mixed) < 0.8
  with pytest.raises(ValueError, match="at least 2 speakers"):
    speaker_nmi(np.zeros(10), np.arange(10))
